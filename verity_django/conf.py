"""Typed settings, read from ``settings.VERITY`` on every access.

Reading on access (not at import) keeps ``override_settings`` working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

from django.conf import settings
from django.utils.module_loading import import_string

DEFAULTS: dict[str, Any] = {
    "ENABLED": True,
    "PUSH": True,
    "ALWAYS_INCLUDE_IN_RESPONSES": False,
    "INJECT_DRF_RESPONSES": True,
    "CLIENT_ID_HEADERS": ("X-Verity-Client-ID", "X-Client-ID"),
    "COLLAPSE_THRESHOLD": 100,
    "RESULT_MAX_BYTES": 16 * 1024,
    "CHANNEL_PREFIX": "verity.",
    "AUTHORIZE": "verity_django.audiences.default_authorize",
    "USER_AUDIENCES": "verity_django.audiences.default_user_audiences",
    "GLOBAL_REQUIRES_AUTHENTICATION": False,
    "AUTO_SUBSCRIBE_USER_AUDIENCES": False,
    "MAX_AUDIENCES_PER_CONNECTION": 10,
    "AUDIENCE_PARAM": "audience",
    "CLIENT_ID_PARAM": "client_id",
    "POLL_INTERVAL": 0.25,
    "EVENT_RETENTION": 24 * 60 * 60,
}


class Settings:
    def _get(self, name: str) -> Any:
        user = getattr(settings, "VERITY", {})
        if name in user:
            return user[name]
        return DEFAULTS[name]

    @property
    def ENABLED(self) -> bool:
        """Master switch: when False no directive is produced at all."""
        return bool(self._get("ENABLED"))

    @property
    def PUSH(self) -> bool:
        """Publish envelopes over Server-Sent Events after commit."""
        return bool(self._get("PUSH"))

    @property
    def ALWAYS_INCLUDE_IN_RESPONSES(self) -> bool:
        """Inject directives even when the request did not ask for them."""
        return bool(self._get("ALWAYS_INCLUDE_IN_RESPONSES"))

    @property
    def INJECT_DRF_RESPONSES(self) -> bool:
        """Inject into every DRF response; False limits it to DirectivesMixin views."""
        return bool(self._get("INJECT_DRF_RESPONSES"))

    @property
    def CLIENT_ID_HEADERS(self) -> Sequence[str]:
        return cast(Sequence[str], self._get("CLIENT_ID_HEADERS"))

    @property
    def COLLAPSE_THRESHOLD(self) -> int:
        """Past this many refresh_item of one name in a batch, refresh collections instead."""
        return cast(int, self._get("COLLAPSE_THRESHOLD"))

    @property
    def RESULT_MAX_BYTES(self) -> int:
        return cast(int, self._get("RESULT_MAX_BYTES"))

    @property
    def CHANNEL_PREFIX(self) -> str:
        return cast(str, self._get("CHANNEL_PREFIX"))

    @property
    def AUTHORIZE(self) -> Callable[[Any, str], bool]:
        return cast(Callable[[Any, str], bool], _resolve(self._get("AUTHORIZE")))

    @property
    def USER_AUDIENCES(self) -> Callable[[Any], list[str]]:
        return cast(Callable[[Any], list[str]], _resolve(self._get("USER_AUDIENCES")))

    @property
    def GLOBAL_REQUIRES_AUTHENTICATION(self) -> bool:
        return bool(self._get("GLOBAL_REQUIRES_AUTHENTICATION"))

    @property
    def AUTO_SUBSCRIBE_USER_AUDIENCES(self) -> bool:
        return bool(self._get("AUTO_SUBSCRIBE_USER_AUDIENCES"))

    @property
    def MAX_AUDIENCES_PER_CONNECTION(self) -> int:
        return cast(int, self._get("MAX_AUDIENCES_PER_CONNECTION"))

    @property
    def AUDIENCE_PARAM(self) -> str:
        return cast(str, self._get("AUDIENCE_PARAM"))

    @property
    def CLIENT_ID_PARAM(self) -> str:
        return cast(str, self._get("CLIENT_ID_PARAM"))

    @property
    def POLL_INTERVAL(self) -> float:
        """Seconds between checks for events stored by other processes."""
        return float(self._get("POLL_INTERVAL"))

    @property
    def EVENT_RETENTION(self) -> int:
        """Seconds a published envelope stays replayable in database storage."""
        return cast(int, self._get("EVENT_RETENTION"))


def _resolve(value: Any) -> Any:
    return import_string(value) if isinstance(value, str) else value


conf = Settings()
