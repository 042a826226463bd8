"""A Redis pub/sub subscription that notices when its server falls silent.

A subscribed connection only ever reads. redis-py's ``listen()`` waits on it
forever, and a health check (``health_check_interval``) sends a PING without
waiting for the answer. So a Redis behind a dead network path, a host that
went away without a reset, or a proxy that stopped forwarding, leaves the
subscription open and quiet. The streams it feeds then hear nothing more,
and nothing shows them a gap. Here a subscription that has heard nothing
for ``timeout`` seconds sends a PING. If ``timeout`` more seconds pass without
any answer, :meth:`Subscription.message` raises :class:`SubscriptionSilent`,
and the caller starts over with a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable
from typing import Any, TypeVar, overload

T = TypeVar("T")


async def within(timeout: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or ``TimeoutError`` after ``timeout`` seconds.

    Not ``asyncio.wait_for``: on Python 3.11 it returns the result of an
    awaitable that finishes as the task is cancelled, swallowing the
    cancellation. A task that loops on such waits then runs on after its
    loop began to shut down, and the shutdown (a server's, a test's) waits
    for it forever.
    """
    async with asyncio.timeout(timeout):
        return await awaitable


class SubscriptionSilent(ConnectionError):
    """Redis answered neither a message nor a PING within the timeout."""


class Subscription:
    """``async with Subscription(details, channel, timeout=...) as s``: a
    subscription to ``channel`` on the Redis of ``details`` (redis-py's
    ``Redis`` arguments). Connecting and subscribing take at most
    ``timeout`` seconds each, unless ``details`` sets its own socket
    timeouts."""

    def __init__(self, details: dict[str, Any], channel: str, *, timeout: float) -> None:
        self.details = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            **details,
        }
        self.channel = channel
        self.timeout = timeout
        self._client: Any = None
        self._pubsub: Any = None
        self._heard = 0.0
        self._pinged: float | None = None

    async def __aenter__(self) -> Subscription:
        from redis.asyncio import Redis

        self._client = Redis(**self.details)
        self._pubsub = self._client.pubsub()
        try:
            await within(self.timeout, self._pubsub.subscribe(self.channel))
        except BaseException:
            await self._close()
            raise
        # Redis has not confirmed the subscription yet: that confirmation is
        # the first thing it must say.
        self._heard = asyncio.get_running_loop().time()
        self._pinged = None
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._close()

    async def _close(self) -> None:
        for closing in (self._pubsub, self._client):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await within(self.timeout, closing.aclose())

    @overload
    async def message(self, wait: None = None) -> dict[str, Any]: ...

    @overload
    async def message(self, wait: float) -> dict[str, Any] | None: ...

    async def message(self, wait: float | None = None) -> dict[str, Any] | None:
        """The next message (redis-py's dict: ``subscribe`` confirmations
        and ``message`` payloads alike), or None once ``wait`` seconds pass
        without one (``None``: wait as long as Redis keeps answering).
        Raises :class:`SubscriptionSilent` when Redis has fallen silent."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if wait is None else loop.time() + wait
        while True:
            now = loop.time()
            if now >= deadline:
                return None
            read_for = min(deadline - now, self.timeout)
            found = await within(
                read_for + self.timeout, self._pubsub.get_message(timeout=read_for)
            )
            now = loop.time()
            if found is not None:
                self._heard, self._pinged = now, None
                if found["type"] != "pong":
                    return dict(found)
                continue
            if self._pinged is not None:
                if now - self._pinged >= self.timeout:
                    raise SubscriptionSilent(
                        f"Redis did not answer a PING within {self.timeout} s "
                        f"on the subscription to {self.channel!r}"
                    )
            elif now - self._heard >= self.timeout:
                await within(self.timeout, self._pubsub.ping())
                self._pinged = now
