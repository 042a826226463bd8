"""The few threads that run every stream's storage reads, and give up on a
read the database never answers.

Under ASGI every request runs in a thread of its own, and an SSE request
keeps that thread for as long as the stream lives. A database connection
opened there stays with the stream too (about 60 KiB per idle stream on
SQLite, measured by bench M1), so every stream of a process, the tailer and
the replay positions read storage through these threads instead, each
holding one connection.

A server that stops answering on an established connection (a stopped
process, a host gone without a reset) never enforces its own statement
timeout, and TCP waits up to 15 minutes before it gives up. Without a bound
of its own, one such read held its thread, and the reads queued behind it
held every stream that opened or caught up, for that long. So a read that
has run for ``STORAGE_TIMEOUT`` and as long again (at least a second
more) is given up on: its caller gets
:class:`StorageNotAnswering` (an ``OperationalError``, which every caller
already treats as the database failing) and a new thread takes the stuck
one's place. The stuck thread leaves once its read returns. At most
``_MOST_STUCK`` threads may be stuck at once; past that, reads fail at once
rather than adding threads, until one comes back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import DatabaseError, OperationalError

from verity_django.conf import conf
from verity_django.thread_connections import close_connections, in_open_transaction

T = TypeVar("T")
logger = logging.getLogger(__name__)

THREADS = 2
_THREAD_PREFIX = "verity-storage"
_MOST_STUCK = 4
_WATCHDOG_IDLE = 60.0


class StorageNotAnswering(OperationalError):
    """A storage read the database did not answer in time."""


def answer_limit() -> float:
    """How long a read may run before it is given up on: the database's own
    statement timeout (``STORAGE_TIMEOUT``, on PostgreSQL) gets as long again,
    and at least a second, to come back as an error."""
    return conf.STORAGE_TIMEOUT + max(conf.STORAGE_TIMEOUT, 1.0)


def is_reader_thread() -> bool:
    return threading.current_thread().name.startswith(_THREAD_PREFIX)


@dataclass(eq=False)
class _Read:
    future: Future[Any]
    func: Callable[..., Any]
    args: tuple[Any, ...]
    started: float = 0.0
    # Set, under the pool's lock, by whoever settles the future first: the
    # thread with the read's outcome, or the watchdog giving up on it.
    settled: bool = False


class ReaderThreads(Executor):
    """An executor of storage reads whose threads are replaced when stuck."""

    def __init__(self, size: int = THREADS) -> None:
        self.size = size
        # Guards what follows; never held across a read, a connect or a close.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._watch = threading.Condition(self._lock)
        self._queue: deque[_Read] = deque()
        self._running: dict[threading.Thread, _Read] = {}
        self._serving: set[threading.Thread] = set()
        self._stuck: set[threading.Thread] = set()
        # Threads waiting for a read, or started or woken and yet to take one.
        self._idle = 0
        self._asked_to_release: dict[threading.Thread, threading.Event] = {}
        self._watchdog: threading.Thread | None = None
        self._named = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            raise TypeError("storage reads take positional arguments only")
        future: Future[T] = Future()
        with self._lock:
            refused = None
            if not self._serving and not self._may_add_thread():
                refused = self._refusal(answer_limit())
            if refused is None:
                self._queue.append(read := _Read(future, fn, args))
                self._add_threads_for_queue()
                if self._serving:
                    self._work.notify()
                else:
                    self._queue.remove(read)
                    refused = StorageNotAnswering("no storage reader thread could be started")
        if refused is not None:
            future.set_exception(refused)
        return future

    @property
    def stuck(self) -> int:
        """How many threads wait on reads given up on."""
        with self._lock:
            return len(self._stuck)

    def release_connections(self, timeout: float) -> bool:
        """Have every serving thread close its database connections, which
        it reopens on its next read; True once all have (a stuck one cannot)."""
        with self._lock:
            asked = [
                self._asked_to_release.setdefault(thread, threading.Event())
                for thread in self._serving
            ]
            self._work.notify_all()
        deadline = time.monotonic() + timeout
        released = all(event.wait(max(0.0, deadline - time.monotonic())) for event in asked)
        return released and not self.stuck

    def _add_threads_for_queue(self) -> None:
        # Idle threads already woken for a read still count as idle until
        # they take one, so it is the queue's excess over them that needs threads.
        while (
            len(self._queue) > self._idle
            and len(self._serving) < self.size
            and self._may_add_thread()
        ):
            try:
                self._add_thread()
            except RuntimeError:
                # No new threads (the interpreter is shutting down): the
                # serving ones, if any, take the queue.
                logger.warning("verity_django: could not start a storage reader thread")
                return

    def _may_add_thread(self) -> bool:
        return len(self._stuck) < _MOST_STUCK

    def _refusal(self, limit: float) -> StorageNotAnswering:
        return StorageNotAnswering(
            f"{len(self._stuck)} storage reads have had no answer from the database "
            f"within {limit:g} s; refusing more until one returns"
        )

    def _add_thread(self) -> None:
        self._named += 1
        thread = threading.Thread(
            target=self._serve, name=f"{_THREAD_PREFIX}-{self._named}", daemon=True
        )
        thread.start()  # it waits for the lock before it reads the counts
        self._idle += 1
        self._serving.add(thread)

    def _serve(self) -> None:
        me = threading.current_thread()
        counted_idle = True  # by _add_thread, before it started
        while True:
            with self._lock:
                if not counted_idle:
                    self._idle += 1
                while not self._queue and me not in self._asked_to_release:
                    self._work.wait()
                self._idle -= 1
                counted_idle = False
                release = self._asked_to_release.pop(me, None)
                read = None if release is not None else self._queue.popleft()
                # Marked running under the lock, before the watchdog can see
                # it: a read its caller cancelled while queued is dropped.
                if read is not None and read.future.set_running_or_notify_cancel():
                    self._begin(me, read)
                else:
                    read = None
            if release is not None:
                try:
                    close_connections()
                finally:
                    release.set()
            elif read is not None and self._run(me, read):
                return

    def _begin(self, me: threading.Thread, read: _Read) -> None:
        """Holding the lock: ``read`` runs in this thread from now on."""
        read.started = time.monotonic()
        # The watchdog sleeps until the oldest read's limit: only a read
        # that starts while none is being watched needs to wake it.
        watched = any(not other.settled for other in self._running.values())
        self._running[me] = read
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._keep_watch, name="verity-readers-watchdog", daemon=True
            )
            self._watchdog.start()
        elif not watched:
            self._watch.notify()

    def _run(self, me: threading.Thread, read: _Read) -> bool:
        """Run one read and settle its future; True if this thread was given
        up on meanwhile, and so leaves."""
        result: Any = None
        error: BaseException | None = None
        try:
            result = _reconnecting(read.func, *read.args)
        except BaseException as exc:
            error = exc
        with self._lock:
            del self._running[me]
            ours = not read.settled
            read.settled = True
            given_up = me in self._stuck
            if given_up:
                self._stuck.discard(me)
                # One fewer stuck: reads refused a thread until now may get one.
                self._add_threads_for_queue()
        if ours:
            if error is None:
                read.future.set_result(result)
            else:
                read.future.set_exception(error)
        if given_up:
            # Another thread has its place: this one leaves, with its connections.
            close_connections()
            logger.warning("verity_django: a storage read given up on has now returned")
        return given_up

    def _keep_watch(self) -> None:
        while True:
            try:
                if not self._watch_once():
                    return
            except Exception:
                # A watchdog that died would leave every later read unbounded.
                logger.exception("verity_django: the storage readers' watchdog failed; going on")
                time.sleep(1.0)

    def _watch_once(self) -> bool:
        """Wait for the oldest read's limit and give up on what is overdue;
        False once nothing has been read for a while and the watchdog leaves."""
        with self._lock:
            while True:
                limit = answer_limit()
                due = self._first_limit(limit)
                if due is not None and due <= time.monotonic():
                    break
                if due is not None:
                    self._watch.wait(due - time.monotonic())
                elif not self._watch.wait(_WATCHDOG_IDLE) and not self._running:
                    # Nothing read for a while: the next read starts another.
                    self._watchdog = None
                    return False
            overdue, refused = self._give_up(time.monotonic(), limit)
            refusal = self._refusal(limit)
        for read in overdue:
            logger.warning(
                "verity_django: the database did not answer a storage read within %g s; "
                "its caller got an error, and another thread serves the streams",
                limit,
            )
            read.future.set_exception(
                StorageNotAnswering(
                    f"the database did not answer a storage read within {limit:g} s"
                )
            )
        for read in refused:
            if read.future.set_running_or_notify_cancel():
                read.future.set_exception(refusal)
        return True

    def _first_limit(self, limit: float) -> float | None:
        starts = [read.started for read in self._running.values() if not read.settled]
        return min(starts) + limit if starts else None

    def _give_up(self, now: float, limit: float) -> tuple[list[_Read], list[_Read]]:
        """Holding the lock: settle the overdue reads, replace their threads,
        and take back the queued reads no thread can serve."""
        overdue = []
        for thread, read in self._running.items():
            if not read.settled and now - read.started >= limit:
                read.settled = True
                overdue.append(read)
                self._serving.discard(thread)
                self._stuck.add(thread)
                asked = self._asked_to_release.pop(thread, None)
                if asked is not None:
                    # Its caller is not kept waiting on a thread that may never answer.
                    asked.set()
        self._add_threads_for_queue()
        refused = [] if self._serving else list(self._queue)
        if refused:
            self._queue.clear()
        return overdue, refused


_readers: ReaderThreads | None = None
_readers_lock = threading.Lock()


def readers() -> ReaderThreads:
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = ReaderThreads()
        return _readers


def _forget_after_fork() -> None:
    # The parent's threads are not in the child, and its lock may have been
    # held by one of them at the fork.
    global _readers, _readers_lock
    _readers = None
    _readers_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def release_reader_connections(timeout: float) -> bool:
    """Have every reader thread close its database connections, which it
    reopens on its next read; True once all have. A test database cannot
    be dropped while they stay open (PostgreSQL: "being accessed by other
    users")."""
    with _readers_lock:
        pool = _readers
    return True if pool is None else pool.release_connections(timeout)


def on_reader(func: Callable[..., T], *args: Any) -> T:
    """Run a storage read on the reader threads and wait for it.

    A caller inside a transaction reads on its own connection: only that
    connection sees what the transaction wrote (and in a TestCase,
    everything the test wrote).
    """
    if in_open_transaction():
        return func(*args)
    if is_reader_thread():
        return _reconnecting(func, *args)
    # No timeout here: the watchdog settles the future of a read that overruns.
    return readers().submit(func, *args).result()


def _reconnecting(func: Callable[..., T], *args: Any) -> T:
    try:
        return _retrying_shared_cache_locks(func, *args)
    except DatabaseError:
        # A failed query may leave this long-lived thread's connection
        # unusable (the database restarted, say): the next read reconnects.
        close_connections()
        raise


def _retrying_shared_cache_locks(func: Callable[..., T], *args: Any) -> T:
    """Run a read, again while SQLite's shared cache says a table is locked.

    An in-memory database with a shared cache (Django's SQLite test
    database) answers a read that meets another connection's write with
    "table is locked" at once, where a file database waits for its busy
    timeout: retry for up to ``STORAGE_TIMEOUT`` (no lock is held here)."""
    deadline = time.monotonic() + conf.STORAGE_TIMEOUT
    pause = 0.002
    while True:
        try:
            return func(*args)
        except OperationalError as exc:
            if "table is locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
