"""The reader threads give up on a read the database never answers, and go
on serving the others.

A read that blocks on an event stands in for a server that stopped
answering; ``tests/live/test_readers.py`` stops a real PostgreSQL.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest
from django.test import override_settings

from tests.waiting import wait_for
from verity_django import readers
from verity_django.readers import ReaderThreads, StorageNotAnswering, answer_limit

# The shortest limit there is: STORAGE_TIMEOUT plus a second.
FAST = {"STORAGE_TIMEOUT": 0.01}


@pytest.fixture
def silent() -> Iterator[threading.Event]:
    """Set to let every read that waits on it return."""
    answer = threading.Event()
    yield answer
    answer.set()


def waits_for(answer: threading.Event) -> Callable[[], str]:
    def read() -> str:
        answer.wait(60)
        return "late"

    return read


def reader_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("verity-storage-")}


@override_settings(VERITY=FAST)
def test_a_read_never_answered_fails_its_caller_while_the_other_reads_are_served(
    silent: threading.Event,
) -> None:
    pool = ReaderThreads(size=1)
    stuck = pool.submit(waits_for(silent))
    behind = pool.submit(lambda: 42)  # queued behind the stuck read, on a pool of one
    with pytest.raises(StorageNotAnswering, match=r"did not answer a storage read within 1\.01 s"):
        stuck.result(timeout=30)
    assert behind.result(timeout=30) == 42
    assert not silent.is_set()
    assert pool.stuck == 1
    # The read that comes back late changes nothing for its caller.
    silent.set()
    wait_for(lambda: pool.stuck == 0)
    with pytest.raises(StorageNotAnswering):
        stuck.result()
    assert pool.submit(lambda: "again").result(timeout=5) == "again"


@override_settings(VERITY=FAST)
def test_a_queued_read_is_timed_from_when_it_runs_not_from_when_it_was_asked() -> None:
    pool = ReaderThreads(size=1)
    slow = pool.submit(time.sleep, answer_limit() * 0.7)
    queued = pool.submit(time.sleep, answer_limit() * 0.7)
    assert slow.result(timeout=30) is None
    assert queued.result(timeout=30) is None
    assert pool.stuck == 0


@override_settings(VERITY=FAST)
def test_past_the_most_stuck_threads_reads_fail_at_once_until_one_returns(
    silent: threading.Event,
) -> None:
    pool = ReaderThreads(size=2)
    before = reader_threads()
    stuck = [pool.submit(waits_for(silent)) for _ in range(readers._MOST_STUCK)]
    for future in stuck:
        with pytest.raises(StorageNotAnswering):
            future.result(timeout=30)
    # Every thread of this pool is stuck: a read is refused without waiting.
    wait_for(lambda: pool.stuck == readers._MOST_STUCK)
    refused = pool.submit(lambda: "never run")
    assert refused.done()
    with pytest.raises(StorageNotAnswering, match="4 storage reads have had no answer"):
        refused.result()
    threads = reader_threads() - before
    assert len(threads) <= readers._MOST_STUCK + pool.size
    silent.set()
    wait_for(lambda: pool.stuck == 0)
    assert pool.submit(lambda: "served").result(timeout=5) == "served"
    # The stuck threads have left; at most the pool's size stays.
    wait_for(lambda: len(reader_threads() - before) <= pool.size)


@override_settings(VERITY=FAST)
def test_letting_go_of_connections_does_not_wait_for_a_stuck_thread(
    silent: threading.Event,
) -> None:
    pool = ReaderThreads(size=2)
    assert pool.submit(lambda: 1).result(timeout=5) == 1
    assert pool.release_connections(timeout=5)
    stuck = pool.submit(waits_for(silent))
    wait_for(lambda: bool(pool._running))
    # Asked while the read runs: the answer comes when it is given up on.
    began = time.monotonic()
    assert not pool.release_connections(timeout=30)
    assert time.monotonic() - began < 15
    with pytest.raises(StorageNotAnswering):
        stuck.result(timeout=30)
    silent.set()
    wait_for(lambda: pool.stuck == 0)
    assert pool.submit(lambda: 2).result(timeout=5) == 2
    assert pool.release_connections(timeout=5)


def test_a_thread_whose_connection_fails_to_close_goes_on_serving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db import connections

    pool = ReaderThreads(size=1)
    assert pool.submit(lambda: 1).result(timeout=5) == 1

    def broken() -> None:
        raise OSError("connection reset")

    monkeypatch.setattr(connections, "close_all", broken)
    assert pool.release_connections(timeout=5)
    monkeypatch.undo()
    assert "could not close a connection" in caplog.text
    assert pool.submit(lambda: 2).result(timeout=5) == 2


def test_the_watchdog_outlives_a_failure_of_its_own(
    silent: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    pool = ReaderThreads(size=1)
    with override_settings(VERITY=FAST):
        stuck = pool.submit(waits_for(silent))
        wait_for(lambda: bool(pool._running))
        # Unreadable when the watchdog wakes for the read's limit.
        with override_settings(VERITY={"STORAGE_TIMEOUT": "soon"}):
            wait_for(lambda: "watchdog failed" in caplog.text)
        with pytest.raises(StorageNotAnswering):
            stuck.result(timeout=30)


def test_as_many_reads_run_at_once_as_the_pool_has_threads() -> None:
    pool = ReaderThreads(size=2)
    assert pool.submit(lambda: "warm").result(timeout=5) == "warm"
    wait_for(lambda: pool._idle == 1)
    # One thread is idle now. Two reads asked at once both run at once: the
    # idle thread woken for the first still looked idle to the second.
    both = threading.Barrier(2, timeout=10)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(10)  # the woken thread takes no read before the second is asked
    try:
        reads = [pool.submit(both.wait) for _ in range(2)]
    finally:
        sys.setswitchinterval(interval)
    assert sorted(read.result(timeout=15) for read in reads) == [0, 1]


def test_a_read_cancelled_before_it_runs_never_runs(silent: threading.Event) -> None:
    pool = ReaderThreads(size=1)
    ran: list[str] = []
    first = pool.submit(waits_for(silent))
    second: Future[None] = pool.submit(ran.append, "second")
    assert second.cancel()
    silent.set()
    assert first.result(timeout=5) == "late"
    assert pool.submit(lambda: "third").result(timeout=5) == "third"
    assert ran == []


def test_a_read_that_raises_gives_its_caller_the_error() -> None:
    pool = ReaderThreads(size=1)

    def fails() -> None:
        raise ValueError("no such channel")

    with pytest.raises(ValueError, match="no such channel"):
        pool.submit(fails).result(timeout=5)
    assert pool.submit(lambda: "after").result(timeout=5) == "after"
