"""What the events view keeps in memory while an open stream waits for news.

In-process, no server: the frame a suspended stream sits in is what every
open connection holds for its whole life.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import pytest

from verity_django import directives as d


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_idle_stream_does_not_pin_its_last_chunk() -> None:
    """In-process: what the events view keeps while a stream waits for news.

    Every open connection spends most of its life suspended in
    ``verity_django.views._stream``, waiting for django-eventstream's next
    chunk. Whatever that frame still references then stays in memory once per
    connection: after a catch-up read of 100 envelopes, a whole chunk.
    """
    import gc
    import tracemalloc

    from verity_django.views import _stream

    size = 8 * 1024 * 1024
    release = asyncio.Event()

    def big_chunk() -> bytes:
        envelope = {
            "type": "directives",
            "seq": 1,
            "audience": "global",
            "directives": [
                {"op": "refresh_collection", "name": "todos", "result": {"blob": "x" * size}}
            ],
        }
        text = d.dumps(envelope)
        return f"event: message\nid: verity.global:1\ndata: {text}\n\n".encode()

    async def content() -> AsyncIterator[bytes]:
        yield b"event: stream-open\ndata:\n\n"
        yield big_chunk()
        await release.wait()

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        stream = _stream(
            content(),
            "",
            {"verity.global": 0},
            {"verity.global": 0},
            {"verity.global": "global"},
            None,
            use_tailer=False,
        )
        await stream.__anext__()  # stream-open
        delivered = await stream.__anext__()
        assert len(delivered) > size
        del delivered  # sent: the transport holds nothing more
        waiting = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # suspended now, waiting for the next chunk
        assert not waiting.done()
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        release.set()
        with contextlib.suppress(StopAsyncIteration):
            await waiting
        await cast("AsyncGenerator[bytes, None]", stream).aclose()
    assert retained < size // 8, (
        f"a stream waiting for its next chunk keeps {retained / 2**20:.1f} MiB alive after a "
        f"{size / 2**20:.0f} MiB chunk; an open connection pins that much each"
    )
