"""Envelopes, seq, and the publisher: steps, retries, the breaker, the backlog."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest
from django.test import override_settings
from django_eventstream.event import Event
from rest_framework.test import APIClient

import verity_django
from tests.conftest import DIRECTIVE_HEADERS
from tests.testapp.models import Todo
from verity_django import directives as d
from verity_django import publishing
from verity_django.audiences import channel_for
from verity_django.batching import Batch
from verity_django.publishing import counters, publish_now
from verity_django.rules import Routed
from verity_django.signals import envelope_published
from verity_django.storage import Append, configured

pytestmark = pytest.mark.postgresql


def stored(audience: str) -> list[dict[str, Any]]:
    events = configured().get_events(channel_for(audience), 0)
    return [json.loads(e.data) | {"_id": e.id} for e in events]


def test_envelope_shape_and_contiguous_seq_per_audience(db: Any) -> None:
    for _ in range(3):
        publish_now("user-1", [d.refresh_collection("todos", source="c1")])
    publish_now("global", [d.refresh_item("todo", 1)])
    envelopes = stored("user-1")
    assert [e["seq"] for e in envelopes] == [1, 2, 3]
    assert [e["_id"] for e in envelopes] == [1, 2, 3]
    assert envelopes[0] == {
        "type": "directives",
        "seq": 1,
        "audience": "user-1",
        "directives": [{"op": "refresh_collection", "name": "todos"}],
        "_id": 1,
    }
    assert [e["seq"] for e in stored("global")] == [1]


def test_a_request_stores_its_origin_tag_and_pushes_no_source(api: APIClient, todo: Todo) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
    )
    pulled = response.json()["directives"]
    assert {x["source"] for x in pulled} == {"client-a"}  # the pull copy keeps it
    event = configured().get_events(channel_for(f"user-{todo.owner_id}"), 0)[-1]
    envelope = json.loads(event.data)
    assert len(envelope.pop("origin")) == 32
    assert "source" not in envelope
    assert all("source" not in x for x in envelope["directives"])
    # The echo is harmless without a rewrite: the same keys as the pull copy.
    keys = {x["idempotency_key"] for x in envelope["directives"]}
    assert keys == {x["idempotency_key"] for x in pulled}


def test_replay_after_a_seq(db: Any) -> None:
    for i in range(5):
        publish_now("global", [d.refresh_item("todo", i)])
    events = configured().get_events(channel_for("global"), 3)
    assert [json.loads(e.data)["seq"] for e in events] == [4, 5]


class FlakyStorage:
    """The real storage behind a switch: ``fail`` appends raise."""

    def __init__(self) -> None:
        self.real = configured()
        self.fail = 0
        self.appends: list[str] = []

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Any]:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("storage is down")
        self.appends.extend(x.channel for x in appends)
        return self.real.append_many(event_type, appends)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture
def flaky(db: Any, monkeypatch: Any) -> FlakyStorage:
    storage = FlakyStorage()
    monkeypatch.setattr(publishing, "configured", lambda: storage)
    return storage


def test_publish_failure_never_fails_the_request_and_retries_in_order(
    api: APIClient, todo: Todo, flaky: FlakyStorage, caplog: Any
) -> None:
    flaky.fail = 1
    before = counters.failed
    with caplog.at_level(logging.ERROR, logger="verity_django.publishing"):
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
        )
    assert response.status_code == 200
    assert len(response.json()["directives"]) == 4
    assert counters.failed == before + 1
    assert counters.depth == 1 and counters.breaker_open
    assert "could not store an envelope for audience 'user-" in caplog.text
    assert "storage is down" in caplog.text
    # Storage is back: the waiting envelope goes out first, in order.
    api.patch(f"/api/todos/{todo.pk}/", {"title": "y"}, format="json", **DIRECTIVE_HEADERS)
    envelopes = stored(f"user-{todo.owner_id}")[-2:]
    assert [e["seq"] for e in envelopes] == [2, 3]
    assert [len(e["directives"]) for e in envelopes] == [4, 4]
    assert counters.depth == 0 and not counters.breaker_open


def test_a_receiver_that_raises_once_leaves_exactly_one_stored_copy(
    flaky: FlakyStorage, caplog: Any
) -> None:
    calls: list[int] = []

    def explode(sender: Any, seq: int, **kwargs: Any) -> None:
        calls.append(seq)
        if len(calls) == 1:
            raise RuntimeError("receiver bug")

    envelope_published.connect(explode, dispatch_uid="explode")
    errors = counters.receiver_errors
    try:
        with caplog.at_level(logging.ERROR, logger="verity_django.publishing"):
            verity_django.emit(d.refresh_collection("todos"))
            verity_django.emit(d.refresh_collection("projects"))
    finally:
        envelope_published.disconnect(dispatch_uid="explode")
    assert [e["seq"] for e in stored("global")] == [1, 2]
    assert flaky.appends == ["verity.global", "verity.global"]
    assert calls == [1, 2]
    assert counters.receiver_errors == errors + 1
    assert "receiver bug" in caplog.text


def test_emit_from_a_receiver_publishes_without_deadlock(db: Any) -> None:
    def chain(sender: Any, audience: str, seq: int, **kwargs: Any) -> None:
        if audience == "global":
            verity_django.emit(d.refresh_collection("audit"), "user-1")

    envelope_published.connect(chain, dispatch_uid="chain")
    try:
        done = threading.Event()

        def work() -> None:
            verity_django.emit(d.refresh_collection("todos"))
            done.set()

        # In this thread, inside the test's transaction, as a TestCase does.
        work()
    finally:
        envelope_published.disconnect(dispatch_uid="chain")
    assert done.is_set()
    assert [e["directives"][0]["name"] for e in stored("user-1")] == ["audit"]


def test_an_unencodable_envelope_is_dropped_and_later_ones_go_out(db: Any, caplog: Any) -> None:
    poison = d.Directive.trusted(op="refresh_collection", name="todos", params={"x": float("nan")})
    dropped = counters.dropped
    with caplog.at_level(logging.ERROR, logger="verity_django.publishing"):
        verity_django.emit(poison)
        verity_django.emit(d.refresh_collection("projects"))
    assert counters.dropped == dropped + 1
    assert "dropped an envelope for audience 'global': it cannot be encoded" in caplog.text
    # The dropped envelope's seq is skipped: readers see a gap and resync.
    assert configured().get_current_ids(["verity.global"]) == {"verity.global": 2}
    with pytest.raises(Exception, match="no longer stores event 1"):
        configured().get_events("verity.global", 0)
    [later] = configured().get_events("verity.global", 1)
    assert [x["name"] for x in json.loads(later.data)["directives"]] == ["projects"]


@override_settings(VERITY={"BACKLOG_LIMIT": 2})
def test_a_full_backlog_drops_the_oldest_and_readers_see_the_gap(
    flaky: FlakyStorage, caplog: Any
) -> None:
    flaky.fail = 100
    dropped = counters.dropped
    with caplog.at_level(logging.ERROR, logger="verity_django.publishing"):
        for name in ("a", "b", "c", "d"):
            verity_django.emit(d.refresh_collection(name))
    assert counters.dropped == dropped + 2
    assert counters.depth == 2
    assert "the backlog holds 2" in caplog.text
    flaky.fail = 0
    assert publishing.flush(timeout=5)
    current = configured().get_current_ids(["verity.global"])["verity.global"]
    assert current == 4
    kept = [json.loads(e.data) for e in configured().get_events("verity.global", 2)]
    assert [(e["seq"], e["directives"][0]["name"]) for e in kept] == [(3, "c"), (4, "d")]


def _batch(audience: str, name: str) -> Batch:
    batch = Batch()
    batch.add([Routed(d.refresh_collection(name), frozenset({audience}))])
    return batch


class _MemoryStorage:
    """Stores in memory, one seq for every channel; ``release`` lets appends
    that wait for it go on."""

    publishes_to_listeners = True

    def __init__(self) -> None:
        self.seq = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def _stored(self, event_type: str, appends: Sequence[Append]) -> list[Any]:
        out = []
        for item in appends:
            self.seq += 1
            out.append(
                Event(item.channel, event_type, f"{item.head}{self.seq}{item.tail}", self.seq)
            )
        return out


StorageT = TypeVar("StorageT", bound=_MemoryStorage)


def _publishing_into(monkeypatch: Any, storage: StorageT) -> Iterator[StorageT]:
    monkeypatch.setattr(publishing, "configured", lambda: storage)
    yield storage
    storage.release.set()
    assert publishing.flush(timeout=5)


class BlockingStorage(_MemoryStorage):
    """Appends wait until released, as on a transport that stopped answering."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[str] = []

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Any]:
        self.entered.set()
        self.release.wait(10)
        self.stored += [item.channel for item in appends]
        return self._stored(event_type, appends)


