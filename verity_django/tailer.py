"""Wake this process's SSE listeners for every stored envelope, in seq order,
whichever process stored it.

django-eventstream's default in-process delivery only sees ``send_event``
calls made in the same process, and queues them in the order threads happen
to reach it. Without Redis pub/sub, each server process instead runs one
*tailer* task on its event loop. It follows the storage for the channels
that have listeners here and hands their events to django-eventstream's
listener manager strictly by id:

- an envelope published in this process is offered directly and dispatched
  at once when it is the next id;
- anything else (another process, a management command, a shell, a Celery
  worker, or an offer that arrived out of order) is read back from storage:
  one query for all channels at least every ``POLL_INTERVAL`` seconds,
  however many local offers arrive meanwhile. What that query finds is read
  back once it has waited ``_OFFER_GRACE`` (0.1 s) for an offer of its own,
  so an envelope stored here is not read back just because the poll ran
  between its commit and its offer.

A position only ever moves forward. A new stream reads what it needs before
the tailer's position from storage itself (from its ``Last-Event-ID`` or its
hello), so no client's request can make the tailer re-dispatch history.

With ``EVENTSTREAM_REDIS`` set, a Redis subscription delivers instead
(:func:`supervise_redis_listener`), and no tailer runs.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django_eventstream.event import Event

from verity_django.conf import conf
from verity_django.outages import Outage
from verity_django.readers import readers
from verity_django.storage import PUBSUB_CHANNEL, configured
from verity_django.subscriptions import Subscription

logger = logging.getLogger(__name__)

_PAGE = 100
# How long an envelope stored here may wait for its own offer (see
# Tailer._note_ahead).
_OFFER_GRACE = 0.1
T = TypeVar("T")


class Tailer:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.positions: dict[str, int] = {}
        self._offers: list[tuple[str, Event]] = []
        # Offers from other threads, moved to _offers by one loop callback
        # per burst (each call_soon_threadsafe writes to the loop's wake-up
        # socket: bench W5's concurrent requests offer while one is pending).
        self._incoming: collections.deque[tuple[str, Event]] = collections.deque()
        self._take_scheduled = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._polled = 0.0
        self._poll_due = True
        # Channels found behind storage: the id they must reach, and since when.
        self._ahead: dict[str, tuple[int, float]] = {}
        # The streams' reader threads: no database connection of its own.
        self._executor = readers()

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self._executor, func, *args)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self._run(), name="verity-tailer")
            if self._ticker is not None:
                self._ticker.cancel()
            self._tick()

    def _tick(self) -> None:
        # One timer per poll interval rather than a timeout around every
        # wait: local offers wake the task for every envelope (bench W5).
        if self._task is None or self._task.done():
            return
        self._poll_due = True
        self._wake.set()
        self._ticker = self.loop.call_later(conf.POLL_INTERVAL, self._tick)

    def track(self, current: dict[str, int]) -> None:
        """Follow channels a new listener reads, from the storage's current ids
        as the listener's view read them.

        A channel already followed keeps its position: the new stream reads
        from storage whatever lies before it (django-eventstream registers the
        listener before that read, so nothing falls between the two).
        """
        for channel, seq in current.items():
            self.positions.setdefault(channel, seq)
        self.start()

    def offer_threadsafe(self, channel: str, event: Event) -> None:
        # Appended before the flag is read, and the flag cleared before the
        # take drains: an offer either finds a take still to drain it or
        # schedules one.
        self._incoming.append((channel, event))
        if not self._take_scheduled:
            self._take_scheduled = True
            self.loop.call_soon_threadsafe(self._take_incoming)

    def _take_incoming(self) -> None:
        self._take_scheduled = False
        incoming = self._incoming
        while incoming:
            self._offers.append(incoming.popleft())
        self._wake.set()

    def _offer(self, channel: str, event: Event) -> None:
        self._offers.append((channel, event))
        self._wake.set()

    async def _run(self) -> None:
        outage = Outage(logger, "delivery from storage", lambda: configured().failures)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._step()
            except Exception as exc:
                outage.failed(exc)
                await asyncio.sleep(conf.POLL_INTERVAL)
            else:
                outage.worked()

    async def _step(self) -> None:
        active = self._active_channels()
        for channel in list(self.positions):
            if channel not in active:
                del self.positions[channel]
        offers, self._offers = self._offers, []
        behind: set[str] = set()
        for channel, event in offers:
            position = self.positions.get(channel)
            if position is None:
                continue
            event_id = int(event.id)
            if event_id == position + 1:
                self._dispatch(channel, [event])
            elif event_id > position + 1:
                behind.add(channel)
        now = time.monotonic()
        if self._poll_due or behind or now - self._polled >= conf.POLL_INTERVAL:
            # Other processes' envelopes are only found by asking storage.
            self._poll_due = False
            self._polled = now
            self._note_ahead(await self._stored_ahead(), now)
        behind |= self._overdue(now)
        for channel in behind:
            await self._catch_up(channel)

    async def _stored_ahead(self) -> dict[str, int]:
        """The channels whose storage holds more than was dispatched, with
        the id it has reached."""
        channels = list(self.positions)
        if not channels:
            return {}
        current = await self._in_thread(_current_ids, channels)
        return {c: current[c] for c in channels if current.get(c, 0) > self.positions.get(c, 0)}

    def _note_ahead(self, ahead: dict[str, int], now: float) -> None:
        """Remember since when each channel of ``ahead`` is behind storage.

        An envelope this process stored is ahead of its channel's position
        only until its own offer arrives, which under load can come after
        the poll: reading it back then is a query for nothing (bench W5: one
        request in eight). So a channel is read back only once it has stayed
        behind for ``_OFFER_GRACE`` (:meth:`_overdue`): other processes'
        envelopes arrive within ``POLL_INTERVAL`` plus that.
        """
        for channel, reached in ahead.items():
            seen = self._ahead.get(channel)
            if seen is None or seen[0] <= self.positions.get(channel, 0):
                self._ahead[channel] = (reached, now)
                self.loop.call_later(_OFFER_GRACE, self._wake.set)

    def _overdue(self, now: float) -> set[str]:
        overdue: set[str] = set()
        for channel, (reached, since) in list(self._ahead.items()):
            position = self.positions.get(channel)
            if position is None or position >= reached:
                del self._ahead[channel]
            elif now - since >= _OFFER_GRACE:
                del self._ahead[channel]
                overdue.add(channel)
        return overdue

    async def _catch_up(self, channel: str) -> None:
        while channel in self.positions:
            position = self.positions[channel]
            events, skip_to = await self._in_thread(_events_after, channel, position)
            if skip_to is not None:
                self.positions[channel] = skip_to
                continue
            if not events:
                return
            self._dispatch(channel, events)
            if len(events) < _PAGE:
                return

    def _dispatch(self, channel: str, events: list[Event]) -> None:
        from django_eventstream.views import get_listener_manager

        hand_to_listeners(get_listener_manager(), channel, events)
        self.positions[channel] = int(events[-1].id)

    @staticmethod
    def _active_channels() -> set[str]:
        from django_eventstream.views import get_listener_manager

        manager = get_listener_manager()
        with manager.lock:
            return set(manager.listeners_by_channel)


def _current_ids(channels: Iterable[str]) -> dict[str, int]:
    return configured().get_current_ids(channels)


def _events_after(channel: str, position: int) -> tuple[list[Event], int | None]:
    from django_eventstream.storage import EventDoesNotExist

    try:
        return list(configured().get_events(channel, position, limit=_PAGE)), None
    except EventDoesNotExist as exc:
        # Trimmed from storage: skip ahead; clients see the seq jump and resync.
        logger.warning("verity_django: %s; skipping to %s", exc, exc.current_id)
        return [], int(exc.current_id)


_tailer: Tailer | None = None


def tailer() -> Tailer:
    """This process's tailer, bound to the running event loop."""
    global _tailer
    loop = asyncio.get_running_loop()
    if _tailer is None or _tailer.loop is not loop or loop.is_closed():
        _tailer = Tailer(loop)
    return _tailer


