"""Cut live streams when access is revoked, in every process.

django-eventstream's ``channel_permission_changed`` only reaches listeners of
the process that calls it: from a shell, a Celery task or another worker it
cuts nothing. Here a revocation is *recorded* instead, as an event on a
storage channel of its own (``verity:revocations``; no audience can name it),
so it shares the envelopes' storage, ids, ordering and retention. Every
server process that holds streams runs one *watcher* task that reads new
revocations and cuts the matching streams:

- woken through Redis pub/sub when ``EVENTSTREAM_REDIS`` is set (and reading
  the storage every few seconds anyway, in case a message was lost);
- otherwise reading the storage every ``POLL_INTERVAL`` seconds, only while
  this process has streams open.

Which streams a revocation cuts: every stream opened *before* it was
recorded. A stream notes, when it opens, the last revocation id this process
knows of (or, when no watcher runs yet, the storage's); every later id
applies to it. A revocation recorded just before a stream opened may
therefore cut that stream too: the client reconnects and is authorized
afresh, which is the safe side to err on.

A cut stream ends with ``event: stream-error`` (condition ``forbidden``)
and no ``id:``, so a reconnecting ``EventSource`` resumes from the last
envelope it received, and is authorized again.

Behind a GRIP proxy (Pushpin) no server process holds the streams, so none of
the above reaches them. Each held stream is therefore also subscribed to
*control channels* (:func:`held_channels`): one of its user, one of its
session, and one every held stream shares. Their names are HMACs under
``SECRET_KEY`` (``verity-cut.<hex>``): no client can guess one, and none
starts with django-eventstream's ``events-``, so no audience can name one.
A revocation publishes that same ``stream-error`` and then GRIP's
``http-stream`` close action to the matching control channel; an audience is
matched by Pushpin's ``require-sub`` filter (only streams also subscribed to
that audience's channel are cut).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.http import HttpRequest
from django.utils.crypto import salted_hmac

from verity_django import directives as d
from verity_django.audiences import can_read, validate_audience
from verity_django.conf import conf
from verity_django.outages import Outage
from verity_django.subscriptions import Subscription, within

logger = logging.getLogger(__name__)

CHANNEL = "verity:revocations"
PUBSUB_CHANNEL = "verity:revocations"
EVENT_TYPE = "revoke"
# Storage and Redis calls made for revocations give up after this long.
TIMEOUT = 5.0
# With pub/sub, the storage is still read this often in case a message was lost.
_SAFETY_INTERVAL = 5.0
_PAGE = 100
_HISTORY = 1000
T = TypeVar("T")


@dataclass
class Counters:
    revocations_recorded: int = 0
    revocations_failed: int = 0
    streams_cut: int = 0
    # Revocations handed to the GRIP proxy, and those it could not be told of.
    grip_cuts_sent: int = 0
    grip_cuts_failed: int = 0


counters = Counters()
_counters_lock = threading.Lock()


def _count(name: str, n: int = 1) -> None:
    with _counters_lock:
        setattr(counters, name, getattr(counters, name) + n)


# --------------------------------------------------------------------------
# Recording a revocation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Revocation:
    id: int
    user: str | None
    audience: str | None
    session: str | None

    def matches(self, stream: Stream) -> bool:
        return (
            (self.user is None or self.user == stream.user)
            and (self.audience is None or self.audience in stream.audiences)
            and (self.session is None or self.session == stream.session)
        )

    @classmethod
    def from_event(cls, event: Any) -> Revocation | None:
        try:
            data = json.loads(event.data)
            return cls(
                int(event.id), _text(data.get("user")), data.get("audience"), data.get("session")
            )
        except (TypeError, ValueError, AttributeError):
            logger.error("verity_django: unreadable revocation %s: %r", event.id, event.data)
            return None


def revoke(user: Any = None, audience: str | None = None, *, using: str | None = None) -> None:
    """End the live streams of ``user`` (a user or its pk) in every process:
    those carrying ``audience``, or all of them. ``revoke(audience=A)`` ends
    every user's streams of ``A``.

    Call it after the change that takes the access away; inside a
    transaction it takes effect when that transaction commits, so that a
    client reconnecting at once is authorized against the committed state.
    Raises when the revocation could not be recorded, or handed to the GRIP
    proxy when one is configured (the error is also logged and counted),
    since streams of other processes, or those the proxy holds, would then go
    on.
    """
    user_key = _user_key(user)
    if audience is not None:
        validate_audience(audience)
    if user_key is None and audience is None:
        raise ValueError("revoke() needs a user, an audience, or both")
    _on_commit(partial(_record, user_key, audience, None), using)


def _on_logout(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    """A logout ends the streams of that session, and never fails the logout."""
    session = getattr(getattr(request, "session", None), "session_key", None)
    if not session:
        return
    # A failure is logged and counted already; the session ends either way.
    with contextlib.suppress(Exception):
        _record(None, None, session_tag(session))


def connect_signals() -> None:
    user_logged_out.connect(_on_logout, dispatch_uid="verity_django.revocation.logout")


def session_tag(session_key: str) -> str:
    """What identifies a session in storage, which is not the key itself."""
    return salted_hmac("verity_django.revocation.session", session_key).hexdigest()[:32]


def _record(user: str | None, audience: str | None, session: str | None) -> None:
    # Streams of this process end at once; the watchers of all the others
    # (and this one's, for streams still opening) read it back.
    cut_now(Revocation(0, user, audience, session))
    tail = "," + d.dumps({"user": user, "audience": audience, "session": session})[1:]
    try:
        from verity_django.storage import configured as storage

        storage().append_sequenced(CHANNEL, EVENT_TYPE, '{"id":', tail)
    except Exception:
        _count("revocations_failed")
        logger.exception(
            "verity_django: could not record the revocation of user %s, audience %s; "
            "streams of other processes go on",
            user,
            audience,
        )
        raise
    _count("revocations_recorded")
    _wake_other_processes()
    _cut_held_streams(user, audience, session)


def _wake_other_processes() -> None:
    if _redis_settings() is None:
        return
    try:
        _sync_redis().publish(PUBSUB_CHANNEL, "1")
    except Exception as exc:
        # Recorded already: the watchers read the storage within seconds anyway.
        logger.warning("verity_django: could not wake other processes for a revocation: %s", exc)


# --------------------------------------------------------------------------
# Streams a GRIP proxy holds
# --------------------------------------------------------------------------

GRIP_CHANNEL_PREFIX = "verity-cut."
_EVERY_STREAM = "every-stream"


def grip_channel(subject: str) -> str:
    """The control channel of a user (``user:<pk>``), a session
    (``session:<tag>``) or of every held stream."""
    digest = salted_hmac("verity_django.revocation.grip", subject).hexdigest()[:32]
    return GRIP_CHANNEL_PREFIX + digest


def held_channels(stream: Stream) -> list[tuple[str, bool]]:
    """The control channels a GRIP-held stream subscribes to, each with
    whether it needs Pushpin's ``require-sub`` filter (cuts of one audience)."""
    out = [(grip_channel(_EVERY_STREAM), True)]
    if stream.user is not None:
        out.append((grip_channel(f"user:{stream.user}"), True))
    if stream.session is not None:
        out.append((grip_channel(f"session:{stream.session}"), False))
    return out


