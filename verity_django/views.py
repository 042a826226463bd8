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
  same seq and no directives (``envelopes.for_connection``), so the client
  neither applies it twice nor mistakes the next envelope for a gap. "Own"
  means the same client id presented by the same user or session
  (``clients.tag_for``): an id copied from another page matches nothing.

Only this view's own parameters reach django-eventstream. ``channel`` and
``channels`` are ignored (the audiences decide the channels). ``link`` and
``recover`` (the proxy's paging and recovery) count only on a request that
came through the proxy; ``Grip-Last`` values that are not seqs are ignored.
``es-meta`` (django-eventstream's token naming the stream's user, valid for
an hour, and written into access logs with the URL) never reaches
django-eventstream. It names the user only on the proxy's *own* request: one
signed with the configured GRIP key that carries ``Grip-Last``. Pushpin
signs every request it forwards, but removes every ``Grip-*`` header a
client sends, and adds ``Grip-Last`` only to the requests it makes itself
for a stream it holds (recovery). That user is then authorized again, as on
any connect; a token replayed by a client through the proxy names nobody.

:func:`_starts` is where each stream's starting seq per channel is decided,
and :class:`_Subscriber` is where every envelope of one connection passes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.http import require_GET

from verity_django import clients, envelopes, positions, revocation
from verity_django.audiences import (
    GLOBAL,
    InvalidAudience,
    audience_for,
    can_read,
    channel_for,
    validate_audience,
)
from verity_django.conf import conf
from verity_django.publishing import grip_configured
from verity_django.storage import configured, streaming

logger = logging.getLogger(__name__)

MAX_LAST_EVENT_ID = 4096
# django-eventstream re-sends at most its queue (10 events) after an overflow.
_RECENT = 32
# Envelopes django-eventstream answers one request with, across its channels;
# past that it pages through next links (see _starts).
_PAGE = 100
# Parameters of django-eventstream's own protocol with a GRIP proxy.
_PAGING_PARAMS = ("link", "recover")
# Carries a held stream's session tag (an HMAC, not the key) into the next
# links the proxy follows without the session cookie.
_SESSION_PARAM = "verity-session"
_HIDDEN_PARAMS = ("channel", "channels", "es-meta", _SESSION_PARAM)
# Seconds a client is asked to wait before it reopens a stream its storage
# could not serve; a Verity client backs off on its own as well.
_RETRY_AFTER = 2


def _error(status: int, detail: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"detail": detail, **extra}, status=status)


# Read-only, and a stream outlives any transaction ATOMIC_REQUESTS would open.
@transaction.non_atomic_requests
@require_GET
def events(request: HttpRequest) -> HttpResponseBase:
    if len(request.META.get("QUERY_STRING", "")) > 8192:
        return _error(400, "The query string is too long.")
    hop = _keep_only_own_parameters(request)
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
    if client_id is not None and not clients.is_valid_client_id(client_id):
        return _error(
            400,
            f"{conf.CLIENT_ID_PARAM} must be 1 to {clients.MAX_LENGTH} visible ASCII characters.",
        )

    denied = [a for a in audiences if not can_read(request.user, a)]
    if denied:
        if hop.proxied and request.GET.get("link") == "next":
            return _cut_by_the_proxy(denied)
        return _error(403, "You may not read these audiences.", audiences=denied)

    from django_eventstream.views import events as eventstream_events

    channels = {channel_for(a): a for a in audiences}
    proxied = hop.proxied
    try:
        resume = _parse_last_event_id(request, channels)
    except ValueError as exc:
        return _error(400, str(exc))
    store = configured()
    try:
        current = store.get_current_ids(channels)
    except store.failures as exc:
        logger.warning("verity_django: a stream could not open: its storage read failed (%s)", exc)
        unavailable = _error(503, "The event storage is not answering; try again shortly.")
        unavailable["Retry-After"] = str(_RETRY_AFTER)
        return unavailable
    remembered = positions.remembered(request, client_id, channels, current)
    page = _PAGE // len(channels) if proxied else None
    starts = _starts(resume, remembered, current, page=page)
    tracker = positions.track(request, client_id, {a: starts[c] for c, a in channels.items()})
    request.META["HTTP_LAST_EVENT_ID"] = ",".join(f"{quote(c)}:{starts[c]}" for c in channels)

    # revocation: before the stream authorizes
    watched = revocation.opened(request, audiences, held_session=hop.session)
    response: HttpResponseBase = eventstream_events(request, channels=list(channels))
    hellos = "".join(envelopes.hello(a, starts[c]) for c, a in channels.items())
    if isinstance(response, StreamingHttpResponse):
        content: AsyncIterator[bytes] = response.streaming_content  # type: ignore[assignment]
        wrapped = StreamingHttpResponse(
            revocation.guard(  # revocation: ends the stream when access is revoked
                watched,
                positions.closing(  # positions: a last save when the stream ends
                    _stream(
                        content,
                        hellos,
                        starts,
                        current,
                        channels,
                        clients.tag_for(request, client_id),
                        use_tailer=not _redis_delivers(),
                        epoch=_storage_epoch(),
                        tracker=tracker,
                    ),
                    tracker,
                ),
            ),
            content_type="text/event-stream",
        )
        for header, value in response.items():
            wrapped[header] = value
        return wrapped
    if proxied and isinstance(response, HttpResponse):
        # Behind the proxy nothing rewrites per connection: every reader
        # gets the envelopes as they are published, without origin tags.
        text = envelopes.public_stream(response.content.decode())
        if request.GET.get("link") != "next":
            text = _after_stream_open(text, hellos)
        response.content = text.encode()
        _subscribe_to_cuts(request, watched)
    return response


