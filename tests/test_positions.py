"""Replay positions: the checkpoint history against an oracle, the stores, and
the events view's reconnect in process (DatabaseStorage)."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.database_faults import refuse_deletes
from tests.test_stream import messages
from verity_django import directives as d
from verity_django import positions
from verity_django.positions import History
from verity_django.publishing import publish_now

pytestmark = pytest.mark.postgresql

# --------------------------------------------------------------------------
# The history against an oracle
# --------------------------------------------------------------------------


@st.composite
def timelines(draw: st.DrawFn) -> tuple[list[tuple[float, int]], float, float, float, float]:
    """Writes ``(time, seq)`` of one stream, its margin, when it was cut, how
    long bytes take to arrive, and how long after the cut the client is back."""
    margin = draw(st.sampled_from([0.5, 1.0, 10.0]))
    gaps = draw(st.lists(st.floats(0.0, 3 * margin), min_size=1, max_size=80))
    steps = draw(st.lists(st.integers(0, 3), min_size=len(gaps), max_size=len(gaps)))
    writes, now, seq = [], 1_000_000.0, draw(st.integers(0, 50))
    for gap, step in zip(gaps, steps, strict=True):
        now += gap
        seq += step
        writes.append((now, seq))
    first, last = writes[0][0], writes[-1][0]
    cut = draw(st.floats(first, last + margin))
    latency = draw(st.floats(0.0, margin / 4))
    back = draw(st.floats(0.0, 2 * margin))
    return writes, margin, cut, latency, back


def written_by(writes: list[tuple[float, int]], moment: float) -> int:
    return max((seq for at, seq in writes if at <= moment), default=writes[0][1])


def check_history(history_class: type[History], case: Any) -> None:
    """The oracle: a client back within the margin of its cut holds at least
    the start (so it replays, never resyncs), and the start is never older
    than the margin plus half a margin (so a replay stays bounded)."""
    writes, margin, cut, latency, back = case
    history = history_class("c", writes[0][0], [writes[0]])
    for at, seq in writes[1:]:
        if at <= cut:  # a zombie's later writes are superseded by the reconnect
            history.add(at, seq, margin)
        assert len(history.checkpoints) <= positions.MAX_CHECKPOINTS
    reconnect = cut + back
    start = history.start(reconnect, margin)
    held = written_by(writes, cut - latency)
    if back + latency <= margin:
        assert start <= held, (start, held)
    assert start >= written_by(writes, min(cut, reconnect - margin - margin / 2)) or (
        start == writes[0][1]
    )
    decoded = History.decode(history.encode())
    assert decoded is not None
    assert [s for _, s in decoded.checkpoints] == [s for _, s in history.checkpoints]


@settings(max_examples=400, deadline=None)
@given(timelines())
def test_a_client_back_within_the_margin_holds_the_start(case: Any) -> None:
    check_history(History, case)


class NoMargin(History):
    """Broken on purpose: resumes at the last seq written."""

    def start(self, now: float, margin: float) -> int:
        return self.checkpoints[-1][1]


class NoCoalescing(History):
    """Broken on purpose: forgets every checkpoint but the newest."""

    def add(self, now: float, seq: int, margin: float) -> bool:
        self.seen = now
        self.checkpoints = [(now, seq)]
        return True


@pytest.mark.parametrize("broken", [NoMargin, NoCoalescing])
def test_the_oracle_catches_a_broken_history(broken: type[History]) -> None:
    # Finding a wrong start is enough, so it is not shrunk.
    @settings(
        max_examples=400,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(timelines())
    def run(case: Any) -> None:
        check_history(broken, case)

    with pytest.raises(AssertionError):
        run()


def test_garbage_records_are_ignored() -> None:
    for raw in (None, "", "c", "c 1", "c x 1:2", "c 1 1:x", b"c 1 5"):
        assert History.decode(raw) is None
    assert History.decode(b"c 1000 2000:5") == History("c", 1.0, [(2.0, 5)])


def test_a_lower_seq_starts_the_history_again() -> None:
    history = History("c", 0.0, [(0.0, 500)])
    history.add(20.0, 501, 1.0)
    history.add(21.0, 3, 1.0)
    assert history.checkpoints == [(21.0, 3)]


# --------------------------------------------------------------------------
# Reconnecting in process, DatabaseStorage
# --------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def connect(user: Any, client_id: str) -> tuple[AsyncClient, Any]:
    # The test database is SQLite in memory, whose shared cache fails a
    # concurrent writer at once instead of waiting as a file database does:
    # no position save (a stream closed just before, this one's first) may
    # overlap the login's session save.
    await sync_to_async(positions.writer.flush)()
    client = AsyncClient()
    if user is not None:
        await sync_to_async(client.force_login)(user)
    response = await client.get(f"/api/events?client_id={client_id}")
    assert response.status_code == 200
    await sync_to_async(positions.writer.flush)()
    return client, response.streaming_content  # type: ignore[attr-defined]


async def publish(n: int, prefix: str) -> None:
    for i in range(n):
        await sync_to_async(publish_now)("global", [d.refresh_collection(f"{prefix}{i}")])


async def close(stream: Any) -> None:
    await stream.aclose()
    # The stream's last save runs when its generator is finalized.
    gc.collect()
    await sync_to_async(positions.writer.flush)()


def seqs(envelopes: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in envelopes]


@pytest.mark.django_db(transaction=True)
@pytest.mark.anyio
async def test_reconnect_replays_what_the_client_missed(alice: Any, bob: Any) -> None:
    await publish(2, "before")
    _, stream = await connect(alice, "page")
    assert await messages(stream, 1) == [{"type": "hello", "audience": "global", "last_seq": 2}]
    await publish(3, "seen")
    assert seqs(await messages(stream, 3)) == [3, 4, 5]
    await close(stream)
    await publish(2, "missed")

    _, again = await connect(alice, "page")
    hello, *rest = await messages(again, 6)
    # Within the margin of its start: from there, everything after it.
    assert hello == {"type": "hello", "audience": "global", "last_seq": 2}
    assert seqs(rest) == [3, 4, 5, 6, 7]
    await close(again)

    # The same client id under another user: its own, empty position.
    _, other = await connect(bob, "page")
    assert await messages(other, 1) == [{"type": "hello", "audience": "global", "last_seq": 7}]
    await close(other)


@pytest.mark.django_db(transaction=True)
@pytest.mark.anyio
async def test_outside_the_margin_the_start_moves_up(alice: Any) -> None:
    with override_settings(VERITY={"REPLAY_MARGIN": 0.2}):
        _, stream = await connect(alice, "page")
        await messages(stream, 1)
        await publish(2, "old")
        assert seqs(await messages(stream, 2)) == [1, 2]
        await asyncio.sleep(0.3)
        await publish(1, "new")  # wrote() saves: the last save is a half margin old
        assert seqs(await messages(stream, 1)) == [3]
        await asyncio.sleep(0.3)
        await close(stream)
        _, again = await connect(alice, "page")
        [hello] = await messages(again, 1)
    # Seq 3 was written more than a margin before the reconnect: not replayed.
    assert hello == {"type": "hello", "audience": "global", "last_seq": 3}
    await close(again)


@pytest.mark.django_db(transaction=True)
@pytest.mark.anyio
async def test_past_the_retention_the_reconnect_resyncs(alice: Any) -> None:
    with override_settings(VERITY={"REPLAY_RETENTION": 0.3}):
        _, stream = await connect(alice, "page")
        await messages(stream, 1)
        await publish(2, "x")
        await messages(stream, 2)
        await close(stream)
        await asyncio.sleep(0.5)
        _, again = await connect(alice, "page")
        assert await messages(again, 1) == [{"type": "hello", "audience": "global", "last_seq": 2}]
        await close(again)


@pytest.mark.django_db(transaction=True)
@pytest.mark.anyio
async def test_anonymous_without_a_session_and_replay_off_are_not_tracked(alice: Any) -> None:
    saved = positions.counters.positions_saved
    _, stream = await connect(None, "page")
    await messages(stream, 1)
    await close(stream)
    with override_settings(VERITY={"REPLAY_RETENTION": 0}):
        _, stream = await connect(alice, "page")
        await messages(stream, 1)
        await close(stream)
    assert positions.counters.positions_saved == saved


def save(store: Any, key: str, record: str, connection: str, claim: bool, ttl: float) -> bool:
    return bool(store.save_many([positions.Save(key, record, connection, claim, ttl)]) == 1)


@pytest.mark.django_db(transaction=True)
def test_a_superseded_connection_cannot_move_the_position() -> None:
    store = positions._DatabasePositions()
    assert save(store, "t:global", "old 1 1:5", "old", True, 60)
    assert save(store, "t:global", "new 2 2:3", "new", True, 60)
    assert not save(store, "t:global", "old 3 3:9", "old", False, 60)
    assert store.load(["t:global"]) == {"t:global": "new 2 2:3"}
    assert save(store, "t:global", "new 4 4:4", "new", False, 60)
    assert store.load(["t:global", "t:other"]) == {"t:global": "new 4 4:4"}


@pytest.mark.django_db(transaction=True)
def test_expired_positions_are_not_read_and_are_trimmed() -> None:
    from verity_django.models import ReplayPosition

    store = positions._DatabasePositions()
    assert save(store, "t:a", "c 1 1:1", "c", True, -1)
    assert store.load(["t:a"]) == {}
    # An expired record belongs to nobody: any connection may write over it.
    assert save(store, "t:a", "d 1 1:2", "d", False, 60)
    positions._DatabasePositions._last_trim = 0.0
    assert save(store, "t:b", "c 1 1:1", "c", True, -1)
    save(store, "t:c", "c 1 1:1", "c", True, 60)
    positions._DatabasePositions._last_trim = 0.0
    store._maybe_trim(store_now())
    assert set(ReplayPosition.objects.values_list("key", flat=True)) == {"t:a", "t:c"}


@pytest.mark.django_db
def test_a_trim_that_fails_leaves_the_saves_counted_as_saved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from verity_django.models import ReplayPosition

    store = positions._DatabasePositions()
    positions._DatabasePositions._last_trim = time.monotonic()  # no trim yet
    assert save(store, "t:a", "c 1 1:1", "c", True, -1)
    refuse_deletes(ReplayPosition._meta.db_table)
    positions._DatabasePositions._last_trim = 0.0
    assert save(store, "t:b", "c 1 1:1", "c", True, 60)
    assert set(ReplayPosition.objects.values_list("key", flat=True)) == {"t:a", "t:b"}
    assert "trimming replay positions failed" in caplog.text


def store_now() -> Any:
    from django.utils import timezone

    return timezone.now()


def test_the_writer_keeps_a_claim_when_a_newer_checkpoint_replaces_it() -> None:
    saved: list[tuple[str, str, str, bool]] = []

    class Store:
        def save_many(self, saves: list[positions.Save]) -> int:
            saved.extend((x.key, x.record, x.connection, x.claim) for x in saves)
            return len(saves)

        def load(self, keys: list[str]) -> dict[str, str]:
            return {}

        def recover(self) -> None:
            pass

    writer = positions.Writer()
    original = positions._store
    positions._store = Store
    try:
        with writer._cond:  # hold the thread off until both are queued
            writer._pending[("k", "c")] = positions.Save("k", "first", "c", True, 1.0)
        writer.submit("k", "second", "c", False, 1.0)
        assert writer.flush()
    finally:
        positions._store = original
    assert saved[-1] == ("k", "second", "c", True)