def _cut_held_streams(user: str | None, audience: str | None, session: str | None) -> None:
    """Tell the GRIP proxy to cut the streams it holds that match; outside
    any lock, one bounded try per publish (``GRIP_TIMEOUT``)."""
    from verity_django.publishing import grip_configured

    if not grip_configured():
        return
    if session is not None:
        subject = f"session:{session}"
    elif user is not None:
        subject = f"user:{user}"
    else:
        subject = _EVERY_STREAM
    meta = {} if audience is None else {"require_sub": _grip_audience_channel(audience)}
    audiences = frozenset(() if audience is None else (audience,))
    try:
        _publish_cut(grip_channel(subject), meta, audiences)
    except Exception:
        _count("grip_cuts_failed")
        logger.exception(
            "verity_django: could not hand the revocation of user %s, audience %s to the "
            "GRIP proxy; the streams it holds go on",
            user,
            audience,
        )
        raise
    _count("grip_cuts_sent")


def _grip_audience_channel(audience: str) -> str:
    """The GRIP channel django-eventstream subscribes a held stream of
    ``audience`` to, as Pushpin's ``require-sub`` filter compares it."""
    from urllib.parse import quote

    from verity_django.audiences import channel_for

    prefix = getattr(settings, "GRIP_PREFIX", "")
    return f"{prefix}events-{quote(channel_for(audience))}"


