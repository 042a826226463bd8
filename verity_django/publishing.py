"""From a committed batch to stored, delivered envelopes, without ever
holding up the request that committed it.

A committed batch becomes one envelope per audience (``envelopes.py`` owns
its bytes). Each envelope then goes through these steps, in this order:

1. **encode**, in the committing thread: an envelope that cannot be encoded
   is refused here, logged and counted, and its audience skips one seq so
   that readers see a gap instead of a silent hole;
2. **store**: the storage allocates the seq (contiguous per audience across
   processes) and stores the envelope in one atomic step;
3. **hand to this process's listeners** (the tailer), unless the storage
   publishes to every process itself (Redis);
4. **hand to GRIP**, when a GRIP proxy is configured;
5. **announce**: ``envelope_published`` receivers run, once, after the
   publisher has let go of everything; a receiver that raises is logged and
   counted and changes nothing else.

A failed step is retried, and the retry resumes at that step: a stored
envelope is never stored again.

Envelopes wait in one ordered, bounded backlog per process, and one thread at
a time publishes from it, oldest first, so envelopes go out in commit order.
Who publishes:

- **inline**, the committing thread itself, right away (``PUBLISH_INLINE``):
  a publish that comes alone (a request), when nobody else is publishing
  and the transports are healthy; also ``publish_now()``, and always inside
  a ``TestCase``;
- **grouped**, the process's ``verity-publisher`` thread: with a storage
  apart from the caller's database (Redis), a publish that comes less than
  ``_BURST_GAP`` after the previous one returned (a loop in a script, a
  management command, a Celery task); what a concurrent request leaves
  (it never waits for whoever is publishing, who looks at the backlog as it
  lets go and wakes this thread for what its own run did not store); and
  everything while the breaker is open. The thread stores what has accumulated in runs of up to
  ``_GROUP``, each in one storage transaction or one Redis script call.

When a step fails, the *breaker* opens: until a retry succeeds,
requests only add to the backlog and the process's publisher thread retries
with backoff. Every I/O of the steps has a timeout (``STORAGE_TIMEOUT``,
``REDIS_TIMEOUT``, ``GRIP_TIMEOUT``), so a request that meets the start of a
failure waits at most one of them.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.signals import setting_changed
from django.db import connections
from django_eventstream.event import Event

from verity_django import directives as d
from verity_django import envelopes
from verity_django.audiences import channel_for
from verity_django.conf import conf
from verity_django.signals import directives_committed, envelope_published
from verity_django.storage import Append, configured
from verity_django.thread_connections import ConnectionRelease, in_open_transaction

if TYPE_CHECKING:
    from verity_django.batching import Batch

logger = logging.getLogger(__name__)

# Envelopes stored in one transaction (or one Redis round trip) at most.
_GROUP = 64
# A publish that comes less than this after the previous one returned is part
# of a burst (a loop in a script, a management command, a Celery task): it
# goes to the publisher thread, which stores what accumulates in runs of up to
# _GROUP, instead of paying a round trip of its own. Inline, one envelope's
# store costs about 0.4 ms with Redis here (bench F3 inline: 2,000-2,400/s),
# so a caller back within 1 ms spends at least a third of its time waiting
# on round trips; requests one after another (bench W1, W2) publish 20 ms
# apart and stay inline, where the publisher thread's competition for the GIL
# cost them (bench/README.md, "Publisher runs"). Bench F3: 2,300/s inline,
# about 10,000/s grouped.
_BURST_GAP = 0.001
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 5.0
# A stored envelope's GRIP publish is tried this often; then Pushpin's own
# recovery (a prev-id mismatch makes it re-read storage) takes over.
_GRIP_ATTEMPTS = 3
_LAGS = 4096


@dataclass(frozen=True)
class Published:
    audience: str
    seq: int
    data: str


@dataclass(eq=False)
class _Pending:
    """One envelope on its way; the flags say which steps are done."""

    audience: str
    channel: str
    head: str
    tail: str
    committed: float = field(default_factory=time.monotonic)
    skip: int = 0
    # Every attempt to store the envelope presents the same token, so that a
    # retry after an answer that never came cannot store it twice.
    token: str = field(default_factory=d.new_idempotency_key)
    store_attempts: int = 0
    event: Event | None = None
    offered: bool = False
    grip_attempts: int = 0
    grip_done: bool = False
    busy: bool = False
    finished: bool = False
    # Only a caller that waits for the envelope (publish_now) sets one: a
    # threading.Event per envelope was a tenth of what submit() cost (bench W5).
    waiter: threading.Event | None = None
    error: BaseException | None = None

    def finish(self) -> None:
        """Published, or given up on (``error`` says why)."""
        self.finished = True
        if self.waiter is not None:
            self.waiter.set()


class Counters:
    """What this process's publisher did since it started.

    ``depth`` and ``oldest_age`` (seconds) describe the backlog now;
    ``published``, ``failed`` (failed attempts of a step), ``retried``
    (attempts after a failure), ``dropped`` (envelopes lost to the backlog
    bound or refused because they could not be encoded) and
    ``receiver_errors`` count; ``store_lag`` is commit → stored, in seconds,
    for recent envelopes (p50, p99).
    """

    def __init__(self) -> None:
        self.published = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.receiver_errors = 0
        self.batches_delivered = 0

    @property
    def depth(self) -> int:
        return len(_publisher.queue)

    @property
    def oldest_age(self) -> float:
        queue = _publisher.queue
        try:
            return time.monotonic() - queue[0].committed
        except IndexError:
            return 0.0

    @property
    def breaker_open(self) -> bool:
        return not _publisher.healthy

    def store_lag(self) -> tuple[float, float]:
        lags = sorted(_publisher.lags)
        if not lags:
            return (0.0, 0.0)
        return (lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.99))])

    def as_dict(self) -> dict[str, Any]:
        p50, p99 = self.store_lag()
        return {
            "depth": self.depth,
            "oldest_age": self.oldest_age,
            "breaker_open": self.breaker_open,
            "published": self.published,
            "failed": self.failed,
            "retried": self.retried,
            "dropped": self.dropped,
            "receiver_errors": self.receiver_errors,
            "batches_delivered": self.batches_delivered,
            "store_lag_p50": p50,
            "store_lag_p99": p99,
        }


counters = Counters()


def deliver(batch: Batch) -> None:
    """Called once per committed batch: notify, then publish its envelopes."""
    counters.batches_delivered += 1
    directives_committed.send(sender=type(batch), batch=batch)
    if conf.PUSH:
        origin = batch.origin
        _publisher.submit(
            [
                pending
                for audience, items in batch.by_audience().items()
                if (pending := _encode(audience, items, origin)) is not None
            ]
        )


def publish(audience: str, items: Sequence[d.Directive]) -> None:
    """Publish one envelope as a committed batch's are (never waits)."""
    pending = _encode(audience, items, None)
    if pending is not None:
        _publisher.submit([pending])


