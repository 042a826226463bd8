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
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings

from liveservers.processes import LOOPBACK, RedisServer
from verity_django import directives as d
from verity_django import publishing
from verity_django.batching import Batch
from verity_django.rules import Routed
from verity_django.storage import RedisStorage

from .proxy import CuttingProxy


@pytest.fixture
def redis_behind_proxy(
    redis_server: RedisServer,
) -> Iterator[tuple[CuttingProxy, Any]]:
    import redis

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


def _deliver(name: str) -> None:
    batch = Batch()
    batch.add([Routed(d.refresh_collection(name), frozenset({"global"}))])
    publishing.deliver(batch)


def _stored_names(redis_client: Any) -> list[str]:
    import json

    count = int(redis_client.get("verity:counter:verity.global") or 0)
    names = []
    for seq in range(1, count + 1):
        raw = redis_client.get(f"verity:event:verity.global:{seq}")
        assert raw is not None, f"seq {seq} has no event"
        envelope = json.loads(json.loads(raw)["data"])
        names += [x["name"] for x in envelope["directives"]]
    return names


def _lose_answers_then_recover(proxy: CuttingProxy, redis_client: Any) -> list[str]:
    # Answered: Redis now knows the script, so the next append runs it at once.
    _deliver("before")
    proxy.answers_muted.set()
    _deliver("first")
    # Redis ran the append; its answer never came back.
    assert int(redis_client.get("verity:counter:verity.global") or 0) == 2
    assert publishing.counters.depth == 1
    _deliver("second")
    proxy.answers_muted.clear()
    assert publishing.flush(timeout=10)
    return _stored_names(redis_client)


def test_a_retry_after_a_lost_answer_stores_the_envelope_once(
    redis_behind_proxy: tuple[CuttingProxy, Any],
) -> None:
    proxy, redis_client = redis_behind_proxy
    assert _lose_answers_then_recover(proxy, redis_client) == ["before", "first", "second"]


def test_without_the_token_check_the_retry_stores_it_twice(
    redis_behind_proxy: tuple[CuttingProxy, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same scenario, retries presented as first attempts: the check
    above catches a storage that stores a retried envelope again."""
    proxy, redis_client = redis_behind_proxy
    call = RedisStorage._call

    def as_first_attempt(self: RedisStorage, event_type: str, item: Any, **kwargs: Any) -> Any:
        return call(self, event_type, dataclasses.replace(item, retried=False), **kwargs)

    monkeypatch.setattr(RedisStorage, "_call", as_first_attempt)
    assert _lose_answers_then_recover(proxy, redis_client) == ["before", "first", "first", "second"]