def _publish_cut(channel: str, meta: dict[str, str], audiences: frozenset[str]) -> None:
    from gripcontrol import HttpStreamFormat

    from verity_django.publishing import publish_to_grip

    # Two publishes, in order: what a direct stream's cut sends, then the end.
    event = cut_event_text("Access to this stream was revoked.", audiences)
    publish_to_grip(channel, HttpStreamFormat(event), meta)
    publish_to_grip(channel, HttpStreamFormat(close=True), meta)


def _on_commit(func: Callable[[], None], using: str | None) -> None:
    connection = connections[using or DEFAULT_DB_ALIAS]
    if connection.in_atomic_block:
        transaction.on_commit(func, using=using)
    else:
        func()


def _user_key(user: Any) -> str | None:
    if user is None:
        return None
    pk = getattr(user, "pk", user)
    if pk is None or isinstance(pk, bool):
        raise ValueError("revoke() needs a saved user or its primary key")
    return str(pk)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _read_failures() -> tuple[type[BaseException], ...]:
    from verity_django.storage import configured as storage

    failures = storage().failures
    if _redis_settings() is None:
        return failures
    import redis

    return (*failures, redis.RedisError)


def _redis_settings() -> dict[str, Any] | None:
    found = getattr(settings, "EVENTSTREAM_REDIS", None)
    return found if isinstance(found, dict) else None


_redis_clients: dict[str, Any] = {}
_redis_lock = threading.Lock()


def _sync_redis() -> Any:
    """The client that wakes other processes: ``REDIS_TIMEOUT`` and one try,
    like the storage's. redis-py's default retries made a ``revoke()`` or a
    logout wait about a minute for a Redis that never answers."""
    import redis

    from verity_django.storage import bounded_redis

    details = _redis_settings() or {}
    key = repr((conf.REDIS_TIMEOUT, sorted(details.items())))
    with _redis_lock:
        client = _redis_clients.get(key)
        if client is None:
            client = redis.Redis(**bounded_redis(dict(details)))
            _redis_clients[key] = client
    return client


# --------------------------------------------------------------------------
# Streams of this process
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    """One live SSE connection, as revocations and re-checks see it."""

    user: str | None
    session: str | None
    audiences: frozenset[str]
    # The last revocation id known when the stream was authorized.
    mark: int
    requester: Any = None
    session_key: str | None = None
    checked_at: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None
    task: asyncio.Task[Any] | None = None
    waiting: bool = False
    interrupted: bool = False
    reason: str = ""

    def end(self, reason: str) -> None:
        """Cut the stream, from any thread."""
        if self.reason or self.loop is None:
            return
        self.reason = reason
        _count("streams_cut")
        with contextlib.suppress(RuntimeError):  # its loop has closed: nothing to cut
            self.loop.call_soon_threadsafe(self.interrupt)

    def interrupt(self) -> None:
        """On the stream's loop: stop its wait for the next event. Cancelling
        the task only while it waits there (never while the server sends a
        chunk) spares every chunk the cost of racing it against the cut."""
        if self.waiting and self.task is not None and not self.interrupted:
            self.interrupted = True
            self.task.cancel()


def opened(
    request: HttpRequest, audiences: list[str], *, held_session: str | None = None
) -> Stream:
    """Note a stream about to start, before django-eventstream authorizes it
    (it asks AUTHORIZE again when the stream starts, after this).

    ``held_session`` is the session tag of a GRIP-held stream whose request
    comes from the proxy itself and carries no session (a recovery)."""
    user = getattr(request, "user", None)
    authenticated = bool(getattr(user, "is_authenticated", False))
    session_key = getattr(getattr(request, "session", None), "session_key", None) or None
    tag = held_session if session_key is None else session_tag(session_key)
    return Stream(
        user=str(user.pk) if authenticated and user is not None else None,
        session=tag,
        audiences=frozenset(audiences),
        mark=_mark(),
        requester=user,
        session_key=session_key,
    )


