"""Many SSE clients in one asyncio process, and the publish rounds they time.

    python -m bench.sse_load --port P --path '/api/events?audience=global' \
        --clients 1000 --publish-port P --rounds 20 --modes raw,verity --rss-pids PID

Each client is a bare ``asyncio.Protocol`` on a loopback socket (a few KB per
connection; httpx would cost far more at 10,000). A client counts as
connected once the hello envelope arrives (``--ready stream-open`` for
django-eventstream's own view, which sends none). It records ``time.time()`` the
first time it sees each envelope seq (``"type":"directives","seq":N``), which
both the verity envelope and the raw baseline message carry.

A round is one ``POST /bench/publish/<mode>/`` to the Django server; the
endpoint answers ``t0`` (the commit, or the moment before ``send_event``).
The round ends when every connected client has seen the next seq, or at
``--round-timeout``. Latencies are receive time minus ``t0``, same clock.
Modes alternate, and the first mode flips every round.

With ``--rss-pids`` the summed VmRSS of those processes is read after a
warm-up (20 connections opened and closed) and again after all clients are
connected and idle: memory per connection for M1.

The last line of stdout is the JSON result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ENVELOPE = re.compile(rb'"type":"directives","seq":(\d+),')
HELLO = b'"type":"hello"'
STREAM_OPEN = b"event: stream-open"
TAIL = 64
ATTEMPTS = 3


@dataclass
class Shared:
    """Receive times per seq, and the round waiting for one seq to be complete."""

    times: dict[int, list[float]] = field(default_factory=dict)
    waiting_seq: int = -1
    waiting_count: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def received(self, seq: int, now: float) -> None:
        found = self.times.get(seq)
        if found is None:
            found = self.times[seq] = []
        found.append(now)
        if seq == self.waiting_seq and len(found) >= self.waiting_count:
            self.done.set()


class SseClient(asyncio.Protocol):
    def __init__(self, shared: Shared, request: bytes, ready: bytes) -> None:
        self.shared = shared
        self.request = request
        self.ready = ready
        self.transport: asyncio.Transport | None = None
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.head = b""
        self.tail = b""
        self.last_seq = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.hello.done():
            self.head += data
            if not self.head.startswith(b"HTTP/1.1 200") and len(self.head) >= 12:
                line = self.head.split(b"\r\n", 1)[0].decode(errors="replace")
                self.hello.set_exception(ConnectionError(f"answered {line!r}"))
                return
            if self.ready not in self.head:
                return
            self.hello.set_result(None)
            data, self.head = self.head, b""
        buffer = self.tail + data
        if b'"type":"directives"' in buffer:
            for match in ENVELOPE.finditer(buffer):
                seq = int(match.group(1))
                if seq > self.last_seq:
                    self.last_seq = seq
                    self.shared.received(seq, now)
        self.tail = buffer[-TAIL:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"closed before hello: {exc!r}"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


def thread_count(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(list(Path(f"/proc/{pid}/task").iterdir()))
    return total


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
            if match:
                total += int(match.group(1))
    return total


@dataclass
class Options:
    host: str
    port: int
    path: str
    clients: int
    publish_port: int
    rounds: int
    modes: list[str]
    rss_pids: list[int]
    concurrency: int
    connect_budget: float
    round_timeout: float
    gap: float
    channel: str
    ready: bytes
    # A logged-in session and a client id per connection: what the server
    # remembers replay positions for (the replay-cost row).
    cookie: str = ""
    client_ids: bool = False


async def connect_many(
    options: Options, shared: Shared, count: int, budget: float
) -> tuple[list[SseClient], dict[str, int], float]:
    """Open ``count`` streams, at most ``concurrency`` at a time, within ``budget`` seconds."""
    loop = asyncio.get_running_loop()
    numbers = iter(range(1 << 30))

    def request() -> bytes:
        path = options.path
        if options.client_ids:
            path += f"&client_id=bench-{next(numbers)}-{id(shared)}"
        cookie = f"Cookie: {options.cookie}\r\n" if options.cookie else ""
        return (
            f"GET {path} HTTP/1.1\r\nHost: {options.host}:{options.port}\r\n{cookie}"
            "Accept: text/event-stream\r\nUser-Agent: verity-bench\r\n\r\n"
        ).encode()

    semaphore = asyncio.Semaphore(options.concurrency)
    connected: list[SseClient] = []
    errors: dict[str, int] = {}

    async def one() -> None:
        # Like an EventSource, a client that fails retries (after a pause),
        # up to ``ATTEMPTS`` times; every failure is counted.
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.5 * attempt)
            async with semaphore:
                protocol: SseClient | None = None
                try:
                    _, protocol = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: SseClient(shared, request(), options.ready),
                            options.host,
                            options.port,
                        ),
                        timeout=15,
                    )
                    await asyncio.wait_for(protocol.hello, timeout=30)
                    connected.append(protocol)
                    return
                except (OSError, TimeoutError, ConnectionError) as exc:
                    key = type(exc).__name__
                    if isinstance(exc, ConnectionError):
                        key += f": {exc}"
                    errors[key[:120]] = errors.get(key[:120], 0) + 1
                    if protocol is not None:
                        protocol.close()

    began = time.monotonic()
    tasks = [asyncio.create_task(one()) for _ in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=budget)
    for task in pending:
        task.cancel()
    if pending:
        errors["not attempted within the connect budget"] = len(pending)
        await asyncio.gather(*pending, return_exceptions=True)
    return connected, errors, time.monotonic() - began


def _summary(latencies_ms: list[float]) -> dict[str, float]:
    from bench.report import percentile

    return {
        "p50": percentile(latencies_ms, 50),
        "p99": percentile(latencies_ms, 99),
        "max": max(latencies_ms) if latencies_ms else float("nan"),
    }


async def run(options: Options) -> dict[str, Any]:
    shared = Shared()
    out: dict[str, Any] = {"clients_wanted": options.clients}

    # Warm-up: the first connections pay for lazy imports, thread pools, caches.
    warm, warm_errors, _ = await connect_many(options, shared, 20, 60)
    if warm_errors:
        out["warmup_errors"] = warm_errors
    for client in warm:
        client.close()
    await asyncio.sleep(1.0)
    gc.collect()
    if options.rss_pids:
        out["rss_before_kib"] = rss_kib(options.rss_pids)
        out["threads_before"] = thread_count(options.rss_pids)

    clients, errors, seconds = await connect_many(
        options, shared, options.clients, options.connect_budget
    )
    out.update(
        {"clients_connected": len(clients), "connect_errors": errors, "connect_seconds": seconds}
    )
    if options.rss_pids:
        await asyncio.sleep(3.0)
        after = rss_kib(options.rss_pids)
        out["rss_after_kib"] = after
        out["threads_after"] = thread_count(options.rss_pids)
        if clients:
            out["rss_per_connection_kib"] = (after - out["rss_before_kib"]) / len(clients)

    rounds: list[dict[str, Any]] = []
    if options.rounds and clients:
        base = f"http://{options.host}:{options.publish_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            stats = await http.get("/bench/stats/", params={"channel": options.channel})
            seq = int(stats.json()["seq"][options.channel])
            for number in range(options.rounds):
                modes = options.modes if number % 2 == 0 else list(reversed(options.modes))
                for mode in modes:
                    alive = [c for c in clients if not c.closed]
                    seq += 1
                    shared.waiting_seq = seq
                    shared.waiting_count = len(alive)
                    shared.done.clear()
                    response = await http.post(f"/bench/publish/{mode}/")
                    if response.status_code != 200:
                        raise SystemExit(f"publish {mode}: {response.status_code} {response.text}")
                    t0 = float(response.json()["t0"])
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(shared.done.wait(), options.round_timeout)
                    times = shared.times.get(seq, [])
                    latencies = [(t - t0) * 1000 for t in times]
                    rounds.append(
                        {
                            "mode": mode,
                            "seq": seq,
                            "expected": len(alive),
                            "received": len(times),
                            **_summary(latencies),
                        }
                    )
                    await asyncio.sleep(options.gap)
    out["rounds"] = rounds
    out["lost_connections"] = sum(1 for c in clients if c.closed)
    for client in clients:
        client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--publish-port", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--modes", default="raw,verity")
    parser.add_argument("--rss-pids", default="")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--connect-budget", type=float, default=120)
    parser.add_argument("--round-timeout", type=float, default=10)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--channel", default="verity.global")
    parser.add_argument(
        "--ready",
        choices=["hello", "stream-open"],
        default="hello",
        help="what makes a client count as connected (django-eventstream's view sends no hello)",
    )
    parser.add_argument("--cookie", default="", help="a Cookie header value for every client")
    parser.add_argument("--client-ids", action="store_true", help="a client_id per connection")
    args = parser.parse_args()
    options = Options(
        host=args.host,
        port=args.port,
        path=args.path,
        clients=args.clients,
        publish_port=args.publish_port or args.port,
        rounds=args.rounds,
        modes=[m for m in args.modes.split(",") if m],
        rss_pids=[int(p) for p in args.rss_pids.split(",") if p],
        concurrency=args.concurrency,
        connect_budget=args.connect_budget,
        round_timeout=args.round_timeout,
        gap=args.gap,
        channel=args.channel,
        ready=HELLO if args.ready == "hello" else STREAM_OPEN,
        cookie=args.cookie,
        client_ids=args.client_ids,
    )
    print(json.dumps(asyncio.run(run(options))))


if __name__ == "__main__":
    main()
