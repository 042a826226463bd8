"""``verity_django.subscriptions.Subscription`` against a real Redis, a
proxy that stops passing Redis's answers on, and a listener that never
answers at all."""

from __future__ import annotations

import pytest
import redis

from liveservers.processes import LOOPBACK, RedisServer
from tests.black_hole import BlackHole
from verity_django.subscriptions import Subscription, SubscriptionSilent, within

from .proxy import CuttingProxy

pytestmark = pytest.mark.anyio

TIMEOUT = 0.5
# A generous bound that only a wait without any timeout would exceed.
NEVER = 20


def details(port: int) -> dict[str, object]:
    return {"host": LOOPBACK, "port": port}


async def test_messages_arrive_and_an_idle_answering_redis_is_never_called_silent(
    redis_server: RedisServer,
) -> None:
    async with Subscription(details(redis_server.port), "news", timeout=TIMEOUT) as subscription:
        confirmed = await within(NEVER, subscription.message())
        assert confirmed is not None and confirmed["type"] == "subscribe"
        # Idle for several PING rounds: each PONG is heard, none is returned.
        assert await within(NEVER, subscription.message(wait=TIMEOUT * 5)) is None
        redis.Redis(**details(redis_server.port)).publish("news", "hello")  # type: ignore[arg-type]
        message = await within(NEVER, subscription.message())
        assert message is not None
        assert (message["type"], message["data"]) == ("message", b"hello")


async def test_a_redis_whose_answers_stop_arriving_is_called_silent(
    redis_server: RedisServer,
) -> None:
    proxy = CuttingProxy(redis_server.port)
    try:
        async with Subscription(details(proxy.port), "news", timeout=TIMEOUT) as subscription:
            confirmed = await within(NEVER, subscription.message())
            assert confirmed is not None and confirmed["type"] == "subscribe"
            proxy.answers_muted.set()
            redis.Redis(**details(redis_server.port)).publish("news", "lost")  # type: ignore[arg-type]
            with pytest.raises(SubscriptionSilent, match="did not answer a PING"):
                await within(NEVER, subscription.message())
    finally:
        proxy.close()


async def test_a_listener_that_never_answers_fails_the_subscription() -> None:
    hole = BlackHole()
    try:
        with pytest.raises((SubscriptionSilent, redis.RedisError, TimeoutError)):
            async with Subscription(details(hole.port), "news", timeout=TIMEOUT) as subscription:
                await within(NEVER, subscription.message())
    finally:
        hole.close()