@pytest.fixture
def blocking(monkeypatch: Any) -> Iterator[BlockingStorage]:
    yield from _publishing_into(monkeypatch, BlockingStorage())


def test_a_second_request_never_queues_behind_a_stuck_publish(blocking: BlockingStorage) -> None:
    first = threading.Thread(target=publishing.deliver, args=(_batch("global", "a"),))
    first.start()
    assert blocking.entered.wait(5)
    # The first is stuck inside the storage; the second hands its envelope
    # over and returns without waiting.
    publishing.deliver(_batch("global", "b"))
    assert counters.depth == 2
    blocking.release.set()
    first.join(5)
    assert publishing.flush(timeout=5)
    assert blocking.stored == ["verity.global", "verity.global"]


def test_push_can_be_switched_off(api: APIClient, todo: Todo) -> None:
    before = stored(f"user-{todo.owner_id}")
    with override_settings(VERITY={"PUSH": False}):
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
        )
    assert len(response.json()["directives"]) == 4
    assert stored(f"user-{todo.owner_id}") == before


def test_one_envelope_per_audience_per_request(api: APIClient, alice: Any) -> None:
    response = api.post("/api/todos/", {"title": "a"}, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code == 201
    assert len(stored(f"user-{alice.pk}")) == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_request_consumes_no_seq(alice: Any) -> None:
    from django.db import transaction

    from tests.testapp.models import Project

    with pytest.raises(RuntimeError), transaction.atomic():
        Project.objects.create(name="x", owner=alice)
        raise RuntimeError
    Project.objects.create(name="y", owner=alice)
    assert [e["seq"] for e in stored("global")] == [1]


def test_counters_describe_the_backlog() -> None:
    snapshot = counters.as_dict()
    assert set(snapshot) >= {"depth", "oldest_age", "published", "failed", "dropped", "retried"}


def test_reset_waits_for_a_run_already_in_storage(blocking: BlockingStorage) -> None:
    # Tests reset between tests: a run still in storage must land before the
    # next test's database exists, or it stores an envelope there.
    first = threading.Thread(target=publishing.deliver, args=(_batch("global", "a"),))
    first.start()
    assert blocking.entered.wait(5)
    resetting = threading.Thread(target=publishing.reset)
    resetting.start()
    resetting.join(0.3)
    assert resetting.is_alive(), "reset() returned while a run was still in storage"
    blocking.release.set()
    resetting.join(5)
    first.join(5)
    assert blocking.stored == ["verity.global"]


class RecordingStorage(_MemoryStorage):
    """Records which thread stored each run. The publisher thread's appends
    wait for ``release``, as they wait for a round trip, while its caller
    goes on publishing."""

    shares_the_database = False

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[tuple[str, list[str]]] = []

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Any]:
        thread = threading.current_thread().name
        if thread == "verity-publisher":
            self.entered.set()
            self.release.wait(5)
        out = self._stored(event_type, appends)
        self.runs.append((thread, [json.loads(e.data)["directives"][0]["name"] for e in out]))
        return out

    def stored_by(self, thread: str) -> list[str]:
        return [x for name, names in self.runs if name == thread for x in names]


