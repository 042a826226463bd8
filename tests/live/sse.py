"""A reference Server-Sent Events consumer for the Verity protocol.

Two layers:

- ``SSEParser``: the SSE wire format, incrementally, following the WHATWG
  "event stream interpretation" rules (LF, CR and CRLF line ends, even split
  across chunks; ``:`` comments; ``data`` lines joined with LF; ``id`` persists
  until changed; an event is dispatched at a blank line only when it has data).
- ``VerityConsumer``: what the Verity browser client does with those events
  (PROTOCOL.md section 3): hello handling, echo dropping before seq bookkeeping,
  gap detection and resyncs, skipping directives by idempotency key (5 minutes,
  2048 keys), and brand-new reconnects without Last-Event-ID.
  It also records everything a test may want to assert on: every seq
  received, duplicates, named events, HTTP statuses, errors.

``read_events()`` is the small synchronous helper for simple tests.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self, TypeGuard

import httpx

# --------------------------------------------------------------------------
# Wire format
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event. ``id`` is the last event ID, which persists across events."""

    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Incremental SSE parser: ``feed()`` bytes (or text), get complete events.

    Comment lines are not events; they are collected in ``comments`` (text
    after the colon, one leading space removed) because keep-alives may be
    comments.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._first_chunk = True
        self._event_type = ""
        self._data: list[str] = []
        self._has_data = False
        self._retry: int | None = None
        self.last_event_id = ""
        self.reconnection_time: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes | str) -> list[SSEEvent]:
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        if self._first_chunk and text:
            # A UTF-8 BOM at the very start of the stream is not part of the first line.
            text = text.removeprefix("\ufeff")
            self._first_chunk = False
        self._buffer += text
        return list(self._drain(final=False))

    def close(self) -> list[SSEEvent]:
        """End of stream: a lone trailing CR ends its line; an unterminated event is dropped."""
        self._buffer += self._decoder.decode(b"", final=True)
        return list(self._drain(final=True))

    def _drain(self, final: bool) -> Iterator[SSEEvent]:
        buffer = self._buffer
        start = 0
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                if cr + 1 == len(buffer) and not final:
                    # CR at the end of the chunk: the LF of a CRLF may be in the next one.
                    break
                line_end = cr
                next_start = cr + 2 if buffer.startswith("\n", cr + 1) else cr + 1
            else:
                line_end = lf
                next_start = lf + 1
            event = self._process_line(buffer[start:line_end])
            if event is not None:
                yield event
            start = next_start
        self._buffer = buffer[start:]

    def _process_line(self, line: str) -> SSEEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.reconnection_time = int(value)
            self._retry = int(value)
        # Any other field name is ignored, as the spec says.
        return None

    def _dispatch(self) -> SSEEvent | None:
        event: SSEEvent | None = None
        if self._has_data:
            event = SSEEvent(
                event=self._event_type or "message",
                data="\n".join(self._data),
                id=self.last_event_id,
                retry=self._retry,
            )
        self._event_type = ""
        self._data = []
        self._has_data = False
        self._retry = None
        return event


def parse_stream(chunks: Iterable[bytes | str]) -> list[SSEEvent]:
    """Parse a whole stream given as chunks (for unit tests and recorded streams)."""
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


async def iter_events(
    response: httpx.Response, parser: SSEParser | None = None
) -> AsyncIterator[SSEEvent]:
    """Events of an open streaming ``httpx`` response, as they arrive."""
    parser = parser or SSEParser()
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            yield event
    for event in parser.close():
        yield event


# --------------------------------------------------------------------------
# Simple synchronous reader
# --------------------------------------------------------------------------


class SSEHTTPError(RuntimeError):
    def __init__(self, status_code: int, body: str) -> None:
        super().__init__(f"event stream answered HTTP {status_code}: {body[:500]}")
        self.status_code = status_code
        self.body = body


