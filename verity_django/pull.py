"""The pull path: which requests get ``"directives"`` in their response body,
and which of their batch's directives each requester may see.

A request's batch holds everything the request caused, whoever it concerns:
a receiver may well update other users' rows. The response carries only the
directives of an audience the requester may read, and a ``result`` only when
the requester may read one of the object's current audiences, which is the
same rule the push path follows per audience.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from django.http import HttpRequest

from verity_django import clients
from verity_django.audiences import can_read
from verity_django.batching import Batch
from verity_django.conf import conf

REQUEST_HEADER = "X-Verity-Directive-Request"
REQUEST_VALUE = "send me directives"
_REQUEST_META_KEY = clients.meta_key(REQUEST_HEADER)


def wants_directives(request: HttpRequest) -> bool:
    if conf.ALWAYS_INCLUDE_IN_RESPONSES:
        return True
    value = request.META.get(_REQUEST_META_KEY, "")
    return " ".join(value.split()).lower() == REQUEST_VALUE


def client_id(request: HttpRequest) -> str | None:
    """The requesting client's id, which becomes the ``source`` of its directives."""
    return clients.from_headers(request)


def request_batch(request: HttpRequest) -> Batch | None:
    return getattr(request, "verity_batch", None)


def directives_for(request: HttpRequest) -> list[dict[str, Any]]:
    """The directives this request has caused so far, as JSON data."""
    batch = request_batch(request)
    if batch is None:
        return []
    return [x.to_dict() for x in batch.directives(readable=partial(may_read, request))]


_READABLE = "_verity_readable"


def may_read(request: HttpRequest, audience: str) -> bool:
    """Whether the requester may read ``audience``, asking AUTHORIZE at most
    once per request and audience (a hook may well query the database)."""
    user = getattr(request, "user", None)
    cached: tuple[Any, dict[str, bool]] | None = getattr(request, _READABLE, None)
    if cached is None or cached[0] is not user:
        # A login or logout during the request makes another requester.
        cached = (user, {})
        setattr(request, _READABLE, cached)
    answers = cached[1]
    answer = answers.get(audience)
    if answer is None:
        answer = answers[audience] = can_read(user, audience)
    return answer
