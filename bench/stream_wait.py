"""What a stream pays per wake-up for django-eventstream's way of waiting.

``python -m bench.stream_wait [--wakes N] [--repetitions N]``

django-eventstream's stream waits for each envelope with a new task around
``aevent.wait()`` and ``asyncio.wait([task], timeout=20)``, so that it can
send a keep-alive every 20 s. Owning the stream loop would let verity await
the event directly under one ``asyncio.timeout``. This measures, on one
event loop and nothing else, what that would save per wake-up: Python and C
calls, event-loop iterations (each one an ``epoll_wait`` that lets go of the
GIL) and time, as medians of several runs, and prints the ratio of the
direct wait to django-eventstream's.
"""

from __future__ import annotations

import argparse
import asyncio
import selectors
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

Waiter = Callable[[asyncio.Event, list[int], int], Coroutine[Any, Any, None]]


async def eventstream_wait(event: asyncio.Event, woken: list[int], wakes: int) -> None:
    while len(woken) < wakes:
        task = asyncio.ensure_future(event.wait())
        while True:
            done, _ = await asyncio.wait([task], timeout=20)
            if task in done:
                break
        event.clear()
        woken.append(1)


async def direct_wait(event: asyncio.Event, woken: list[int], wakes: int) -> None:
    while len(woken) < wakes:
        async with asyncio.timeout(20):
            await event.wait()
        event.clear()
        woken.append(1)


async def _wake_each(event: asyncio.Event, woken: list[int], wakes: int) -> None:
    while len(woken) < wakes:
        before = len(woken)
        event.set()
        while len(woken) == before:
            await asyncio.sleep(0)


class _CountingSelector(selectors.DefaultSelector):
    selects = 0

    def select(self, timeout: float | None = None) -> Any:
        self.selects += 1
        return super().select(timeout)


def measure(waiter: Waiter, wakes: int, *, count_calls: bool) -> tuple[float, float, float]:
    """(calls, loop iterations, microseconds) per wake-up."""
    selector = _CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    calls = [0]

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            calls[0] += 1

    async def main() -> None:
        event = asyncio.Event()
        woken: list[int] = []
        waiting = loop.create_task(waiter(event, woken, wakes))
        await _wake_each(event, woken, wakes)
        await waiting

    started = time.perf_counter()
    if count_calls:
        sys.setprofile(count)
    try:
        loop.run_until_complete(main())
    finally:
        sys.setprofile(None)
        loop.close()
    elapsed = time.perf_counter() - started
    return calls[0] / wakes, selector.selects / wakes, elapsed / wakes * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wakes", type=int, default=20000)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    rows = {}
    for waiter in (eventstream_wait, direct_wait):
        calls, selects, _ = measure(waiter, args.wakes, count_calls=True)
        times = [measure(waiter, args.wakes, count_calls=False)[2] for _ in range(args.repetitions)]
        rows[waiter.__name__] = (calls, selects, statistics.median(times))
        print(
            f"{waiter.__name__:16} {calls:6.1f} calls, {selects:4.2f} loop iterations,"
            f" {rows[waiter.__name__][2]:6.1f} us per wake-up (median of {args.repetitions})"
        )
    ours, theirs = rows["direct_wait"], rows["eventstream_wait"]
    print(
        f"direct / django-eventstream: calls {ours[0] / theirs[0]:.2f},"
        f" loop iterations {ours[1] / theirs[1]:.2f}, time {ours[2] / theirs[2]:.2f}"
    )


if __name__ == "__main__":
    main()
