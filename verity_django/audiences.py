"""Audience names, their django-eventstream channels, and who may read them.

An audience is a name such as ``global``, ``user-42`` or ``team-abc``. It is
validated before it becomes part of a channel name, a Last-Event-ID, or a
Redis key, so no audience string can inject into any of them.
"""

from __future__ import annotations

import re
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django_eventstream.channelmanager import ChannelManagerBase

from verity_django.conf import conf

GLOBAL = "global"
MAX_LENGTH = 100
_AUDIENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class InvalidAudience(ValueError):
    pass


def validate_audience(audience: Any) -> str:
    if isinstance(audience, str) and audience in _valid:
        return audience
    _check(audience)
    if len(_valid) < 10_000:
        _valid.add(audience)
    return audience  # type: ignore[no-any-return]


# Audiences repeat on every save; remember the valid ones (bounded; bench W4:
# verity's extra Python calls per 200 saves 39,181 without, 37,171 with).
_valid: set[str] = set()


def _check(audience: Any) -> None:
    if not isinstance(audience, str):
        raise InvalidAudience(f"an audience must be a string, got {type(audience).__name__}")
    if not audience:
        raise InvalidAudience("an audience must not be empty")
    if len(audience) > MAX_LENGTH:
        raise InvalidAudience(f"an audience is at most {MAX_LENGTH} characters")
    if not _AUDIENCE.fullmatch(audience):
        raise InvalidAudience(
            f"invalid audience {audience!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit"
        )


def is_valid_audience(audience: Any) -> bool:
    try:
        validate_audience(audience)
    except InvalidAudience:
        return False
    return True


def user_audience(user_or_pk: Any) -> str:
    pk = getattr(user_or_pk, "pk", user_or_pk)
    return f"user-{pk}"


def channel_for(audience: str) -> str:
    return conf.CHANNEL_PREFIX + validate_audience(audience)


def audience_for(channel: str) -> str | None:
    prefix = conf.CHANNEL_PREFIX
    if not channel.startswith(prefix):
        return None
    audience = channel[len(prefix) :]
    return audience if is_valid_audience(audience) else None


def default_authorize(user: Any, audience: str) -> bool:
    """``global`` for everyone (or the authenticated), ``user-<pk>`` for that
    user only, and nothing else until the project's own hook says so."""
    authenticated = bool(getattr(user, "is_authenticated", False))
    if audience == GLOBAL:
        return authenticated or not conf.GLOBAL_REQUIRES_AUTHENTICATION
    return authenticated and audience == user_audience(user)


def default_user_audiences(user: Any) -> list[str]:
    if getattr(user, "is_authenticated", False):
        return [user_audience(user)]
    return []


def can_read(user: Any, audience: str) -> bool:
    if not is_valid_audience(audience):
        return False
    return conf.AUTHORIZE(user if user is not None else AnonymousUser(), audience) is True


class AudienceChannelManager(ChannelManagerBase):  # type: ignore[misc]
    """Maps django-eventstream channels to audiences and asks the AUTHORIZE hook.

    Configure it as ``EVENTSTREAM_CHANNELMANAGER_CLASS`` so that
    django-eventstream's own checks (including ``channel_permission_changed``,
    which cuts live streams) agree with the events view.
    """

    def get_channels_for_request(self, request: Any, view_kwargs: dict[str, Any]) -> set[str]:
        return set(view_kwargs.get("channels", ()))

    def can_read_channel(self, user: Any, channel: str) -> bool:
        from verity_django.storage import release_stream_connections

        audience = audience_for(channel)
        try:
            return audience is not None and can_read(user, audience)
        finally:
            release_stream_connections()

    def is_channel_reliable(self, channel: str) -> bool:
        return True
