"""Settings for the demo project that exercises verity_django.

The environment picks the engines, so the same project runs the demo (SQLite,
one process, in-process delivery) and the real-process tests (PostgreSQL,
Redis, Pushpin):

- ``VERITY_DATABASE_URL``: ``postgres://user@host:port/name``; SQLite otherwise.
- ``VERITY_SQLITE_PATH``: where the SQLite file lives (default ``db.sqlite3``).
- ``VERITY_EVENTS_SQLITE_PATH``: keep the stored envelopes in a SQLite database
  of their own there (``testproject.routers``); migrate it with
  ``migrate --database events``.
- ``VERITY_REDIS``: ``host:port`` of a redis-server for cross-process fan-out
  and event storage.
- ``VERITY_REDIS_PUBSUB``: another ``host:port`` for the pub/sub connections
  only (the tests put a proxy in front of the same server).
- ``VERITY_GRIP_URL``: the control URL of a Pushpin proxy.
- ``VERITY_REPLAY_RETENTION``, ``VERITY_REPLAY_MARGIN``: those settings, in seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import urlsplit

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "verity-demo-secret-key-not-for-production-use")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"

# An edited todo travels at its maximal level in `result`, so no window
# refetches it. VERITY_DEMO_RESULT=0 shows the refetches instead (the bench
# compares both).
DEMO_TODO_RESULT = os.environ.get("VERITY_DEMO_RESULT", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_eventstream",
    "verity_django",
    "testproject.todos.apps.TodosConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "verity_django.middleware.DirectiveMiddleware",
]

ROOT_URLCONF = "testproject.urls"
ASGI_APPLICATION = "testproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "testproject" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]


def _sqlite(name: str) -> dict[str, object]:
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": name,
        # Several processes (server, management commands) share one file:
        # WAL lets the event tailer read while requests write, and
        # IMMEDIATE takes the write lock up front instead of failing late.
        "OPTIONS": {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }


def _database() -> dict[str, object]:
    url = os.environ.get("VERITY_DATABASE_URL")
    if not url:
        return _sqlite(os.environ.get("VERITY_SQLITE_PATH", str(BASE_DIR / "db.sqlite3")))
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": parts.username or "",
        "PASSWORD": parts.password or "",
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        # Without one, libpq waits for ever on a server that never answers
        # (check verity_django.W024); 0 turns it off, as libpq reads it.
        "OPTIONS": {"connect_timeout": int(os.environ.get("VERITY_DATABASE_CONNECT_TIMEOUT", "5"))},
    }


DATABASES = {"default": _database()}
if os.environ.get("VERITY_EVENTS_SQLITE_PATH"):
    DATABASES["events"] = _sqlite(os.environ["VERITY_EVENTS_SQLITE_PATH"])
    DATABASE_ROUTERS = ["testproject.routers.EventsRouter"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "testproject" / "static"]

USE_TZ = True
TIME_ZONE = "UTC"

REST_FRAMEWORK: dict[str, object] = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
}

# The OpenAPI schema at /api/schema/, when drf-spectacular is installed.
if importlib.util.find_spec("drf_spectacular") is not None:
    INSTALLED_APPS.append("drf_spectacular")
    REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
    SPECTACULAR_SETTINGS = {
        "TITLE": "verity_django demo",
        "VERSION": "1",
        "POSTPROCESSING_HOOKS": [
            "drf_spectacular.hooks.postprocess_schema_enums",
            "verity_django.contrib.rest_framework.schema.add_directives",
        ],
    }

EVENTSTREAM_STORAGE_CLASS = "verity_django.storage.DatabaseStorage"
EVENTSTREAM_CHANNELMANAGER_CLASS = "verity_django.audiences.AudienceChannelManager"

_redis = os.environ.get("VERITY_REDIS")
if _redis:
    _host, _, _port = _redis.rpartition(":")
    EVENTSTREAM_STORAGE_CLASS = "verity_django.storage.RedisStorage"
    EVENTSTREAM_STORAGE_CONNECTION = {"host": _host, "port": int(_port), "db": 0}
    _host, _, _port = os.environ.get("VERITY_REDIS_PUBSUB", _redis).rpartition(":")
    EVENTSTREAM_REDIS = {"host": _host, "port": int(_port), "db": 0}
    if "VERITY_REDIS_PUBSUB" in os.environ:
        # The same server through another address, which E022 cannot tell.
        SILENCED_SYSTEM_CHECKS = ["verity_django.E022"]

_grip = os.environ.get("VERITY_GRIP_URL")
if _grip:
    GRIP_URL = _grip
    MIDDLEWARE.insert(0, "django_grip.GripMiddleware")

VERITY: dict[str, object] = {
    "ENABLED": os.environ.get("VERITY_ENABLED", "1") == "1",
}
# Tests shorten replay (past-retention cases) or turn it off (benchmarks).
for _name in ("REPLAY_RETENTION", "REPLAY_MARGIN"):
    if os.environ.get(f"VERITY_{_name}"):
        VERITY[_name] = float(os.environ[f"VERITY_{_name}"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "verity_django": {"handlers": ["console"], "level": "INFO"},
        "django_eventstream": {"handlers": ["console"], "level": "WARNING"},
    },
}
