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
from typing import Any

import pytest
from django.test import override_settings
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

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
    slow = pool.submit(time.sleep, answer_limit() * 0.6)
    queued = pool.submit(time.sleep, answer_limit() * 0.6)
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


class ReadersMachine(RuleBasedStateMachine):
    """Reads that answer, reads the database never answers, and answers that
    come late, in any order. The oracle: every read ends, a stuck read with an
    error or its late answer, every other read with its own value, or refused
    only while at least ``_MOST_STUCK`` reads are still unanswered; and the
    threads stay bounded."""

    def __init__(self) -> None:
        super().__init__()
        self.overridden = override_settings(VERITY=FAST)
        self.overridden.enable()
        self.pool = ReaderThreads(size=2)
        self.before = reader_threads()
        self.gates: list[threading.Event] = []
        # (future, its value or None when stuck, unanswered stuck reads when asked)
        self.reads: list[tuple[Future[Any], int | None, int]] = []

    def unanswered(self) -> int:
        return sum(1 for gate in self.gates if not gate.is_set())

    @rule(value=st.integers())
    def answered(self, value: int) -> None:
        self.reads.append((self.pool.submit(lambda: value), value, self.unanswered()))

    @rule()
    def never_answered(self) -> None:
        gate = threading.Event()
        self.gates.append(gate)
        self.reads.append((self.pool.submit(waits_for(gate)), None, self.unanswered()))

    @rule(data=st.data())
    def late_answer(self, data: st.DataObject) -> None:
        waiting = [gate for gate in self.gates if not gate.is_set()]
        if waiting:
            data.draw(st.sampled_from(waiting)).set()

    @rule(seconds=st.sampled_from([0.0, 0.3, 1.2]))
    def time_passes(self, seconds: float) -> None:
        time.sleep(seconds)

    @invariant()
    def threads_stay_bounded(self) -> None:
        assert len(reader_threads() - self.before) <= self.pool.size + readers._MOST_STUCK

    def teardown(self) -> None:
        try:
            # A read may wait for each stuck read asked before it to be given up on.
            deadline = time.monotonic() + answer_limit() * (len(self.gates) + 2) + 10
            for future, value, unanswered in self.reads:
                error: StorageNotAnswering | None = None
                try:
                    got = future.result(timeout=max(0.1, deadline - time.monotonic()))
                except StorageNotAnswering as exc:
                    error = exc
                if error is None:
                    assert got == ("late" if value is None else value)
                else:
                    refused = "refusing more" in str(error)
                    assert value is None or (refused and unanswered >= readers._MOST_STUCK), error
            for gate in self.gates:
                gate.set()
            wait_for(lambda: self.pool.stuck == 0, timeout=30)
            assert self.pool.submit(lambda: "after").result(timeout=10) == "after"
        finally:
            for gate in self.gates:
                gate.set()
            self.overridden.disable()


def test_every_read_ends_with_its_answer_or_an_error_it_may_have() -> None:
    run_state_machine_as_test(
        ReadersMachine,
        settings=settings(
            max_examples=12,
            stateful_step_count=12,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