def offer(channel: str, event: Event) -> None:
    """Hand a just-stored event to this process's tailer, if it runs."""
    current: Any = _tailer
    if current is None or current.loop.is_closed():
        return
    current.offer_threadsafe(channel, event)


_redis_task: asyncio.Task[None] | None = None
_RESUBSCRIBED_SETTLE = 0.5


def supervise_redis_listener() -> None:
    """Run the Redis subscription that delivers envelopes to this process,
    under a supervisor.

    django-eventstream's own listener starts once, and if it dies (Redis
    down for longer than the client retries) it never starts again: live
    streams then only get keep-alives. It also cannot say when its
    subscription is live. This one is restarted with backoff, and each time
    Redis confirms the subscription, every stream re-reads storage for what
    was published before: a stream that read its start before then would
    otherwise wait for a later envelope to show it the gap.
    """
    global _redis_task
    from django_eventstream.views import get_listener_manager

    loop = asyncio.get_running_loop()
    if _redis_task is not None and not _redis_task.done() and _redis_task.get_loop() is loop:
        return
    manager = get_listener_manager()
    if manager.redis_listener is None:
        return
    with manager.lock:
        # Keeps django-eventstream from starting its own.
        manager.redis_listener_started = True
    _redis_task = loop.create_task(_run_redis_listener(manager), name="verity-redis-listener")