def read_events(
    url: str,
    n: int,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    cookies: httpx.Cookies | Mapping[str, str] | None = None,
) -> list[SSEEvent]:
    """Open one stream, return its first ``n`` events (named ones included), close it.

    Raises ``SSEHTTPError`` for a non-200 answer and ``TimeoutError`` (listing
    what did arrive) when ``n`` events do not arrive within ``timeout`` seconds.
    A single read may overrun the deadline by up to ``timeout`` again.
    """
    deadline = time.monotonic() + timeout
    parser = SSEParser()
    events: list[SSEEvent] = []
    request_headers = {"Accept": "text/event-stream", **(headers or {})}
    with (
        httpx.Client(cookies=_as_cookies(cookies), timeout=httpx.Timeout(timeout)) as client,
        client.stream("GET", url, headers=request_headers) as response,
    ):
        if response.status_code != 200:
            response.read()
            raise SSEHTTPError(response.status_code, response.text)
        try:
            for chunk in response.iter_bytes():
                events.extend(parser.feed(chunk))
                if len(events) >= n:
                    return events[:n]
                if time.monotonic() > deadline:
                    break
        except httpx.ReadTimeout:
            pass
        events.extend(parser.close())
        if len(events) >= n:
            return events[:n]
    raise TimeoutError(f"got {len(events)} of {n} events from {url} in {timeout}s: {events!r}")


# --------------------------------------------------------------------------
# The Verity client's behaviour
# --------------------------------------------------------------------------


# How one connection attempt ended: a 200 stream that later ended ("streamed"),
# an HTTP error or wrong content type ("refused"), or no answer ("failed").
_Outcome = Literal["streamed", "refused", "failed"]

# The Verity client's idempotency memory.
IDEMPOTENCY_TTL = 5 * 60.0
IDEMPOTENCY_MAX_KEYS = 2048
OPS = frozenset({"refresh_item", "refresh_collection", "invalidate", "force_reload_page"})
# What the client did with one directive: applied it, dropped it as its own
# (a pushed directive whose source is this client), skipped it (key seen), or
# refused it (not a directive of the contract).
DirectiveOutcome = Literal["applied", "echo", "skip", "invalid"]


@dataclass(frozen=True)
class RawEvent:
    """Every event exactly as received, with the connection it arrived on."""

    connection: int
    event: SSEEvent
    at: float  # time.monotonic()


@dataclass(frozen=True)
class Hello:
    connection: int
    audience: str
    last_seq: int
    previous: int | None  # the tracked seq before this hello


@dataclass(frozen=True)
class Envelope:
    connection: int
    audience: str
    seq: int
    source: str | None
    directives: list[Any]
    raw: dict[str, Any]
    echo_dropped: bool
    # At or below the seq the client held before a hello reset its counter:
    # sent again by a replay, its directives mostly skipped by idempotency key.
    replayed: bool = False
    # Per directive, in order, once the envelope passed seq bookkeeping.
    outcomes: list[DirectiveOutcome] = field(default_factory=list)


@dataclass(frozen=True)
class Gap:
    """The client noticed missed envelopes: from a hello, or a seq jump."""

    connection: int
    audience: str
    previous: int
    seq: int
    reason: str  # "hello" or "directives"


@dataclass(frozen=True)
class Resync:
    connection: int
    audience: str
    reason: str  # "hello" or "directives"


@dataclass(frozen=True)
class Duplicate:
    """A (audience, seq) received again; ``same_content`` tells replay from seq reuse."""

    audience: str
    seq: int
    first: dict[str, Any]
    second: dict[str, Any]
    same_content: bool


@dataclass(frozen=True)
class ConsumerError:
    """Anything that is not the happy path: HTTP errors, stream errors, bad data."""

    connection: int
    kind: str  # "http", "content-type", "transport", "stream-error", "bad-json", ...
    detail: str


