"""Sockets that never read hold up nobody, and the server's memory levels off.

The server stops writing to a stalled socket (backpressure) instead of
buffering for it, while every other consumer gets every envelope. See
docs/reliability.md for the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from liveservers.processes import AsgiServer

from .conftest import AsgiServerFactory
from .scenarios import (
    Account,
    Login,
    Mutation,
    Mutator,
    account,
    caught_up,
    delivery_problems,
    project_ids,
    publish_from_another_process,
    rss_kib,
    run_burst,
    said_hello,
    settled,
    sqlite_counters,
    wait_all,
)
from .sse import SSEParser, VerityConsumer

STALLED = 4
SLOW_BURST = 300
FLOOD_ENVELOPES = 400
FLOOD_BYTES = 16 * 1024  # per envelope (RESULT_MAX_BYTES): 6.25 MiB in all, more than
# a socket's send buffer (tcp_wmem max is 4 MiB)


def stalled_socket(worker: AsgiServer, acct: Account) -> socket.socket:
    """Open /api/events with a tiny receive buffer, then never read a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", worker.port))
    cookie = "; ".join(f"{k}={v}" for k, v in acct.cookies.items())
    request = (
        f"GET /api/events?audience=global&audience={acct.audience} HTTP/1.1\r\n"
        f"Host: {worker.address}\r\nAccept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
    )
    sock.sendall(request.encode())
    return sock