def _cut_by_the_proxy(denied: list[str]) -> HttpResponse:
    """The answer to the proxy's own request for a stream whose user may no
    longer read it: the cut a direct stream gets, without a GRIP hold, so
    the proxy writes it, ends the response, and the client reconnects (a 403
    would only make the proxy retry for half a minute)."""
    reason = "Access to this stream is no longer allowed."
    text = revocation.cut_event_text(reason, frozenset(denied))
    return HttpResponse(text, content_type="text/event-stream")


def _subscribe_to_cuts(request: HttpRequest, stream: revocation.Stream) -> None:
    """Subscribe a held stream to its revocation control channels. Every
    answer the proxy gets for the stream names them again: each one replaces
    the stream's subscriptions."""
    from gripcontrol import Channel

    instruct = getattr(getattr(request, "grip", None), "instruct", None)
    if instruct is None:
        return
    for name, require_sub in revocation.held_channels(stream):
        channel = Channel(name)
        if require_sub:
            channel.filters.append("require-sub")
        instruct.add_channel(channel)


def _starts(
    resume: dict[str, int],
    remembered: dict[str, int],
    current: dict[str, int],
    *,
    page: int | None = None,
) -> dict[str, int]:
    """Where the stream starts on each channel, which its hello announces:
    where the client says it is (its Last-Event-ID, else the position
    remembered for its client id), never beyond the storage's current id.

    Behind the GRIP proxy a remembered start replays at most one ``page``
    per channel: the proxy would fetch the rest through next links without
    ``Grip-Last``, which cannot be told from a client's request, so a user
    audience's would be refused. Further back, the hello shows the client a
    gap and it resyncs."""
    starts: dict[str, int] = {}
    for channel, now in current.items():
        if channel in resume:
            start = resume[channel]
        else:
            start = remembered.get(channel, now)
            if page is not None:
                start = max(start, now - page)
        starts[channel] = min(start, now)
    return starts


@dataclass(frozen=True)
class _Hop:
    """How a request reached this view."""

    # Through the GRIP proxy (signed, when the proxy has a key).
    proxied: bool = False
    # The proxy's own request for a stream it holds: the session tag its
    # next link carries (see _SESSION_PARAM).
    session: str | None = None


def _keep_only_own_parameters(request: HttpRequest) -> _Hop:
    """Hide django-eventstream's proxy parameters from any request that is
    not the GRIP proxy's own, and take the user of the proxy's own requests
    from their ``es-meta`` token.

    Unsigned, or replayed through the proxy by a client, an ``es-meta``
    token (taken from a log, say) would replace the user and the channels;
    ``recover`` would read ``Grip-Last`` from a request that has none, and a
    malformed ``Grip-Last`` would answer 500.
    """
    grip = getattr(request, "grip", None)
    proxied = grip_configured() and grip is not None and bool(grip.proxied)
    own = (
        proxied
        and bool(getattr(grip, "signed", False))
        and "HTTP_GRIP_LAST" in request.META
        and request.GET.get("link") == "next"
    )
    token = request.GET.get("es-meta") if own else None
    held_session = request.GET.get(_SESSION_PARAM) if own else None
    if held_session is not None and not _SESSION_TAG.fullmatch(held_session):
        held_session = None
    # Without a key anyone can claim to be the proxy: its paging and recovery
    # still work, but no token may choose the user or the channels.
    hidden = _HIDDEN_PARAMS if proxied else _HIDDEN_PARAMS + _PAGING_PARAMS
    if any(name in request.GET for name in hidden) or proxied:
        params = request.GET.copy()
        for name in hidden:
            params.pop(name, None)
        if proxied:
            session = held_session or _session_tag(request)
            if session is not None:
                params[_SESSION_PARAM] = session
        request.GET = params  # type: ignore[assignment]
    if own:
        request.user = _user_named_by(token)
    if proxied and grip is not None:
        last = getattr(grip, "last", None) or {}
        grip.last = {c: v for c, v in last.items() if isinstance(v, str) and v.isdigit()}
    return _Hop(proxied=proxied, session=held_session)