async def guard(stream: Stream, content: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``content`` until the stream is revoked, then a ``stream-error`` event."""
    stream.loop = asyncio.get_running_loop()
    stream.task = asyncio.current_task()
    watcher = _watcher(stream.loop)
    watcher.register(stream)
    source = aiter(content)
    try:
        while not stream.reason:
            # A cut while this waits for the next event interrupts the wait
            # (see Stream.interrupt); one between events ends the loop.
            stream.waiting = True
            try:
                data = await anext(source)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not (stream.interrupted and _uncancel(stream.task)):
                    raise
                break
            finally:
                stream.waiting = False
            yield data
        yield _cut_event(stream).encode()
    finally:
        watcher.unregister(stream)
        close = getattr(source, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _uncancel(task: asyncio.Task[Any] | None) -> bool:
    """Take back our own cancellation; False when someone else's is pending
    too (the client went away), which must go on."""
    return task is not None and task.uncancel() == 0


def _cut_event(stream: Stream) -> str:
    return cut_event_text(stream.reason or "Access to this stream was revoked.", stream.audiences)


def cut_event_text(text: str, audiences: frozenset[str]) -> str:
    from verity_django.audiences import channel_for

    data = {
        "condition": "forbidden",
        "text": text,
        "channels": sorted(channel_for(a) for a in audiences),
    }
    # No id line: a reconnecting EventSource resumes from its last envelope.
    return f"event: stream-error\ndata: {d.dumps(data)}\n\n"


def cut_now(revocation: Revocation) -> None:
    """Apply a revocation to this process's open streams, from any thread."""
    current = _current
    if current is not None:
        current.apply([revocation], every_stream=True)


# --------------------------------------------------------------------------
# The watcher: one task per process (per event loop), only while streams are open
# --------------------------------------------------------------------------


class Watcher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.streams: set[Stream] = set()
        # The last revocation id applied; None while no task runs.
        self.position: int | None = None
        # Revocations applied lately, for streams that open meanwhile.
        self.history: collections.deque[Revocation] = collections.deque(maxlen=_HISTORY)
        self.task: asyncio.Task[None] | None = None
        # Kept while no stream is open: the next read that works ends it.
        self.outage = Outage(logger, "reading revocations", _read_failures)

    def known_position(self) -> int | None:
        with self.lock:
            return self.position if self._running() else None

    def _running(self) -> bool:
        # A task cancelled with its loop (a server shutting down) reads nothing.
        return self.task is not None and not self.task.done()

    def register(self, stream: Stream) -> None:
        missed: list[Revocation] = []
        lost = False
        with self.lock:
            if self.position is None or not self._running():
                self.position = stream.mark
                self.history.clear()
            elif stream.mark < self.position:
                missed = [r for r in self.history if r.id > stream.mark]
                oldest = self.history[0].id if self.history else self.position + 1
                lost = oldest > stream.mark + 1
            self.streams.add(stream)
            if not self._running():
                self.task = self.loop.create_task(self._run(), name="verity-revocations")
        if lost:
            stream.end("Access may have been revoked while this stream opened.")
        for revocation in missed:
            if revocation.matches(stream):
                stream.end("Access to this stream was revoked.")

    def unregister(self, stream: Stream) -> None:
        with self.lock:
            self.streams.discard(stream)

    def apply(self, revocations: list[Revocation], *, every_stream: bool = False) -> None:
        with self.lock:
            streams = list(self.streams)
            if not every_stream:
                self.history.extend(revocations)
        for revocation in revocations:
            for stream in streams:
                if (every_stream or revocation.id > stream.mark) and revocation.matches(stream):
                    stream.end("Access to this stream was revoked.")

    def _idle(self) -> bool:
        """True, and the task forgets its state, when no stream is left."""
        with self.lock:
            if self.streams:
                return False
            self.task = None
            self.position = None
            self.history.clear()
            return True

    async def _run(self) -> None:
        backoff = conf.POLL_INTERVAL
        while not self._idle():
            try:
                if _redis_settings() is not None:
                    await self._follow_pubsub()
                else:
                    await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.outage.failed(exc)
                if self.outage.failures == 1:
                    backoff = conf.POLL_INTERVAL
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _SAFETY_INTERVAL)

    async def _poll(self) -> None:
        while self.streams:
            await self._step()
            await asyncio.sleep(conf.POLL_INTERVAL)

    async def _follow_pubsub(self) -> None:
        details = _redis_settings() or {}
        async with Subscription(details, PUBSUB_CHANNEL, timeout=TIMEOUT) as subscription:
            # Subscribed first: whatever is recorded from now on wakes us.
            await self._step()
            wait = min(_SAFETY_INTERVAL, conf.REAUTHORIZE_INTERVAL or _SAFETY_INTERVAL)
            while self.streams:
                await subscription.message(wait)
                await self._step()

    async def _step(self) -> None:
        await self._catch_up()
        if conf.REAUTHORIZE_INTERVAL:
            await self._reauthorize()
        self.outage.worked()

    async def _catch_up(self) -> None:
        while True:
            with self.lock:
                position = self.position
            if position is None:
                return
            events, restart_at = await self._in_thread(_revocations_after, position)
            if restart_at is not None:
                # Trimmed, or the storage started over: whatever was revoked
                # meanwhile is unknown, so every stream is cut and reconnects.
                logger.warning(
                    "verity_django: revocations after %s are gone; cutting every stream", position
                )
                with self.lock:
                    streams = list(self.streams)
                    self.position = restart_at
                    self.history.clear()
                for stream in streams:
                    stream.end("Access may have been revoked; please reconnect.")
                return
            if not events:
                return
            found = [r for r in map(Revocation.from_event, events) if r is not None]
            with self.lock:
                self.position = max(position, int(events[-1].id))
            self.apply(found)
            if len(events) < _PAGE:
                return

    async def _reauthorize(self) -> None:
        interval = conf.REAUTHORIZE_INTERVAL
        assert interval
        now = time.monotonic()
        with self.lock:
            due = [s for s in self.streams if not s.reason and now - s.checked_at >= interval]
        if not due:
            return
        denied = await self._in_thread(_no_longer_allowed, due)
        for stream in due:
            stream.checked_at = now
        for stream in denied:
            stream.end("Access to this stream is no longer allowed.")

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        future = self.loop.run_in_executor(_executor(), func, *args)
        return await within(TIMEOUT, future)


