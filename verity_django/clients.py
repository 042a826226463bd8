"""Client ids: what a valid one is, where a request carries it, and whose it is.

A client id is chosen by the browser page, so it proves nothing by itself:
anyone can copy another page's id. Whatever the server decides with it (echo
rewriting, the position a reconnect resumes from) is therefore keyed by
:func:`owner_tag`, which binds the id to the authenticated user or session
that presented it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from verity_django.conf import conf

MAX_LENGTH = 200
# Visible ASCII only: the id travels in a header, a query string and JSON,
# and must compare equal in all three.
_VALID = re.compile(r"[\x21-\x7e]+")


class InvalidClientId(ValueError):
    pass


def validate_client_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidClientId("a client id must be a non-empty string")
    if len(value) > MAX_LENGTH or not _VALID.fullmatch(value):
        raise InvalidClientId(f"a client id is 1 to {MAX_LENGTH} visible ASCII characters")
    return value


def is_valid_client_id(value: Any) -> bool:
    try:
        validate_client_id(value)
    except InvalidClientId:
        return False
    return True


def from_headers(request: HttpRequest) -> str | None:
    """The id a mutating request names in ``CLIENT_ID_HEADERS``; an invalid
    one counts as none, since it could never match a stream's."""
    # META directly: building request.headers parses every header, and this
    # runs on every mutating request (bench W1: 96 Python calls down to 16).
    for key in _meta_keys(conf.CLIENT_ID_HEADERS):
        value = request.META.get(key, "").strip()
        if value:
            return value if is_valid_client_id(value) else None
    return None


def meta_key(header: str) -> str:
    """Where ``request.META`` holds the HTTP header ``header``."""
    return "HTTP_" + header.upper().replace("-", "_")


def _meta_keys(headers: Sequence[str]) -> tuple[str, ...]:
    # Derived once per value of the setting, not on every request.
    key = tuple(headers)
    found = _known_meta_keys.get(key)
    if found is None:
        found = _known_meta_keys[key] = tuple(meta_key(header) for header in key)
    return found


_known_meta_keys: dict[tuple[str, ...], tuple[str, ...]] = {}


def owner_of(request: HttpRequest) -> str | None:
    """Who presents a client id: the authenticated user, else the session.

    None for an anonymous request without a session: its client id binds to
    nobody, so nothing is decided with it.
    """
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return f"user:{user.pk}"
    session = getattr(request, "session", None)
    key = getattr(session, "session_key", None)
    return f"session:{key}" if key else None


def owner_tag(owner: str, client_id: str) -> str:
    """An opaque tag for (owner, client id): equal only for the same pair,
    and useless to anyone who reads it without ``SECRET_KEY``."""
    # A copy of a keyed HMAC, not hmac.digest(): the one-shot C function lets
    # go of the GIL, which under concurrent requests hands it to another
    # thread (bench W5); a short update on a copy keeps it.
    tag = _tag_hmac().copy()
    tag.update(f"{owner}\x00{client_id}".encode())
    return tag.hexdigest()[:32]


_tag_hmacs: dict[str, hmac.HMAC] = {}


def _tag_hmac() -> hmac.HMAC:
    """An HMAC keyed for tags alone, derived from ``SECRET_KEY`` once per
    secret (deriving it for every request was most of a tag's cost)."""
    secret = settings.SECRET_KEY
    keyed = _tag_hmacs.get(secret)
    if keyed is None:
        _tag_hmacs.clear()
        key = hashlib.sha256(b"verity_django.clients.owner_tag\x00" + secret.encode()).digest()
        keyed = _tag_hmacs[secret] = hmac.new(key, digestmod="sha256")
    return keyed


def tag_for(request: HttpRequest, client_id: str | None) -> str | None:
    if client_id is None:
        return None
    owner = owner_of(request)
    return None if owner is None else owner_tag(owner, client_id)