async def _run_redis_listener(manager: Any) -> None:
    outage = Outage(logger, "the Redis subscription", _redis_failures)
    backoff = 0.5
    # After a reconnect (Redis itself may have restarted empty), the re-read
    # waits a moment: envelopes of a new count that arrive through the
    # subscription first let each stream tell that its count started over
    # (a hello to 0, nothing missed) instead of a reset and a resync.
    settle = 0.0
    while True:
        try:
            await _listen(manager, settle, outage)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outage.failed(exc)
        if outage.failures <= 1:
            backoff = 0.5
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
        settle = _RESUBSCRIBED_SETTLE


def _redis_failures() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError,)


async def _listen(manager: Any, settle: float, outage: Outage) -> None:
    """Hand every message of the envelopes' pub/sub channel to this
    process's streams, as django-eventstream's listener does, and make them
    re-read storage ``settle`` seconds after Redis confirmed the subscription.

    Raises once Redis falls silent (``REDIS_TIMEOUT``, see
    :mod:`verity_django.subscriptions`): the next subscription's
    confirmation makes every stream re-read what this one missed."""
    from django.conf import settings

    details: dict[str, Any] = dict(settings.EVENTSTREAM_REDIS)
    async with Subscription(details, PUBSUB_CHANNEL, timeout=conf.REDIS_TIMEOUT) as subscription:
        while True:
            message = await subscription.message()
            if message["type"] == "subscribe":
                outage.worked()
                asyncio.get_running_loop().call_later(settle, _reread_all, manager)
                # Any later confirmation follows redis-py's own reconnect.
                settle = _RESUBSCRIBED_SETTLE
            elif message["type"] == "message":
                published = json.loads(message["data"])
                channel = published["channel"]
                event = Event(
                    channel, published["event_type"], published["data"], id=published["pub_id"]
                )
                hand_to_listeners(manager, channel, [event])


def hand_to_listeners(manager: Any, channel: str, events: list[Event]) -> None:
    """Queue ``events`` for this process's streams of ``channel``, as
    django-eventstream's ``ListenerManager.add_to_queues`` does, from the
    event loop the streams run on.

    ``add_to_queues`` wakes each stream through ``call_soon_threadsafe``,
    even from the loop itself: a write to the loop's wake-up socket and a
    read of it, per event and stream, each letting go of the GIL (bench W5).
    Here a stream on this loop is woken directly, once per call. It keeps
    django-eventstream's bound on a stream's queue (``MAX_PENDING``): past
    it the stream is marked ``overflow`` and re-reads storage. This uses the
    manager's ``lock`` and ``listeners_by_channel`` and each listener's
    ``channel_items``, ``overflow``, ``aevent`` and ``loop``, as in
    django-eventstream 5.3 (overflow: ``tests/test_stream.py::
    test_a_burst_past_a_streams_queue_arrives_whole_and_in_order``).
    """
    from django_eventstream.views import MAX_PENDING

    loop = asyncio.get_running_loop()
    woken = []
    with manager.lock:
        for listener in manager.listeners_by_channel.get(channel, ()):
            queued = listener.channel_items.setdefault(channel, [])
            room = max(MAX_PENDING - len(queued), 0)
            queued.extend(events[:room])
            if room < len(events):
                listener.overflow = True
            woken.append(listener)
    for listener in woken:
        if listener.loop is loop:
            listener.aevent.set()
        else:
            listener.wake_threadsafe()


def _reread_all(manager: Any) -> None:
    with manager.lock:
        listeners = {x for group in manager.listeners_by_channel.values() for x in group}
        for listener in listeners:
            listener.overflow = True
    for listener in listeners:
        listener.aevent.set()
