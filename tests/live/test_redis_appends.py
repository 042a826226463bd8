"""A Redis append whose answer is lost is not stored again by its retry.

redis-py gives up on a command after ``REDIS_TIMEOUT`` even when Redis ran
it: the envelope is stored (and published) while the publisher saw a
failure. Its retry presents the same append token, and the append script
answers with the seq it stored the first time. A proxy in front of a real
redis-server forwards every command and, with its answers muted, swallows
Redis's answers: the timeout users meet on a congested link.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveservers.processes import LOOPBACK, RedisServer
from tests.waiting import wait_for
from verity_django import directives as d
from verity_django import envelopes, publishing
from verity_django.batching import Batch
from verity_django.rules import Routed
from verity_django.storage import PUBSUB_CHANNEL, Append, RedisStorage

from .proxy import CuttingProxy


@pytest.fixture
def redis_behind_proxy(
    redis_server: RedisServer,
) -> Iterator[tuple[CuttingProxy, Any]]:
    proxy = CuttingProxy(redis_server.port)
    storage = RedisStorage()
    connection = {"host": LOOPBACK, "port": proxy.port}
    with override_settings(
        EVENTSTREAM_STORAGE_CONNECTION=connection,
        # Redis itself hands envelopes to listeners (no local tailer).
        EVENTSTREAM_REDIS=connection,
        VERITY={"REDIS_TIMEOUT": 0.3},
    ):
        original = publishing.configured
        publishing.configured = lambda: storage  # type: ignore[assignment]
        try:
            yield proxy, redis.Redis(host=LOOPBACK, port=redis_server.port)
        finally:
            proxy.answers_muted.clear()
            publishing.flush(timeout=5)
            publishing.configured = original  # type: ignore[assignment]
            proxy.close()


_AUDIENCES = ("global", "user-1", "user-2")


def _deliver(name: str, audiences: Sequence[str] = ("global",)) -> None:
    batch = Batch()
    batch.add([Routed(d.refresh_collection(name), frozenset(audiences))])
    publishing.deliver(batch)


def _counter(redis_client: Any, audience: str) -> int:
    return int(redis_client.get(f"verity:counter:verity.{audience}") or 0)


def _stored_names(redis_client: Any) -> dict[str, list[str]]:
    """The directives' names stored per audience, in seq order."""
    stored = {}
    for audience in _AUDIENCES:
        names = []
        for seq in range(1, _counter(redis_client, audience) + 1):
            raw = redis_client.get(f"verity:event:verity.{audience}:{seq}")
            assert raw is not None, f"seq {seq} of {audience} has no event"
            envelope = json.loads(json.loads(raw)["data"])
            names += [x["name"] for x in envelope["directives"]]
        stored[audience] = names
    return stored


def _lose_answers_then_recover(proxy: CuttingProxy, redis_client: Any) -> dict[str, list[str]]:
    # Answered: Redis now knows the script, so the next append runs it at once.
    _deliver("before")
    assert publishing.flush(timeout=5)
    failed = publishing.counters.failed
    proxy.answers_muted.set()
    # One envelope per audience, stored as one run in one script call (by
    # this thread, or by the publisher's when it counts as a burst): Redis
    # runs it, and its answer never comes back.
    _deliver("first", _AUDIENCES)
    wait_for(lambda: publishing.counters.failed > failed)
    assert [_counter(redis_client, a) for a in _AUDIENCES] == [2, 1, 1]
    assert publishing.counters.depth == 3
    # The breaker is open: this one waits behind the run, and the retry
    # stores all four in one run.
    _deliver("second")
    proxy.answers_muted.clear()
    assert publishing.flush(timeout=10)
    return _stored_names(redis_client)


def test_a_retry_after_a_lost_answer_stores_the_envelope_once(
    redis_behind_proxy: tuple[CuttingProxy, Any],
) -> None:
    proxy, redis_client = redis_behind_proxy
    assert _lose_answers_then_recover(proxy, redis_client) == {
        "global": ["before", "first", "second"],
        "user-1": ["first"],
        "user-2": ["first"],
    }


def _as_first_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the storage on purpose: retries are presented as first attempts."""
    append = RedisStorage._append

    def first_attempts(
        self: RedisStorage, event_type: str, appends: Sequence[Append], **kwargs: Any
    ) -> list[int]:
        fresh = [dataclasses.replace(item, retried=False) for item in appends]
        return append(self, event_type, fresh, **kwargs)

    monkeypatch.setattr(RedisStorage, "_append", first_attempts)


def test_without_the_token_check_the_retry_stores_it_twice(
    redis_behind_proxy: tuple[CuttingProxy, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same scenario with the storage broken on purpose: the check above
    catches a storage that stores a retried envelope again."""
    proxy, redis_client = redis_behind_proxy
    _as_first_attempts(monkeypatch)
    assert _lose_answers_then_recover(proxy, redis_client) == {
        "global": ["before", "first", "first", "second"],
        "user-1": ["first", "first"],
        "user-2": ["first", "first"],
    }


# --------------------------------------------------------------------------
# A run of envelopes is one script call
# --------------------------------------------------------------------------


@pytest.fixture
def redis_storage(redis_server: RedisServer) -> Iterator[tuple[RedisStorage, Any]]:
    connection = {"host": LOOPBACK, "port": redis_server.port}
    with override_settings(EVENTSTREAM_STORAGE_CONNECTION=connection, EVENTSTREAM_REDIS=connection):
        yield RedisStorage(), redis.Redis(**connection)


