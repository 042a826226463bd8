"""The pull path: which requests get ``"directives"`` in their response body."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from verity_django import clients
from verity_django.batching import Batch
from verity_django.conf import conf

REQUEST_HEADER = "X-Verity-Directive-Request"
REQUEST_VALUE = "send me directives"


def wants_directives(request: HttpRequest) -> bool:
    if conf.ALWAYS_INCLUDE_IN_RESPONSES:
        return True
    value = request.headers.get(REQUEST_HEADER, "")
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
    return [x.to_dict() for x in batch.directives()]