@pytest.fixture
def recording(monkeypatch: Any) -> Iterator[RecordingStorage]:
    yield from _publishing_into(monkeypatch, RecordingStorage())


_BURST = [f"n{i}" for i in range(20)]


def _publish_back_to_back(names: Sequence[str]) -> None:
    for name in names:
        publishing.publish("global", [d.refresh_collection(name)])


def _publish_alone(name: str) -> None:
    # Nothing else was published for far longer than a burst's gap.
    assert publishing.flush(timeout=5)
    time.sleep(0.05)
    publishing.publish("global", [d.refresh_collection(name)])


def test_a_lone_publish_is_stored_by_its_caller_and_a_burst_by_the_publisher(
    recording: RecordingStorage,
) -> None:
    caller = threading.current_thread().name
    _publish_alone("alone")
    assert recording.runs == [(caller, ["alone"])]
    _publish_back_to_back(_BURST)
    # Else this thread's flush() could store what the publisher has not yet
    # taken.
    assert recording.entered.wait(5)
    recording.release.set()
    assert publishing.flush(timeout=5)
    assert [x for _, names in recording.runs for x in names] == ["alone", *_BURST]
    # The burst's first publish comes alone (and, should this thread be held
    # up for longer than the gap, the next one too); the rest are left to the
    # publisher thread, which stores what waits in one call per run.
    by_caller = recording.stored_by(caller)
    assert by_caller == ["alone", *_BURST[: len(by_caller) - 1]]
    assert len(by_caller) - 1 < len(_BURST) // 2
    assert len([x for x in recording.runs if x[0] == "verity-publisher"]) <= 2
    _publish_alone("alone again")
    assert recording.runs[-1] == (caller, ["alone again"])