def _script_calls(redis_client: Any) -> int:
    stats = redis_client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def _listened(pubsub: Any, count: int) -> list[tuple[str, int, str]]:
    """(channel, seq, data) of the next ``count`` messages a listener gets."""
    received = []
    deadline = time.monotonic() + 10
    while len(received) < count:
        assert time.monotonic() < deadline, f"{len(received)} of {count} messages arrived"
        message = pubsub.get_message(timeout=1)
        if message is None or message["type"] != "message":
            continue
        body = json.loads(message["data"])
        received.append((body["channel"], int(body["pub_id"]), body["data"]))
    return received


_CHANNELS = ("verity.global", "verity.user-1", "verity.user-2")
# Text with what JSON and Lua each escape: quotes, backslashes, control
# characters, NUL, non-ASCII and astral characters.
_TEXT = st.text(max_size=40)
_APPENDS = st.lists(
    st.builds(
        Append,
        channel=st.sampled_from(_CHANNELS),
        head=_TEXT,
        tail=_TEXT,
        skip=st.integers(0, 3),
        token=st.one_of(st.just(""), st.text("0123456789abcdef", min_size=32, max_size=32)),
    ),
    min_size=1,
    max_size=70,
)


def test_a_run_is_one_script_call_and_listeners_get_each_envelope_in_seq_order(
    redis_storage: tuple[RedisStorage, Any],
) -> None:
    """Oracle: a counter per channel. Each run of generated envelopes is one
    script call; a listener receives each envelope once, in run order, with
    the next seq of its channel (after its skips) written between its halves;
    a reader of the storage gets the same bytes."""
    storage, redis_client = redis_storage
    # Redis learns the script on the first call (EVALSHA, then EVAL).
    storage.append_many(envelopes.EVENT_TYPE, [Append("verity.global", "", "")])
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(PUBSUB_CHANNEL)

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(_APPENDS)
    def run(appends: list[Append]) -> None:
        # An example that failed may have left messages and moved counters.
        while pubsub.get_message(timeout=0.01) is not None:
            pass
        counters = storage.get_current_ids(_CHANNELS)
        expected = []
        for item in appends:
            counters[item.channel] += 1 + item.skip
            seq = counters[item.channel]
            expected.append((item.channel, seq, f"{item.head}{seq}{item.tail}"))
        calls = _script_calls(redis_client)
        events = storage.append_many(envelopes.EVENT_TYPE, appends)
        assert _script_calls(redis_client) == calls + 1
        assert [(e.channel, e.id, e.data) for e in events] == expected
        assert _listened(pubsub, len(appends)) == expected
        for channel, seq, data in expected:
            [stored] = storage.get_events(channel, seq - 1, limit=1)
            assert (stored.id, stored.data) == (seq, data)

    run()
    pubsub.close()


def test_a_script_that_fails_midway_is_retried_without_storing_anything_twice(
    redis_storage: tuple[RedisStorage, Any],
) -> None:
    """Redis keeps what a failed script wrote before it failed: the first
    envelope is stored and published, then the second's counter is not an
    integer. The retry of the whole run answers the first with its seq."""
    storage, redis_client = redis_storage
    run = [
        Append("verity.global", "a", "", token="1" * 32),
        Append("verity.user-1", "b", "", token="2" * 32),
        Append("verity.global", "c", "", token="3" * 32),
    ]
    redis_client.hset("verity:counter:verity.user-1", "not", "an integer")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        storage.append_many(envelopes.EVENT_TYPE, run)
    assert storage.get_current_ids(["verity.global"]) == {"verity.global": 1}
    redis_client.delete("verity:counter:verity.user-1")
    retry = [dataclasses.replace(item, retried=True) for item in run]
    events = storage.append_many(envelopes.EVENT_TYPE, retry)
    assert [(e.channel, e.id, e.data) for e in events] == [
        ("verity.global", 1, "a1"),
        ("verity.user-1", 1, "b1"),
        ("verity.global", 2, "c2"),
    ]
    assert [e.data for e in storage.get_events("verity.global", 0)] == ["a1", "c2"]


def test_out_of_memory_refuses_the_whole_run_before_it_writes(
    redis_storage: tuple[RedisStorage, Any],
) -> None:
    """With ``maxmemory`` reached (and nothing to evict) Redis refuses the
    script at its first write: nothing of the run is stored, and the retry
    stores all of it once."""
    storage, redis_client = redis_storage
    storage.append_many(envelopes.EVENT_TYPE, [Append("verity.global", "a", "")])
    run = [Append("verity.global", x, "", token=x * 32) for x in "bcd"]
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", int(redis_client.info("memory")["used_memory"]))
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            storage.append_many(envelopes.EVENT_TYPE, run)
        assert storage.get_current_ids(["verity.global"]) == {"verity.global": 1}
    finally:
        redis_client.config_set("maxmemory", 0)
    retry = [dataclasses.replace(item, retried=True) for item in run]
    storage.append_many(envelopes.EVENT_TYPE, retry)
    assert [e.data for e in storage.get_events("verity.global", 0)] == ["a1", "b2", "c3", "d4"]


def test_django_eventstreams_own_send_event_still_stores_unsequenced(
    redis_storage: tuple[RedisStorage, Any],
) -> None:
    storage, _ = redis_storage
    storage.append_many(envelopes.EVENT_TYPE, [Append("verity.global", "a", "")])
    event = storage.append_event("verity.global", "message", {"text": "é\u2028"})
    assert event.id == 2
    [stored] = storage.get_events("verity.global", 1)
    assert (stored.type, json.loads(stored.data)) == ("message", {"text": "é\u2028"})