def publish_now(audience: str, items: Sequence[d.Directive]) -> Published:
    """Publish one envelope and wait until it is stored and handed on, in
    order after whatever this process still holds (management commands,
    which print the seq). Raises if that does not happen within
    ``FLUSH_TIMEOUT``."""
    pending = _encode(audience, items, None, strict=True)
    assert pending is not None
    pending.waiter = waiter = threading.Event()
    try:
        _publisher.submit([pending], wait=True)
    except RuntimeError:
        # No publisher thread can start (the interpreter is shutting down).
        _publisher.withdraw(pending)
        raise
    deadline = time.monotonic() + conf.FLUSH_TIMEOUT
    if _publisher.in_own_thread() and not waiter.is_set():
        # An envelope_published receiver: a request that held the token when
        # this was submitted left the rest to this very thread.
        _publisher.flush(conf.FLUSH_TIMEOUT)
    # Taken back unless its store was tried (it may be stored already), so
    # that what the caller is told (not published) stays true. Off the
    # backlog otherwise, it was published or dropped just now and is being
    # finished, with no I/O left in between.
    if (
        not waiter.wait(max(0.0, deadline - time.monotonic()))
        and not _publisher.withdraw(pending)
        and not _publisher.holds(pending)
    ):
        waiter.wait(1.0)
    if not waiter.is_set():
        raise TimeoutError(
            f"not published within {conf.FLUSH_TIMEOUT} s "
            f"({counters.depth} envelope(s) still wait"
            + (", this one among them" if _publisher.holds(pending) else "")
            + f"): {pending.error or 'the storage did not answer'}"
        )
    if pending.event is None:
        raise RuntimeError(f"not published: {pending.error}")
    return Published(audience, int(pending.event.id), envelopes.public(pending.event.data))