_current_lock = threading.Lock()
_thread: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """One thread for every watcher's storage reads and re-checks: a read
    that outlives its timeout delays the next instead of piling up threads."""
    global _thread
    with _current_lock:
        if _thread is None:
            _thread = ThreadPoolExecutor(1, thread_name_prefix="verity-revocations")
        return _thread


_current: Watcher | None = None


def _watcher(loop: asyncio.AbstractEventLoop) -> Watcher:
    global _current
    with _current_lock:
        if _current is None or _current.loop is not loop:
            _current = Watcher(loop)
        return _current


def _mark() -> int:
    current = _current
    if current is not None and not current.loop.is_closed():
        known = current.known_position()
        if known is not None:
            return known
    return _stored_position()


def _stored_position() -> int:
    from verity_django.storage import configured as storage

    return int(storage().get_current_ids([CHANNEL])[CHANNEL])


def _revocations_after(position: int) -> tuple[list[Any], int | None]:
    from django_eventstream.storage import EventDoesNotExist

    from verity_django.storage import configured as storage

    try:
        return list(storage().get_events(CHANNEL, position, limit=_PAGE)), None
    except EventDoesNotExist as exc:
        return [], int(exc.current_id)


def _no_longer_allowed(streams: list[Stream]) -> list[Stream]:
    """The streams whose requester, as their session says now, may no longer
    read every audience (logged out elsewhere, password changed, deactivated,
    or AUTHORIZE says no)."""
    answers: dict[tuple[Any, str], bool] = {}
    denied: list[Stream] = []
    try:
        for stream in streams:
            user = _requester_now(stream)
            now_key = str(user.pk) if getattr(user, "is_authenticated", False) else None
            if now_key != stream.user:
                denied.append(stream)
                continue
            for audience in sorted(stream.audiences):
                key = (now_key, audience)
                if key not in answers:
                    answers[key] = can_read(user, audience)
                if not answers[key]:
                    denied.append(stream)
                    break
    finally:
        # This thread runs between long pauses: hold no connection meanwhile.
        connections.close_all()
    return denied


def _requester_now(stream: Stream) -> Any:
    """The stream's user as its session says now: anonymous once the session
    is gone or no longer valid (a password change, a deactivated user)."""
    if stream.session_key is None or stream.user is None:
        return stream.requester
    from importlib import import_module

    from django.contrib.auth import get_user

    engine = import_module(settings.SESSION_ENGINE)
    holder = _SessionHolder(engine.SessionStore(session_key=stream.session_key))
    return get_user(holder)  # type: ignore[arg-type]


class _SessionHolder:
    """What ``django.contrib.auth.get_user`` needs of a request."""

    def __init__(self, session: Any) -> None:
        self.session = session
