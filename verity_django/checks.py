"""System checks for settings (``E0xx``) and model rules (``E1xx``, in registry.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from verity_django.conf import DEFAULTS

_STORAGES = ("verity_django.storage.DatabaseStorage", "verity_django.storage.RedisStorage")
_MIDDLEWARE = "verity_django.middleware.DirectiveMiddleware"

_TYPES: dict[str, type | tuple[type, ...]] = {
    "ENABLED": bool,
    "PUSH": bool,
    "ALWAYS_INCLUDE_IN_RESPONSES": bool,
    "INJECT_DRF_RESPONSES": bool,
    "CLIENT_ID_HEADERS": (list, tuple),
    "COLLAPSE_THRESHOLD": int,
    "RESULT_MAX_BYTES": int,
    "CHANNEL_PREFIX": str,
    "AUTHORIZE": (str,),
    "USER_AUDIENCES": (str,),
    "GLOBAL_REQUIRES_AUTHENTICATION": bool,
    "AUTO_SUBSCRIBE_USER_AUDIENCES": bool,
    "MAX_AUDIENCES_PER_CONNECTION": int,
    "AUDIENCE_PARAM": str,
    "CLIENT_ID_PARAM": str,
    "POLL_INTERVAL": (int, float),
    "EVENT_RETENTION": int,
}


def register_checks() -> None:
    from verity_django.registry import check_rules

    checks.register(check_settings)
    checks.register(check_rules)


def check_settings(**kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    user = getattr(settings, "VERITY", {})
    if not isinstance(user, dict):
        return [checks.Error("settings.VERITY must be a dict.", id="verity_django.E001")]
    for key, value in user.items():
        if key not in DEFAULTS:
            errors.append(
                checks.Error(
                    f"settings.VERITY has an unknown key {key!r}.",
                    hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.",
                    id="verity_django.E002",
                )
            )
            continue
        expected = _TYPES[key]
        if callable(value) and key in ("AUTHORIZE", "USER_AUDIENCES"):
            continue
        bad_type = isinstance(value, bool) and expected in (int, (int, float))
        if bad_type or not isinstance(value, expected):
            errors.append(
                checks.Error(
                    f"settings.VERITY[{key!r}] has the wrong type: {type(value).__name__}.",
                    id="verity_django.E003",
                )
            )
            continue
        if key in ("AUTHORIZE", "USER_AUDIENCES") and isinstance(value, str):
            try:
                import_string(value)
            except ImportError as exc:
                errors.append(
                    checks.Error(
                        f"settings.VERITY[{key!r}] cannot be imported: {exc}.",
                        id="verity_django.E004",
                    )
                )
        if (
            key in ("COLLAPSE_THRESHOLD", "RESULT_MAX_BYTES", "MAX_AUDIENCES_PER_CONNECTION")
            and value < 1
        ):
            errors.append(
                checks.Error(
                    f"settings.VERITY[{key!r}] must be at least 1.", id="verity_django.E005"
                )
            )
        if key == "POLL_INTERVAL" and not 0 < value <= 5:
            errors.append(
                checks.Error(
                    "settings.VERITY['POLL_INTERVAL'] must be between 0 and 5 seconds, so that "
                    "envelopes from other processes arrive within a second or so.",
                    id="verity_django.E005",
                )
            )
    errors.extend(_check_eventstream())
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