def test_without_the_burst_rule_every_publish_is_stored_by_its_caller(
    recording: RecordingStorage, monkeypatch: Any
) -> None:
    """The rule switched off on purpose: the test above tells the difference."""
    monkeypatch.setattr(publishing, "_BURST_GAP", 0.0)
    _publish_back_to_back(_BURST)
    assert recording.stored_by(threading.current_thread().name) == _BURST


def test_publish_now_is_stored_by_the_publisher_thread_after_what_came_before(
    recording: RecordingStorage,
) -> None:
    """``publish_now`` waits for its envelope within ``FLUSH_TIMEOUT``, which
    a caller storing it itself could not keep (a database that never answers
    its connect): the publisher thread stores it, in order."""
    recording.release.set()
    _publish_alone("alone")
    published = publish_now("global", [d.refresh_collection("now")])
    assert published.seq == 2
    caller = threading.current_thread().name
    assert recording.runs == [(caller, ["alone"]), ("verity-publisher", ["now"])]


@override_settings(VERITY={"FLUSH_TIMEOUT": 0.8})
def test_waiting_for_a_storage_that_does_not_answer_ends_on_time(
    recording: RecordingStorage,
) -> None:
    """The publisher thread's append hangs (``release`` is not set): the
    waits end after ``FLUSH_TIMEOUT`` and say so. An envelope whose store was
    tried may be stored, so it stays and goes out once the storage answers;
    one that waited behind it is taken back, as its caller was told."""
    with pytest.raises(TimeoutError, match=r"within 0\.8 s \(1 envelope\(s\) still wait, this one"):
        publish_now("global", [d.refresh_collection("hung")])
    assert recording.entered.is_set()
    with pytest.raises(TimeoutError, match=r"within 0\.8 s \(1 envelope\(s\) still wait\)"):
        publish_now("global", [d.refresh_collection("behind")])
    publishing.publish("global", [d.refresh_collection("after")])
    assert not publishing.flush()
    assert counters.depth == 2
    recording.release.set()
    assert publishing.flush(timeout=5)
    assert recording.stored_by("verity-publisher") == ["hung", "after"]
    assert recording.seq == 2