def server_send_queue(server_port: int, client_port: int) -> int:
    """Bytes the server wrote to one connection that its peer has not taken (Linux)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        if (
            int(local.split(":")[1], 16) == server_port
            and int(remote.split(":")[1], 16) == client_port
        ):
            return int(queues.split(":")[0], 16)
    raise AssertionError(f"no server socket for client port {client_port}")


def unread_bytes(sock: socket.socket) -> int:
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


async def read_until_seq(
    response: httpx.Response, audience: str, last: int, messages: list[dict[str, Any]]
) -> None:
    """Append the messages of an open stream until ``audience`` reaches seq ``last``."""
    parser = SSEParser()
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            if event.event != "message":
                messages.append({"event": event.event, "data": event.data[:200]})
                continue
            message = event.json()
            messages.append(message)
            if message.get("audience") == audience and message.get("seq") == last:
                return


@pytest.mark.anyio
async def test_stalled_consumers_do_not_hold_up_others_or_grow_memory(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    """Sockets that never read sit on /api/events through 2 x 300 envelopes from
    PATCHes, then a 6 MiB flood stored by another process.

    The other consumers still get every envelope; the server stops writing to
    the stalled sockets (backpressure) instead of buffering, so its RSS levels
    off; and a reader that stalled through all of it, then reads, still gets
    every seq in order.
    """
    worker = asgi_server_factory()
    alice = account(worker.base_url, login, "alice")
    projects = project_ids(worker.base_url, alice)
    audiences = ["global", alice.audience]
    readers = [
        VerityConsumer(worker.base_url, audiences=audiences, cookies=alice.cookies)
        for _ in range(4)
    ]
    # A reader that stalls: connected, then not read at all until the end (httpx
    # reads the socket only when iterated), with a tiny receive buffer.
    transport = httpx.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)]
    )
    late = httpx.AsyncClient(transport=transport, cookies=alice.cookies, timeout=30)
    sockets: list[socket.socket] = []
    mutator = Mutator([worker.base_url])
    project_edits = [
        Mutation(f"/api/projects/{p}/", {"name": f"slow {n}"}, "global", alice)
        for n, p in zip(range(SLOW_BURST), itertools.cycle(projects), strict=False)
    ]
    rss: dict[str, int] = {}
    queued: dict[str, list[int]] = {}
    try:
        for reader in readers:
            reader.start()
        await wait_all(readers, said_hello, timeout=30)
        # Warm up every code path once before the baseline.
        await run_burst(mutator, project_edits[:30], concurrency=4)
        await asyncio.to_thread(publish_from_another_process, worker, "global", 1, FLOOD_BYTES)
        sockets = [stalled_socket(worker, alice) for _ in range(STALLED)]
        async with late.stream(
            "GET",
            f"{worker.base_url}/api/events",
            params={"audience": ["global"]},
            headers={"Accept": "text/event-stream"},
        ) as late_response:
            assert late_response.status_code == 200
            counters = sqlite_counters(worker, audiences)
            await wait_all(readers, caught_up(counters), timeout=30)
            rss["baseline"] = rss_kib(worker.pid)
            for phase in ("burst1", "burst2", "flood", "flood2", "flood3"):
                if phase.startswith("flood"):
                    await asyncio.to_thread(
                        publish_from_another_process,
                        worker,
                        "global",
                        FLOOD_ENVELOPES,
                        FLOOD_BYTES,
                    )
                else:
                    await run_burst(mutator, project_edits, concurrency=4)
                counters = await settled(lambda: sqlite_counters(worker, audiences))
                await wait_all(readers, caught_up(counters), timeout=60)
                rss[phase] = rss_kib(worker.pid)
                queued[phase] = [
                    server_send_queue(worker.port, s.getsockname()[1]) for s in sockets
                ]
            pending = [unread_bytes(s) for s in sockets]
            # Now the stalled reader reads everything it was sent, with a normal
            # receive buffer (2 KiB would throttle it to a crawl).
            stream = late_response.extensions["network_stream"]
            late_socket = stream.get_extra_info("socket")
            late_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            late_messages: list[dict[str, Any]] = []
            try:
                await asyncio.wait_for(
                    read_until_seq(late_response, "global", counters["global"], late_messages),
                    timeout=60,
                )
            except TimeoutError:
                summary = [(m.get("type") or m.get("event"), m.get("seq")) for m in late_messages]
                raise AssertionError(
                    f"the late reader stopped at {summary[-5:]} of {counters}: {summary}"
                ) from None
        rss["after"] = rss_kib(worker.pid)
    finally:
        for sock in sockets:
            sock.close()
        for reader in readers:
            await reader.stop()
        await late.aclose()
        await mutator.aclose()

    stats = mutator.stats
    assert stats.ok == stats.sent == 30 + 2 * SLOW_BURST
    for reader in readers:
        assert reader.gaps == [] and reader.duplicates == [], reader.summary()
        assert delivery_problems(reader, counters) == []
    # The stalled sockets were sent data they never read ...
    assert all(n > 0 for n in pending), pending
    # ... and the server stopped writing to them: the kernel holds at most a
    # send buffer's worth (4 MiB max here), far less than the flood.
    flood = FLOOD_ENVELOPES * FLOOD_BYTES
    assert all(q < flood for q in queued["flood"]), queued
    # The late reader got hello then every seq from it, in order, once.
    envelopes = [m for m in late_messages if m.get("type") in ("hello", "directives")]
    assert envelopes[0]["type"] == "hello"
    start = envelopes[0]["last_seq"]
    seqs = [m["seq"] for m in envelopes[1:]]
    assert seqs == list(range(start + 1, counters["global"] + 1))
    # Memory: bounded growth over the first burst; the second burst (same load,
    # stalled sockets still open) adds next to nothing. The first flood raises
    # the high-water mark once (big chunks on every open stream); further floods
    # add nothing, where buffering for the stalled sockets would add 4 x 6 MiB each.
    assert rss["burst1"] - rss["baseline"] < 64 * 1024, rss
    assert rss["burst2"] - rss["burst1"] < 16 * 1024, rss
    assert rss["flood"] - rss["burst2"] < 192 * 1024, rss
    assert max(rss["flood2"], rss["flood3"]) - rss["flood"] < 16 * 1024, rss
    print(
        f"\nstalled: rss KiB {rss}; unread bytes per stalled socket {pending}; "
        f"server send queue bytes {queued}; final {counters}"
    )
