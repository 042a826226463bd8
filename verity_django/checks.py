"""System checks for settings (``E0xx``) and model rules (``E1xx``, in registry.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from verity_django.conf import Setting, declared

_STORAGES = ("verity_django.storage.DatabaseStorage", "verity_django.storage.RedisStorage")
_MIDDLEWARE = "verity_django.middleware.DirectiveMiddleware"


def register_checks() -> None:
    from verity_django.registry import check_rules

    checks.register(check_settings)
    checks.register(check_rules)


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    project = getattr(settings, "VERITY", {})
    if not isinstance(project, dict):
        return [
            checks.Error(
                f"settings.VERITY should be a dict, not {type(project).__name__}.",
                id="verity_django.E001",
            )
        ]
    known = declared()
    for key, value in project.items():
        setting = known.get(key)
        if setting is None:
            errors.append(
                checks.Error(
                    f"settings.VERITY has an unknown key {key!r}.",
                    hint=f"Known keys: {', '.join(known)}.",
                    id="verity_django.E002",
                )
            )
            continue
        errors.extend(_check_value(setting, value))
    errors.extend(_check_eventstream())
    errors.extend(_check_grip())
    errors.extend(_check_storage_connect_timeout())
    middleware: Sequence[str] = getattr(settings, "MIDDLEWARE", ()) or ()
    if _MIDDLEWARE not in middleware:
        errors.append(
            checks.Error(
                f"{_MIDDLEWARE} is not in MIDDLEWARE.",
                hint="It gathers each request's directives; add it after AuthenticationMiddleware.",
                id="verity_django.E010",
            )
        )
    return errors


def _check_value(setting: Setting[Any], value: Any) -> list[checks.CheckMessage]:
    where = f"settings.VERITY[{setting.name!r}]"
    if not setting.accepts_type(value):
        return [
            checks.Error(
                f"{where} should be {setting.expected}, not {type(value).__name__}.",
                hint=setting.doc,
                id="verity_django.E003",
            )
        ]
    if setting.importable and isinstance(value, str):
        try:
            import_string(value)
        except ImportError as exc:
            return [
                checks.Error(
                    f"{where} should be an importable dotted path: {exc}.",
                    id="verity_django.E004",
                )
            ]
    condition = setting.condition
    if condition is not None and not condition.holds(value):
        return [
            checks.Error(
                f"{where} should be {condition.expected}, not {value!r}.",
                hint=setting.doc,
                id=condition.id,
            )
        ]
    return []


def _check_eventstream() -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    storage = getattr(settings, "EVENTSTREAM_STORAGE_CLASS", None)
    if storage not in _STORAGES:
        errors.append(
            checks.Error(
                f"EVENTSTREAM_STORAGE_CLASS is {storage!r}.",
                hint=f"Set it to one of {', '.join(_STORAGES)}: envelopes need storage for "
                "their seq, for replay, and to survive bursts.",
                id="verity_django.E020",
            )
        )
    manager = getattr(settings, "EVENTSTREAM_CHANNELMANAGER_CLASS", None)
    ok_manager = False
    if isinstance(manager, str):
        try:
            from verity_django.audiences import AudienceChannelManager

            cls = import_string(manager)
            ok_manager = isinstance(cls, type) and issubclass(cls, AudienceChannelManager)
        except ImportError:
            ok_manager = False
    if not ok_manager:
        errors.append(
            checks.Error(
                f"EVENTSTREAM_CHANNELMANAGER_CLASS is {manager!r}.",
                hint="Set it to 'verity_django.audiences.AudienceChannelManager' (or a subclass) "
                "so that django-eventstream authorizes channels with the AUTHORIZE hook.",
                id="verity_django.E021",
            )
        )
    redis = getattr(settings, "EVENTSTREAM_REDIS", None)
    if redis is not None:
        same = getattr(settings, "EVENTSTREAM_STORAGE_CONNECTION", None) == redis
        if storage != _STORAGES[1] or not same:
            errors.append(
                checks.Error(
                    "EVENTSTREAM_REDIS is set, but events are not stored in that same Redis.",
                    hint="Use EVENTSTREAM_STORAGE_CLASS = 'verity_django.storage.RedisStorage' "
                    "with EVENTSTREAM_STORAGE_CONNECTION = EVENTSTREAM_REDIS, so that each "
                    "envelope is stored and published in one atomic step (seq order).",
                    id="verity_django.E022",
                )
            )
    return errors


def _check_grip() -> list[checks.CheckMessage]:
    """Without a key on every GRIP proxy, django_grip counts any request with
    a ``Grip-Sig`` header as proxied, so no request can be trusted to be the
    proxy's own, and its recoveries of user audiences are refused."""
    from verity_django.publishing import grip_configured

    if not grip_configured() or getattr(settings, "GRIP_VERIFY_KEY", None):
        return []
    try:
        from gripcontrol import parse_grip_uri
    except ImportError:
        return []
    proxies = [p for p in getattr(settings, "GRIP_PROXIES", None) or () if isinstance(p, dict)]
    url = getattr(settings, "GRIP_URL", None)
    if isinstance(url, str) and url:
        proxies.append(parse_grip_uri(url))
    if all(p.get("key") or p.get("verify_key") for p in proxies):
        return []
    return [
        checks.Warning(
            "GRIP is configured without a key: streams of user audiences that the GRIP "
            "proxy holds cannot recover (their recovery requests carry no session, and "
            "without a signature none can be trusted to name the user).",
            hint="Give the proxy's signing key (Pushpin's sig_key) to GRIP_URL as "
            "'?key=...', or as 'key' in every GRIP_PROXIES entry.",
            id="verity_django.W023",
        )
    ]