def flush(timeout: float | None = None) -> bool:
    """Publish what this process still holds; True once nothing waits.

    Runs at interpreter exit by itself; call it where a process ends without
    one (``os._exit``, a worker pool's child).
    """
    return _publisher.flush(conf.FLUSH_TIMEOUT if timeout is None else timeout)


def release_connections(timeout: float) -> bool:
    """Have the publisher thread, if running, close its database
    connections (it reopens them when it next publishes); True once it has."""
    return _publisher.release.ask(_publisher.thread, timeout)


def reset() -> None:
    """Forget the backlog and the breaker (tests), once a run in flight has landed."""
    _publisher.reset()


def _encode(
    audience: str, items: Sequence[d.Directive], origin: str | None, *, strict: bool = False
) -> _Pending | None:
    try:
        head, tail = envelopes.parts(audience, items, origin)
    except envelopes.Unencodable as exc:
        if strict:
            raise
        _publisher.lose(audience, f"it cannot be encoded ({exc})")
        return None
    return _Pending(audience, channel_for(audience), head, tail)


def grip_configured() -> bool:
    """Whether publishes go to a GRIP proxy too. Read on every publish and
    cached until a setting changes: a setting the project lacks costs
    ``LazySettings`` an AttributeError on every read (bench W1)."""
    if not _grip:
        _grip.append(
            bool(getattr(settings, "GRIP_URL", None) or getattr(settings, "GRIP_PROXIES", None))
        )
    return _grip[0]


_grip: list[bool] = []


def _forget_grip(*, setting: str, **kwargs: Any) -> None:
    if setting in ("GRIP_URL", "GRIP_PROXIES"):
        _grip.clear()


setting_changed.connect(_forget_grip, dispatch_uid="verity_django.publishing.setting_changed")


def _in_test_transaction() -> bool:
    """Whether this thread delivers inside an open transaction, which only a
    TestCase does: that transaction holds what the envelope is stored next
    to, and only its own connection can write there, so it publishes inline,
    failing or not, and never hands the rest to the publisher thread."""
    return in_open_transaction()


def _shares_the_database() -> bool:
    """Whether the storage writes to the database the caller writes to: the
    publisher thread's transactions would then contend with the caller's for
    its write lock (SQLite's shared-cache test database refuses at once:
    "database table is locked"), so the burst rule leaves such callers
    inline."""
    return bool(getattr(configured(), "shares_the_database", True))


class _Steps:
    """Where a run's envelopes go, read from the settings when it starts."""

    def __init__(self) -> None:
        self.storage = configured()
        # Redis publishes to every process's listeners itself.
        self.offer_locally = not getattr(self.storage, "publishes_to_listeners", False)
        self.grip = grip_configured()


