"""``verity_django.subscriptions.Subscription`` against a real Redis, a
proxy that stops passing Redis's answers on, and a listener that never
answers at all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
import redis
from django.test import override_settings

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


async def test_the_listener_logs_a_redis_outage_when_it_begins_and_when_it_ends(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILLed, Redis refuses the listener's reconnects for several tries:
    one warning when the subscription is lost, debug lines for the tries,
    one warning once Redis is back and the subscription confirmed."""
    from django_eventstream.views import get_listener_manager

    from verity_django import tailer
    from verity_django.storage import PUBSUB_CHANNEL

    def subscribed() -> bool:
        client = redis.Redis(**details(redis_server.port))  # type: ignore[arg-type]
        try:
            return any(n for _, n in client.pubsub_numsub(PUBSUB_CHANNEL))
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "verity_django.tailer"]

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(NEVER):
            while not condition():
                await asyncio.sleep(0.05)

    with (
        override_settings(EVENTSTREAM_REDIS=details(redis_server.port)),
        caplog.at_level(logging.DEBUG, "verity_django"),
    ):
        listener = asyncio.create_task(tailer._run_redis_listener(get_listener_manager()))
        try:
            await until(subscribed)
            redis_server.kill()
            await until(lambda: any("failed again" in m for m in messages()))
            redis_server.start()
            await until(lambda: any("works again" in m for m in messages()))
            assert subscribed()
        finally:
            listener.cancel()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "verity_django.tailer" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("verity_django: the Redis subscription failed (")
    assert warnings[0].endswith("); retrying until it works")
    tries = sum("failed again" in m for m in messages()) + 1
    assert warnings[1] == (
        f"verity_django: the Redis subscription works again, after {tries} failed tries"
    )