@override_settings(VERITY={"FLUSH_TIMEOUT": 2.0})
def test_publish_now_from_a_receiver_waits_out_a_request_that_holds_the_token(
    recording: RecordingStorage,
) -> None:
    """An ``envelope_published`` receiver runs in the publisher thread. If a
    request holds the publishing token when the receiver calls
    ``publish_now()``, the request leaves the rest to that same thread,
    which must then publish it itself rather than wait for itself."""
    recording.release.set()
    in_receiver = threading.Event()
    token_taken = threading.Event()
    answered = threading.Event()
    outcome: list[Any] = []

    def chain(sender: Any, audience: str, seq: int, **kwargs: Any) -> None:
        if audience != "global":
            return
        in_receiver.set()
        assert token_taken.wait(5)
        try:
            outcome.append(publish_now("user-1", [d.refresh_collection("from-receiver")]))
        except Exception as exc:
            outcome.append(exc)
        answered.set()

    envelope_published.connect(chain, dispatch_uid="chain-now")
    try:
        # Its announcement, and so the receiver, runs after publish_now() returns.
        publish_now("global", [d.refresh_collection("first")])
        assert in_receiver.wait(5)
        # A request holding the token, as while it publishes its own envelope.
        assert publishing._publisher.publishing.acquire(timeout=5)
        token_taken.set()
        time.sleep(0.2)
        publishing._publisher.publishing.release()
        # Nobody else publishes until the receiver has its answer.
        assert answered.wait(5)
        assert publishing.flush(timeout=5)
    finally:
        envelope_published.disconnect(dispatch_uid="chain-now")
    [published] = outcome
    assert isinstance(published, publishing.Published), published
    assert recording.stored_by("verity-publisher") == ["first", "from-receiver"]


def test_a_burst_into_the_callers_database_stays_inline(
    recording: RecordingStorage, monkeypatch: Any
) -> None:
    """The publisher thread's transactions would contend with the caller's
    for the database's write lock: such a storage keeps every publish inline."""
    monkeypatch.setattr(recording, "shares_the_database", True, raising=False)
    _publish_back_to_back(_BURST)
    assert recording.stored_by(threading.current_thread().name) == _BURST


class SlowStorage(_MemoryStorage):
    """Each append takes a moment, so that concurrent publishers overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[str] = []
        self.lock = threading.Lock()

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Any]:
        time.sleep(0.002)
        with self.lock:
            out = self._stored(event_type, appends)
            self.stored += [json.loads(e.data)["directives"][0]["name"] for e in out]
        return out


@pytest.mark.parametrize("threads", [2, 8])
def test_concurrent_publishers_leave_nothing_behind_without_a_flush(
    monkeypatch: Any, threads: int
) -> None:
    """Whoever lets go of publishing looks at the backlog: an envelope that
    met another publisher is published without anyone calling flush()."""
    storage = SlowStorage()
    monkeypatch.setattr(publishing, "configured", lambda: storage)
    names = [[f"t{t}-{i}" for i in range(15)] for t in range(threads)]

    def requests(mine: list[str]) -> None:
        for name in mine:
            publishing.deliver(_batch(f"user-{name.split('-')[0]}", name))

    workers = [threading.Thread(target=requests, args=(mine,)) for mine in names]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    assert _drained()
    assert sorted(storage.stored) == sorted(n for mine in names for n in mine)
    # Each thread's envelopes went out in the order it published them.
    for mine in names:
        assert [n for n in storage.stored if n in mine] == mine


def _drained(timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while counters.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    return counters.depth == 0


def test_an_envelope_that_met_another_publisher_goes_out_once_it_lets_go(
    blocking: BlockingStorage,
) -> None:
    first = threading.Thread(target=publishing.deliver, args=(_batch("global", "a"),))
    first.start()
    assert blocking.entered.wait(5)
    # Returns at once, leaving its envelope to whoever publishes.
    publishing.deliver(_batch("global", "b"))
    blocking.release.set()
    first.join(5)
    # Nobody calls flush(): the first publisher looked at the backlog when it
    # let go.
    assert _drained()
    assert blocking.stored == ["verity.global", "verity.global"]