class _Publisher:
    def __init__(self) -> None:
        # Guards the backlog and counters only; never held across I/O.
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        # Notified whenever the backlog empties, for callers that wait on it.
        self.drained = threading.Condition(self.lock)
        self.queue: collections.deque[_Pending] = collections.deque()
        # Seqs to skip per audience, for envelopes that were dropped.
        self.lost: dict[str, int] = {}
        # Whoever holds this publishes. Requests never wait for it; only
        # flush() does, within its timeout.
        self.publishing = threading.Lock()
        # The breaker: open from a failed step until a retry succeeds.
        self.healthy = True
        self.retry_at = 0.0
        self.backoff = 0.0
        self.lags: collections.deque[float] = collections.deque(maxlen=_LAGS)
        self.thread: threading.Thread | None = None
        self.release = ConnectionRelease(self.wake)
        # When the last publish returned to its caller, for the burst rule.
        self.last_returned = -_BURST_GAP

    def reset(self) -> None:
        with self.lock:
            self.queue.clear()
            self._note_if_drained()
        # A run already handed to storage still lands: wait for it, so that it
        # cannot store an envelope into whatever comes next (the next test's
        # database).
        if self.publishing.acquire(timeout=conf.FLUSH_TIMEOUT):
            self.publishing.release()
        with self.lock:
            self.queue.clear()
            self._note_if_drained()
            self.lost.clear()
            self.healthy = True
            self.retry_at = 0.0
            self.backoff = 0.0
            self.last_returned = -_BURST_GAP

    def submit(self, pending: list[_Pending], *, wait: bool = False) -> None:
        if not pending:
            return
        with self.lock:
            self.queue.extend(pending)
            overflow = len(self.queue) - conf.BACKLOG_LIMIT
            in_burst = time.monotonic() - self.last_returned < _BURST_GAP
        if overflow > 0:
            self._drop_oldest(overflow)
        if wait:
            # A caller that waits does so within FLUSH_TIMEOUT, which it could
            # not keep while storing itself: a database that accepts the
            # connection and never answers holds a connect for as long as the
            # driver lets it (psycopg 3: 130 s; psycopg2: for ever).
            inline = self.in_own_thread() or _in_test_transaction()
        else:
            grouped = in_burst and not _shares_the_database()
            inline = self.healthy and conf.PUBLISH_INLINE and not grouped
            # Asked only when it decides something: it looks at every connection.
            if not inline:
                inline = _in_test_transaction()
        if not inline:
            self._hand_rest_to_thread()
        elif self.publishing.acquire(blocking=False):
            self._publish_then_release(until=pending[-1])
            if self.queue and not _in_test_transaction():
                self._hand_rest_to_thread()
        # Else whoever publishes looks at the backlog once it lets go (here
        # above, the publisher thread's loop, flush()), so this needs no
        # wake-up of the thread: under concurrent requests (bench W5) most
        # such wake-ups found the backlog already drained.
        self.last_returned = time.monotonic()

    def _drop_oldest(self, count: int) -> None:
        dropped: list[_Pending] = []
        with self.lock:
            for item in list(self.queue):
                if len(dropped) == count:
                    break
                if item.busy:
                    continue
                self.queue.remove(item)
                dropped.append(item)
                self._note_if_drained()
                if item.event is None:
                    self.lost[item.audience] = self.lost.get(item.audience, 0) + 1 + item.skip
        for item in dropped:
            item.error = OverflowError("dropped: the backlog is full")
            item.finish()
            self._count_lost(item.audience, f"the backlog holds {conf.BACKLOG_LIMIT}")

    def _note_if_drained(self) -> None:
        """Holding the lock, after taking envelopes off the backlog: wake
        whoever waits for it to empty."""
        if not self.queue:
            self.drained.notify_all()

    def holds(self, item: _Pending) -> bool:
        with self.lock:
            return item in self.queue

    def withdraw(self, item: _Pending) -> bool:
        """Take ``item`` off the backlog if no store of it was ever tried;
        True if it is gone. Such an item holds no seq, neither its own nor
        the skipped ones of dropped envelopes (a run hands those out), and
        storage cannot hold it; a tried one may be stored already."""
        with self.lock:
            if item.busy or item.store_attempts or item not in self.queue:
                return False
            self.queue.remove(item)
            self._note_if_drained()
            return True

    def lose(self, audience: str, why: str) -> None:
        with self.lock:
            self.lost[audience] = self.lost.get(audience, 0) + 1
        self._count_lost(audience, why)

    def _count_lost(self, audience: str, why: str) -> None:
        counters.dropped += 1
        logger.error(
            "verity_django: dropped an envelope for audience %r: %s; its clients see a gap "
            "in seq and resync",
            audience,
            why,
        )

    def _publish_then_release(self, until: _Pending | None) -> None:
        try:
            announced = self._publish(until)
        finally:
            self.publishing.release()
        for published in announced:
            _announce(published)

    def _hand_rest_to_thread(self) -> None:
        with self.lock:
            if not self.queue:
                return
            self._ensure_thread()
            self.wake.notify()

    def in_own_thread(self) -> bool:
        # An envelope_published receiver runs in the publisher thread, which
        # cannot wait for itself.
        return self.thread is threading.current_thread()

    def _ensure_thread(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            return
        self.thread = threading.Thread(target=self._run, name="verity-publisher", daemon=True)
        self.thread.start()
        _at_exit()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.queue and not self.release.asked:
                    self.wake.wait()
                released = self.release.take()
                pause = self.retry_at - time.monotonic()
            if released:
                ConnectionRelease.answer(released)
                continue
            if pause > 0:
                time.sleep(pause)
            if self.publishing.acquire(blocking=False):
                self._publish_then_release(until=None)
            else:
                # Someone else publishes; it wakes this thread for what it leaves.
                with self.lock:
                    self.wake.wait(_BACKOFF_FIRST)

    def flush(self, timeout: float) -> bool:
        """Wait until the backlog is empty, at most ``timeout``.

        The publisher thread does the I/O, so that the wait ends on time
        whatever the storage does; only a test's transaction (whose
        connection alone can write there) and the thread itself publish here.
        """
        if self.in_own_thread() or _in_test_transaction():
            return self._publish_until_empty(timeout)
        deadline = time.monotonic() + timeout
        try:
            self._hand_rest_to_thread()
        except RuntimeError:
            # No new thread can start once the interpreter is shutting down.
            return self._publish_until_empty(timeout)
        with self.lock:
            return self.drained.wait_for(
                lambda: not self.queue, max(0.0, deadline - time.monotonic())
            )

    def _publish_until_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if not self.queue:
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pause = self.retry_at - time.monotonic()
            if pause > 0:
                time.sleep(min(pause, left))
                continue
            if self.publishing.acquire(timeout=min(left, _BACKOFF_MAX)):
                self._publish_then_release(until=None)

    def _publish(self, until: _Pending | None) -> list[Published]:
        """Publish from the oldest envelope on, up to ``until`` (or everything).

        Returns the envelopes to announce once the caller has let go.
        """
        announced: list[Published] = []
        # Looked up once per run, not per envelope (bench F3: a fifth of the
        # time a run took to store and hand on).
        steps: _Steps | None = None
        while True:
            with self.lock:
                if not self.queue:
                    return announced
                head = self.queue[0]
                own_done = until is not None and until.finished
                if own_done and not _hands_on_for_free(steps, head):
                    return announced
                run: list[_Pending] = []
                if head.event is None:
                    for item in self.queue:
                        if item.event is not None or len(run) == _GROUP:
                            break
                        run.append(item)
                head.busy = True
                for item in run:
                    item.busy = True
                    # Seqs of dropped envelopes are consumed by the next one
                    # stored for their audience.
                    item.skip += self.lost.pop(item.audience, 0)
            try:
                if run:
                    steps = self._store(run)
                    if steps is None:
                        return announced
                if steps is None:
                    # Stored by an earlier call, whose hand-on failed.
                    steps = _Steps()
                if not self._hand_on(steps, head):
                    return announced
            finally:
                with self.lock:
                    head.busy = False
                    for item in run:
                        item.busy = False
            with self.lock:
                if self.queue and self.queue[0] is head:
                    self.queue.popleft()
                    self._note_if_drained()
                counters.published += 1
                self.healthy = True
                self.backoff = 0.0
            assert head.event is not None
            head.finish()
            announced.append(
                Published(head.audience, int(head.event.id), envelopes.public(head.event.data))
            )

    def _store(self, run: list[_Pending]) -> _Steps | None:
        """Store the run; None when that failed."""
        appends = [
            Append(x.channel, x.head, x.tail, x.skip, x.token, retried=x.store_attempts > 0)
            for x in run
        ]
        for item in run:
            item.store_attempts += 1
        try:
            steps = _Steps()
            results = steps.storage.append_many(envelopes.EVENT_TYPE, appends)
        except Exception as exc:
            self._failed(run[0], "store", exc)
            return None
        now = time.monotonic()
        # Every stored envelope keeps its event, even after one that failed:
        # a retry must not store it again.
        failed: tuple[_Pending, Exception] | None = None
        for item, result in zip(run, results, strict=True):
            if isinstance(result, Exception):
                failed = failed or (item, result)
                continue
            item.event = result
            self.lags.append(now - item.committed)
        if failed is not None:
            self._failed(failed[0], "store", failed[1])
            return None
        return steps

    def _hand_on(self, steps: _Steps, item: _Pending) -> bool:
        assert item.event is not None
        if not item.offered:
            if steps.offer_locally:
                from verity_django.tailer import offer

                offer(item.channel, item.event)
            item.offered = True
        if not item.grip_done and steps.grip:
            try:
                _publish_to_grip(item.channel, item.event)
            except Exception as exc:
                item.grip_attempts += 1
                if item.grip_attempts < _GRIP_ATTEMPTS:
                    return self._failed(item, "hand to GRIP", exc)
                logger.error(
                    "verity_django: gave up handing seq %s of audience %r to GRIP after %d "
                    "attempts (%s); the proxy recovers it from storage",
                    item.event.id,
                    item.audience,
                    item.grip_attempts,
                    exc,
                )
            item.grip_done = True
        return True

    def _failed(self, item: _Pending, step: str, exc: BaseException) -> bool:
        if step == "store":
            # A connection a failed query left broken reconnects next time.
            for connection in connections.all(initialized_only=True):
                if not connection.in_atomic_block:
                    connection.close()
        with self.lock:
            self.healthy = False
            self.backoff = min(max(self.backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
            self.retry_at = time.monotonic() + self.backoff
            depth = len(self.queue)
        counters.failed += 1
        counters.retried += 1
        item.error = exc
        logger.error(
            "verity_django: could not %s an envelope for audience %r (%s: %s); %d envelope(s) "
            "wait, retrying in %.2f s",
            step,
            item.audience,
            type(exc).__name__,
            exc,
            depth,
            self.backoff,
        )
        return False


def _hands_on_for_free(steps: _Steps | None, head: _Pending) -> bool:
    """Whether a publisher whose own envelope is out goes on with ``head``:
    when it is already stored (in the same run as its own) and handing it on
    is only an offer to this process's listeners, which costs less than
    waking the publisher thread for it."""
    return steps is not None and head.event is not None and not head.offered and not steps.grip


def _announce(published: Published) -> None:
    results = envelope_published.send_robust(
        sender=Published, audience=published.audience, seq=published.seq, envelope=published.data
    )
    for receiver, result in results:
        if isinstance(result, Exception):
            counters.receiver_errors += 1
            logger.error(
                "verity_django: envelope_published receiver %r raised for seq %s of audience "
                "%r; the envelope is published and is not published again",
                receiver,
                published.seq,
                published.audience,
                exc_info=result,
            )


def _publish_to_grip(channel: str, event: Event) -> None:
    from django_eventstream.utils import publish_event

    _bound_grip_clients()
    publish_event(
        channel,
        envelopes.EVENT_TYPE,
        envelopes.public(event.data),
        str(event.id),
        str(int(event.id) - 1),
        blocking=True,
    )


def publish_to_grip(channel: str, formats: Any, meta: dict[str, str]) -> None:
    """One blocking publish to every GRIP proxy, bounded like the
    envelopes' (``GRIP_TIMEOUT``, one try); raises when it fails."""
    from django_grip import publish

    _bound_grip_clients()
    publish(channel, formats, meta=meta, blocking=True)


_bounded_sessions: set[int] = set()


def _bound_grip_clients() -> None:
    """pubcontrol posts without a timeout and retries on its own: give each
    of its HTTP sessions one bounded try (the publisher retries in order)."""
    from django_grip import get_pubcontrol

    for client in getattr(get_pubcontrol(), "clients", ()):
        session = getattr(client, "requests_session", None)
        if session is None or id(session) in _bounded_sessions:
            continue
        adapter = _timeout_adapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _bounded_sessions.add(id(session))


def _timeout_adapter() -> Any:
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(
            self,
            request: Any,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> Any:
            return super().send(
                request,
                stream=stream,
                timeout=conf.GRIP_TIMEOUT if timeout is None else timeout,
                verify=verify,
                cert=cert,
                proxies=proxies,
            )

    return TimeoutAdapter(max_retries=0)


_publisher = _Publisher()
_exit_registered = False


def _at_exit() -> None:
    global _exit_registered
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_flush_at_exit)


def _flush_at_exit() -> None:
    if not flush():
        logger.error(
            "verity_django: exiting with %d envelope(s) not published", len(_publisher.queue)
        )


def _forget_after_fork() -> None:
    # The parent publishes what it holds; a child starts empty.
    global _publisher
    _publisher = _Publisher()


os.register_at_fork(after_in_child=_forget_after_fork)