def _check_storage_connect_timeout() -> list[checks.CheckMessage]:
    """Every I/O of publishing has a bound of its own except a PostgreSQL
    connect, which only the driver bounds: psycopg 3 gives up after 130 s
    by default, psycopg2 never, on a server that accepts the connection and
    never answers. The publisher thread, the storage readers and the
    positions writer wait that long; the readers' callers are given up on
    sooner (readers.answer_limit), but each stuck connect holds a thread."""
    if getattr(settings, "EVENTSTREAM_STORAGE_CLASS", None) != _STORAGES[0]:
        return []
    from django.db import connections, router
    from django_eventstream.models import Event, EventCounter

    from verity_django.models import ReplayPosition

    aliases = {
        router.db_for_write(Event),
        router.db_for_read(EventCounter),
        router.db_for_write(ReplayPosition),
    }
    warnings: list[checks.CheckMessage] = []
    for alias in sorted(a for a in aliases if a in connections.settings):
        if connections[alias].vendor != "postgresql" or _connect_is_bounded(
            connections[alias].settings_dict.get("OPTIONS", {})
        ):
            continue
        warnings.append(
            checks.Warning(
                f"DATABASES[{alias!r}], which verity_django stores envelopes or positions "
                "in, is PostgreSQL without a connect timeout: a server that accepts "
                "connections and never answers holds publishing and the streams' storage "
                "reads at each connect (psycopg 3: 130 s; psycopg2: for ever).",
                hint=f"Set DATABASES[{alias!r}]['OPTIONS']['connect_timeout'] to a number of "
                "seconds above 0, e.g. 5 (or PGCONNECT_TIMEOUT in the environment).",
                id="verity_django.W024",
            )
        )
    return warnings


def _connect_is_bounded(options: dict[str, Any]) -> bool:
    timeout = options.get("connect_timeout")
    if timeout is None:
        timeout = os.environ.get("PGCONNECT_TIMEOUT")
    try:
        # As libpq and psycopg read it: whole seconds, 0 or less for none.
        return timeout is not None and int(float(timeout)) > 0
    except (TypeError, ValueError):
        return False