@dataclass
class VerityConsumer:
    """One Verity page's event connection, reconnecting like the real client.

    Use as ``async with VerityConsumer(...) as consumer:`` (runs in the
    background until the block ends), or call ``start()``/``await stop()``,
    or ``await run()`` yourself.

    ``tracked`` is the client's seq per audience. It survives reconnects, as it
    does in a page. ``received`` lists every directives seq per audience, echoes
    included, in arrival order. ``applied`` lists the directives the client
    applied, after idempotency; ``skipped`` the ones it skipped by key.
    """

    base_url: str
    audiences: Sequence[str] = ("global",)
    client_id: str = field(default_factory=lambda: f"py-{uuid.uuid4().hex[:12]}")
    cookies: httpx.Cookies | Mapping[str, str] | None = None
    path: str = "/api/events"
    headers: Mapping[str, str] | None = None
    # Exponential backoff between failed attempts; after a stream that worked, the
    # next attempt waits only initial_backoff.
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    # Keep-alives come at least every 20 s; silence for longer means a dead stream.
    read_timeout: float | None = 45.0
    # Stop reconnecting after an HTTP error answer (e.g. 403 for a forbidden audience).
    stop_on_http_error: bool = False

    tracked: dict[str, int] = field(default_factory=dict, init=False)
    received: dict[str, list[int]] = field(default_factory=dict, init=False)
    raw_events: list[RawEvent] = field(default_factory=list, init=False)
    named_events: list[RawEvent] = field(default_factory=list, init=False)
    hellos: list[Hello] = field(default_factory=list, init=False)
    envelopes: list[Envelope] = field(default_factory=list, init=False)
    echo_dropped: list[Envelope] = field(default_factory=list, init=False)
    gaps: list[Gap] = field(default_factory=list, init=False)
    resyncs: list[Resync] = field(default_factory=list, init=False)
    duplicates: list[Duplicate] = field(default_factory=list, init=False)
    errors: list[ConsumerError] = field(default_factory=list, init=False)
    applied: list[Any] = field(default_factory=list, init=False)
    skipped: list[Any] = field(default_factory=list, init=False)
    replayed: list[Envelope] = field(default_factory=list, init=False)
    status_codes: list[int] = field(default_factory=list, init=False)
    comments: list[str] = field(default_factory=list, init=False)
    connections: int = field(default=0, init=False)  # attempts so far
    connected: bool = field(default=False, init=False)  # a 200 stream is open now

    def __post_init__(self) -> None:
        # The idempotency memory's clock; the protocol vectors set their own.
        self.clock: Callable[[], float] = time.monotonic
        self._seen: dict[tuple[str, int], dict[str, Any]] = {}
        # idempotency_key -> when first seen (monotonic); insertion order is age.
        self._keys: dict[str, float] = {}
        # Per audience, the seq held before a lower hello: envelopes up to it are replays.
        self._replay_until: dict[str, int] = {}
        self._changed = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._connection_task: asyncio.Task[_Outcome] | None = None

    # -- URL -----------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.path

    @property
    def params(self) -> httpx.QueryParams:
        return httpx.QueryParams({"client_id": self.client_id, "audience": list(self.audiences)})

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run in the background on the current event loop."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self.run())
        return self._task

    async def stop(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False

    async def drop_connection(self) -> None:
        """Close the current stream, as a network failure would; ``run()`` reconnects."""
        task = self._connection_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def run(self) -> None:
        """Connect, read until the stream ends, back off, reconnect; until ``stop()``."""
        backoff = self.initial_backoff
        timeout = httpx.Timeout(10.0, read=self.read_timeout)
        async with httpx.AsyncClient(cookies=_as_cookies(self.cookies), timeout=timeout) as client:
            while not self._stopping:
                # Each connection is its own task so drop_connection() can cancel it
                # without cancelling run() (asyncio.wait does not propagate it).
                self._connection_task = asyncio.create_task(self._connect_once(client))
                try:
                    await asyncio.wait({self._connection_task})
                finally:
                    if not self._connection_task.done():
                        self._connection_task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await self._connection_task
                task, self._connection_task = self._connection_task, None
                outcome = "streamed" if task.cancelled() else task.result()
                if self._stopping or (outcome == "refused" and self.stop_on_http_error):
                    return
                if outcome == "streamed":
                    backoff = self.initial_backoff
                else:
                    backoff = min(backoff * 2, self.max_backoff)
                await asyncio.sleep(backoff)

    async def _connect_once(self, client: httpx.AsyncClient) -> _Outcome:
        """One brand-new connection (no Last-Event-ID), read until it ends."""
        self.connections += 1
        connection = self.connections
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        headers.update(self.headers or {})
        outcome: _Outcome = "failed"
        try:
            async with client.stream("GET", self.url, params=self.params, headers=headers) as rsp:
                self.status_codes.append(rsp.status_code)
                self._notify()
                if rsp.status_code != 200:
                    body = (await rsp.aread()).decode(errors="replace")
                    self._error(connection, "http", f"{rsp.status_code}: {body[:500]}")
                    return "refused"
                content_type = rsp.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    # EventSource fails the connection on any other content type.
                    self._error(connection, "content-type", content_type)
                    return "refused"
                self.connected = True
                outcome = "streamed"
                parser = SSEParser()
                async for event in iter_events(rsp, parser):
                    self._handle_event(connection, event)
                    self._take_comments(parser)
                self._take_comments(parser)
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if not self._stopping:
                self._error(connection, "transport", f"{type(exc).__name__}: {exc}")
        finally:
            self.connected = False
            self._notify()
        return outcome

    # -- the client's rules (PROTOCOL.md section 3) --------------------------

    def _handle_event(self, connection: int, event: SSEEvent) -> None:
        self.raw_events.append(RawEvent(connection, event, time.monotonic()))
        if event.event != "message":
            # The Verity client ignores named events; keep them for assertions.
            self.named_events.append(self.raw_events[-1])
            if event.event == "stream-error":
                self._error(connection, "stream-error", event.data)
            self._notify()
            return
        try:
            payload = json.loads(event.data)
        except ValueError:
            self._error(connection, "bad-json", event.data[:500])
            return
        if not isinstance(payload, dict):
            self._error(connection, "bad-envelope", event.data[:500])
            return
        audience = payload.get("audience")
        if isinstance(audience, str) and audience not in self.audiences:
            # Authorization bug: bytes of an audience this connection did not ask for.
            self._error(connection, "foreign-audience", event.data[:500])
        kind = payload.get("type")
        if kind == "hello":
            self._on_hello(connection, payload)
        elif kind == "directives":
            self._on_directives(connection, payload)
        else:
            self._error(connection, "unknown-envelope", event.data[:500])
        self._notify()

    def _on_hello(self, connection: int, payload: dict[str, Any]) -> None:
        audience, last_seq = payload.get("audience"), payload.get("last_seq")
        if not isinstance(audience, str) or not _is_int(last_seq):
            self._error(connection, "bad-hello", json.dumps(payload))
            return
        previous = self.tracked.get(audience)
        self.hellos.append(Hello(connection, audience, last_seq, previous))
        if previous is not None and last_seq > previous:
            # Missed envelopes while away: the client resyncs and catches up.
            self.gaps.append(Gap(connection, audience, previous, last_seq, "hello"))
            self.resyncs.append(Resync(connection, audience, "hello"))
        if previous is not None and last_seq < previous:
            self._replay_until[audience] = max(previous, self._replay_until.get(audience, 0))
        # Higher: caught up by the resync. Lower (server restarted with memory-only
        # counters): silently reset. Untracked: start from here.
        self.tracked[audience] = last_seq

    def _on_directives(self, connection: int, payload: dict[str, Any]) -> None:
        audience, seq = payload.get("audience"), payload.get("seq")
        directives = payload.get("directives")
        source = payload.get("source")
        if not isinstance(audience, str) or not _is_int(seq) or not isinstance(directives, list):
            self._error(connection, "bad-directives", json.dumps(payload))
            return
        echo = source is not None and source == self.client_id
        envelope = Envelope(
            connection,
            audience,
            seq,
            source if isinstance(source, str) else None,
            directives,
            payload,
            echo,
            seq <= self._replay_until.get(audience, 0),
        )
        self.envelopes.append(envelope)
        if envelope.replayed:
            self.replayed.append(envelope)
        self.received.setdefault(audience, []).append(seq)
        first = self._seen.get((audience, seq))
        if first is None:
            self._seen[(audience, seq)] = payload
        else:
            self.duplicates.append(Duplicate(audience, seq, first, payload, first == payload))
        if echo:
            # Dropped before seq bookkeeping: the next foreign envelope looks like a gap.
            self.echo_dropped.append(envelope)
            return
        previous = self.tracked.get(audience)
        if previous is not None and seq > previous + 1:
            self.gaps.append(Gap(connection, audience, previous, seq, "directives"))
            self.resyncs.append(Resync(connection, audience, "directives"))
        self.tracked[audience] = seq if previous is None else max(previous, seq)
        envelope.outcomes.extend(self._apply(directive, pushed=True) for directive in directives)

    def feed(self, connection: int, event: SSEEvent) -> None:
        """Handle one SSE event as if it arrived on ``connection``."""
        self._handle_event(connection, event)

    def pulled(self, directives: list[Any]) -> list[DirectiveOutcome]:
        """Apply a mutation response's directives, as the page does with
        ``DL.applyDirectives``: their keys then count for the pushed copies."""
        return [self._apply(directive, pushed=False) for directive in directives]

    def _apply(self, directive: Any, *, pushed: bool) -> DirectiveOutcome:
        if not isinstance(directive, dict) or directive.get("op") not in OPS:
            return "invalid"
        op = directive["op"]
        # A pulled directive names this client as its source because this
        # client caused it; a pushed one is this client's own echo.
        if pushed and op != "force_reload_page" and directive.get("source") == self.client_id:
            return "echo"
        key = directive.get("idempotency_key")
        if key is not None and self._key_seen(str(key)):
            self.skipped.append(directive)
            return "skip"
        if op == "invalidate":
            targets = directive.get("targets")
            outcomes = [self._apply(t, pushed=pushed) for t in targets or []]
            if not isinstance(targets, list) or "applied" not in outcomes:
                return "skip" if isinstance(targets, list) and targets else "invalid"
        self.applied.append(directive)
        return "applied"

    def _key_seen(self, key: str) -> bool:
        now = self.clock()
        for old, at in list(self._keys.items()):
            if now - at <= IDEMPOTENCY_TTL:
                break
            del self._keys[old]
        if key in self._keys:
            return True
        self._keys[key] = now
        # The oldest go first once more than the client keeps are seen.
        while len(self._keys) > IDEMPOTENCY_MAX_KEYS:
            del self._keys[next(iter(self._keys))]
        return False

    # -- recording -----------------------------------------------------------

    def _error(self, connection: int, kind: str, detail: str) -> None:
        self.errors.append(ConsumerError(connection, kind, detail))
        self._notify()

    def _take_comments(self, parser: SSEParser) -> None:
        if parser.comments:
            self.comments.extend(parser.comments)
            parser.comments.clear()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()

    @property
    def directives(self) -> list[Any]:
        """Every directive applied (echoes excluded), in order."""
        return [d for env in self.envelopes if not env.echo_dropped for d in env.directives]

    def hellos_on(self, connection: int) -> list[Hello]:
        return [hello for hello in self.hellos if hello.connection == connection]

    async def wait_for(
        self, predicate: Callable[[VerityConsumer], bool], timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` is true; ``TimeoutError`` with a summary if not."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s; {self.summary()}")
            # No await between the check and clear(), so no change can slip through.
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
            if self._task is not None and self._task.done() and not predicate(self):
                self._task.result()  # re-raise a crash in run() instead of timing out

    def summary(self) -> str:
        return (
            f"client_id={self.client_id} connections={self.connections} "
            f"status_codes={self.status_codes} tracked={self.tracked} "
            f"received={self.received} gaps={self.gaps} "
            f"duplicates={[(d.audience, d.seq) for d in self.duplicates]} "
            f"echo_dropped={[(e.audience, e.seq) for e in self.echo_dropped]} "
            f"errors={self.errors} named={[r.event.event for r in self.named_events]}"
        )


def _as_cookies(cookies: httpx.Cookies | Mapping[str, str] | None) -> httpx.Cookies:
    if isinstance(cookies, httpx.Cookies):
        return cookies
    return httpx.Cookies(dict(cookies or {}))


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false are bools, which Python also counts as ints.
    return isinstance(value, int) and not isinstance(value, bool)