_SESSION_TAG = re.compile(r"[0-9a-f]{32}")


def _session_tag(request: HttpRequest) -> str | None:
    key = getattr(getattr(request, "session", None), "session_key", None)
    return revocation.session_tag(key) if key else None


def _user_named_by(token: str | None) -> Any:
    """The user a valid ``es-meta`` token names, as the database says now:
    anonymous for a bad or expired token, a user that is gone or inactive."""
    import jwt

    if not token:
        return AnonymousUser()
    try:
        meta = jwt.decode(
            token,
            settings.SECRET_KEY.encode(),
            algorithms=["HS256"],
            options={"require": ["exp"]},
        )
    except jwt.InvalidTokenError:
        return AnonymousUser()
    pk = meta.get("user") if isinstance(meta, dict) else None
    if not isinstance(pk, str) or pk == "anonymous":
        return AnonymousUser()
    try:
        user = get_user_model()._default_manager.filter(pk=pk).first()
    except (ValueError, TypeError, ValidationError):
        return AnonymousUser()
    if user is None or not getattr(user, "is_active", True):
        return AnonymousUser()
    return user


def _redis_delivers() -> bool:
    return bool(getattr(configured(), "publishes_to_listeners", False))


def _parse_last_event_id(request: HttpRequest, channels: dict[str, str]) -> dict[str, int]:
    raw = request.META.get("HTTP_LAST_EVENT_ID") or request.GET.get("lastEventId") or ""
    if not raw or raw == "error":
        # "error" is the id of django-eventstream's stream-error event: an
        # EventSource reconnecting after one starts afresh (hello, resync).
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
    current: dict[str, int],
    channels: dict[str, str],
    tag: str | None,
    *,
    use_tailer: bool,
    epoch: str | None = None,
    tracker: positions.Tracker | None = None,
) -> AsyncIterator[bytes]:
    from verity_django.tailer import supervise_redis_listener, tailer

    if use_tailer:
        tailer().track(current)
    else:
        supervise_redis_listener()
    # django-eventstream re-checks AUTHORIZE in this stream's own thread on
    # every storage re-read; the storage then releases that thread's
    # database connection (see storage.streaming).
    streaming.set(True)
    subscriber = _Subscriber(
        {channels[c]: seq for c, seq in starts.items()},
        tag,
        _fetch_stored,
        epoch=epoch,
        current_epoch=_current_epoch,
    )
    first = True
    async for chunk in content:
        text = chunk.decode() if isinstance(chunk, bytes) else str(chunk)
        # Drop each chunk before waiting for the next: an idle stream must not
        # keep its last (possibly large) burst alive.
        del chunk
        if first:
            text = _after_stream_open(text, hellos)
        out = (await subscriber.rewrite(text)).encode()
        del text
        if tracker is not None:
            tracker.wrote(subscriber.delivered)
        if out:
            yield out
        del out
        if first:
            first = False
            # Under ASGI each request has a thread of its own, holding its own
            # database connection for as long as the stream lives. The stream
            # has caught up from storage now; new envelopes arrive from memory.
            await sync_to_async(_close_idle_connections)()


def _close_idle_connections() -> None:
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()


