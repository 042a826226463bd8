"""The events endpoint: django-eventstream's stream, plus what it cannot do
per connection.

    GET /api/events?audience=<a>&audience=<b>&client_id=<id>

Before the stream starts this view validates the query, answers 403 for any
audience the user may not read (no byte of it is ever streamed), and pins
the start of every channel with a ``Last-Event-ID`` equal to the ``last_seq``
its hello announces. It then wraps django-eventstream's stream to:

- send ``{"type":"hello","audience":A,"last_seq":N}`` first, per audience;
- drop an envelope this connection already received (django-eventstream may
  re-read storage after an overflow and send events twice);
- replace the envelope that this connection's own client caused with the
  same seq and no directives, so the client neither applies it twice nor
  mistakes the next envelope for a gap.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET

from verity_django import directives as d
from verity_django.audiences import (
    GLOBAL,
    InvalidAudience,
    can_read,
    channel_for,
    validate_audience,
)
from verity_django.conf import conf

MAX_CLIENT_ID = 200
MAX_LAST_EVENT_ID = 4096
_CLIENT_ID = re.compile(r"[\x21-\x7e]+")
_ENVELOPE = re.compile(r'\{"type":"directives","seq":(\d+),"audience":"([^"\\]*)"')


def _error(status: int, detail: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"detail": detail, **extra}, status=status)


@require_GET
def events(request: HttpRequest) -> HttpResponseBase:
    if len(request.META.get("QUERY_STRING", "")) > 8192:
        return _error(400, "The query string is too long.")
    audiences: list[str] = []
    for raw in request.GET.getlist(conf.AUDIENCE_PARAM):
        try:
            audience = validate_audience(raw)
        except InvalidAudience as exc:
            return _error(400, str(exc))
        if audience not in audiences:
            audiences.append(audience)
    if not audiences:
        audiences = [GLOBAL]
    if conf.AUTO_SUBSCRIBE_USER_AUDIENCES:
        for audience in conf.USER_AUDIENCES(request.user):
            if audience not in audiences:
                audiences.append(audience)
    if len(audiences) > conf.MAX_AUDIENCES_PER_CONNECTION:
        return _error(400, f"At most {conf.MAX_AUDIENCES_PER_CONNECTION} audiences per connection.")
    client_id = request.GET.get(conf.CLIENT_ID_PARAM) or None
    if client_id is not None and (
        len(client_id) > MAX_CLIENT_ID or not _CLIENT_ID.fullmatch(client_id)
    ):
        return _error(
            400, f"{conf.CLIENT_ID_PARAM} must be 1 to {MAX_CLIENT_ID} visible ASCII characters."
        )

    denied = [a for a in audiences if not can_read(request.user, a)]
    if denied:
        return _error(403, "You may not read these audiences.", audiences=denied)

    from django_eventstream.views import events as eventstream_events

    from verity_django.publishing import grip_configured, storage

    channels = {channel_for(a): a for a in audiences}
    try:
        resume = _parse_last_event_id(request, channels)
    except ValueError as exc:
        return _error(400, str(exc))
    current = storage().get_current_ids(channels)
    starts = {c: min(resume.get(c, current[c]), current[c]) for c in channels}
    request.META["HTTP_LAST_EVENT_ID"] = ",".join(f"{quote(c)}:{starts[c]}" for c in channels)

    response: HttpResponseBase = eventstream_events(request, channels=list(channels))
    hellos = "".join(
        _sse(d.dumps({"type": "hello", "audience": a, "last_seq": starts[c]}))
        for c, a in channels.items()
    )
    if isinstance(response, StreamingHttpResponse):
        content: AsyncIterator[bytes] = response.streaming_content  # type: ignore[assignment]
        wrapped = StreamingHttpResponse(
            _stream(content, hellos, starts, channels, client_id, use_tailer=not _redis_delivers()),
            content_type="text/event-stream",
        )
        for header, value in response.items():
            wrapped[header] = value
        return wrapped
    grip = getattr(request, "grip", None)
    proxied = grip_configured() and grip is not None and grip.proxied
    first_response = request.GET.get("link") != "next"
    if proxied and first_response and isinstance(response, HttpResponse):
        response.content = _after_stream_open(response.content.decode(), hellos).encode()
    return response


def _redis_delivers() -> bool:
    from verity_django.publishing import storage

    return bool(getattr(storage(), "publishes_to_listeners", False))


def _parse_last_event_id(request: HttpRequest, channels: dict[str, str]) -> dict[str, int]:
    raw = request.META.get("HTTP_LAST_EVENT_ID") or request.GET.get("lastEventId") or ""
    if not raw:
        return {}
    if len(raw) > MAX_LAST_EVENT_ID:
        raise ValueError("Last-Event-ID is too long.")
    out: dict[str, int] = {}
    for part in raw.split(","):
        name, sep, value = part.rpartition(":")
        if not sep or not value.isdigit() or len(value) > 18:
            raise ValueError("Last-Event-ID must look like 'channel:id,channel:id'.")
        channel = unquote(name)
        if channel in channels:
            out[channel] = int(value)
    return out


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


def _after_stream_open(text: str, hellos: str) -> str:
    marker = "event: stream-open\ndata:\n\n"
    at = text.find(marker)
    if at < 0:
        return hellos + text
    cut = at + len(marker)
    return text[:cut] + hellos + text[cut:]


async def _stream(
    content: AsyncIterator[bytes],
    hellos: str,
    starts: dict[str, int],
    channels: dict[str, str],
    client_id: str | None,
    *,
    use_tailer: bool,
) -> AsyncIterator[bytes]:
    if use_tailer:
        from verity_django.delivery import tailer

        tailer().track(dict(starts))
    connection = _Connection({channels[c]: seq for c, seq in starts.items()}, client_id)
    first = True
    async for chunk in content:
        text = chunk.decode() if isinstance(chunk, bytes) else str(chunk)
        if first:
            text = _after_stream_open(text, hellos)
        out = connection.rewrite(text)
        if out:
            yield out.encode()
        if first:
            first = False
            # Under ASGI each request has a thread of its own, holding its own
            # database connection for as long as the stream lives. The stream
            # has caught up from storage now; new envelopes arrive from memory.
            await sync_to_async(close_old_connections_now)()


def close_old_connections_now() -> None:
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()


class _Connection:
    """What one SSE connection has received, and who its client is."""

    def __init__(self, delivered: dict[str, int], client_id: str | None) -> None:
        self.delivered = delivered
        self.client_id = client_id
        # Envelopes are written by publishing.envelope_parts with this exact
        # spelling, so a substring test spares parsing every foreign envelope.
        self.marker = None if client_id is None else '"source":' + d.dumps(client_id) + ","

    def rewrite(self, text: str) -> str:
        if '"type":"directives"' not in text:
            return text
        kept: list[str] = []
        for block in text.split("\n\n"):
            at = block.find('data: {"type":"directives"')
            match = None if at < 0 else _ENVELOPE.match(block, at + 6)
            if match is None:
                kept.append(block)
                continue
            seq, audience = int(match.group(1)), match.group(2)
            if seq <= self.delivered.get(audience, 0):
                continue
            self.delivered[audience] = seq
            data = block[at + 6 :]
            own = self.marker is not None and self.marker in data
            if own and json.loads(data).get("source") == self.client_id:
                echo: dict[str, Any] = {
                    "type": "directives",
                    "seq": seq,
                    "audience": audience,
                    "directives": [],
                }
                block = block[:at] + "data: " + d.dumps(echo)
            kept.append(block)
        return "\n\n".join(kept)