class _Subscriber:
    """What one SSE connection has received, and who its client is."""

    def __init__(
        self,
        delivered: dict[str, int],
        tag: str | None,
        fetch: Callable[[str, int, int], Awaitable[list[str]]] | None = None,
        *,
        epoch: str | None = None,
        current_epoch: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.delivered = delivered
        self.tag = tag
        self.fetch = fetch
        self.epoch = epoch
        self.current_epoch = current_epoch
        # Hashes of the latest envelopes per audience: a seq seen again with
        # the same content is a re-read; with other content, the storage
        # started over (a Redis restart without persistence).
        self.recent: dict[str, dict[int, int]] = {}

    async def rewrite(self, text: str) -> str:
        if '"type":"directives"' not in text and "event: stream-reset" not in text:
            return text
        kept: list[str] = []
        for block in text.split("\n\n"):
            if block.startswith("event: stream-reset"):
                kept.extend(self._reset(block))
                continue
            at = block.find("data: " + envelopes.HEAD)
            found = None if at < 0 else envelopes.parse(block, at + 6)
            if found is None:
                kept.append(block)
                continue
            seq, audience = found
            last = self.delivered.get(audience, 0)
            data = block[at + 6 :]
            recent = self.recent.setdefault(audience, {})
            if seq <= last:
                known = recent.get(seq)
                if known == hash(data):
                    continue
                if known is None and await self._storage_lost_its_data():
                    # Every audience counts from 1 again.
                    kept.extend(self._count_again(list(self.delivered)))
                elif known is None:
                    # An old seq handed over again (a storage re-read, the
                    # tailer): already delivered.
                    continue
                else:
                    # The same seq with other content: this audience's counter
                    # restarted below what this client holds.
                    kept.extend(self._count_again([audience]))
                    await self._storage_lost_its_data()
                last = 0
                recent = self.recent.setdefault(audience, {})
            if seq > last + 1 and self.fetch is not None:
                # django-eventstream skipped some (a Redis subscription that was
                # not live yet, an overflow): read them back from storage.
                for missing in await self.fetch(audience, last, seq):
                    kept.append(self._envelope_block("", missing, audience))
            self.delivered[audience] = seq
            recent[seq] = hash(data)
            if len(recent) > _RECENT:
                del recent[min(recent)]
            kept.append(self._envelope_block(block[:at], data, audience))
        return "\n\n".join(kept)

    def _count_again(self, audiences: list[str]) -> list[str]:
        """A hello with last_seq 0 resets the client's count; the next seq
        then shows whether it missed anything (a gap, so it resyncs) or not."""
        for audience in audiences:
            self.delivered[audience] = 0
            self.recent.pop(audience, None)
        return [envelopes.hello(audience, 0) for audience in audiences]

    async def _storage_lost_its_data(self) -> bool:
        """Whether the storage's epoch changed since this stream last looked
        (Redis restarted empty); asked only for a seq this stream delivered
        before and no longer remembers."""
        if self.current_epoch is None:
            return False
        epoch = await self.current_epoch()
        if epoch is None or epoch == self.epoch:
            return False
        self.epoch = epoch
        return True

    def _reset(self, block: str) -> list[str]:
        """django-eventstream jumped to the storage's current id on the
        channels whose seq it resumed from is gone. The Verity client ignores
        that event, so tell it with hellos, for those channels only: one to 0,
        which it takes silently, then one to the current seq, which it sees as
        a gap and resyncs. The other channels of the stream are left alone."""
        out = [block]
        lines = block.split("\n")
        ids = next((x[4:] for x in lines if x.startswith("id: ")), "")
        data = next((x[6:] for x in lines if x.startswith("data: ")), "")
        try:
            reset = set(json.loads(data).get("channels", ()))
        except (ValueError, AttributeError):
            reset = set()
        for part in ids.split(","):
            name, _, value = part.rpartition(":")
            channel = unquote(name)
            audience = audience_for(channel)
            if channel not in reset or audience not in self.delivered or not value.isdigit():
                continue
            for seq in (0, int(value)):
                out.append(envelopes.hello(audience, seq))
            self.delivered[audience] = int(value)
            self.recent.pop(audience, None)
        return out

    def _envelope_block(self, head: str, data: str, audience: str) -> str:
        return head + "data: " + envelopes.for_connection(data, self.tag)


def _storage_epoch() -> str | None:
    epoch = getattr(configured(), "epoch", None)
    return None if epoch is None else str(epoch())


async def _current_epoch() -> str | None:
    return await sync_to_async(_storage_epoch, thread_sensitive=False)()


async def _fetch_stored(audience: str, after: int, before: int) -> list[str]:
    return await sync_to_async(_stored_between, thread_sensitive=False)(audience, after, before)


def _stored_between(audience: str, after: int, before: int) -> list[str]:
    from django_eventstream.storage import EventDoesNotExist

    try:
        events = configured().get_events(channel_for(audience), after, limit=before - after - 1)
    except EventDoesNotExist:
        return []  # trimmed: the client sees the jump and resyncs
    return [e.data for e in events if int(e.id) < before]
