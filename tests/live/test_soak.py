"""Soak: 100 consumers and a steady stream of mutations, with no fault at all.

Without faults there is nothing to notice: every consumer must receive every
seq of its audiences, in order, once, on its first connection, with no gap
and no error, and the server's memory must level off.

``test_soak`` runs for 25 s in every test run. ``test_soak_long`` (marked
``soak``) is skipped unless ``VERITY_SOAK_SECONDS`` is set, and then runs that
long: ``VERITY_SOAK_SECONDS=1800 ./scripts/test -m soak``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass, field

import pytest

from .conftest import AsgiServerFactory
from .scenarios import (
    Login,
    Mutator,
    account,
    caught_up,
    delivery_problems,
    mixed_mutations,
    project_ids,
    rss_kib,
    said_hello,
    settled,
    sqlite_counters,
    sqlite_envelopes,
    wait_all,
)
from .sse import VerityConsumer

CONSUMERS = 100
RATE = 10.0  # mutations per second, sent at a steady pace
DEFAULT_SECONDS = 25.0
SAMPLE_EVERY = 2.0


@dataclass
class SoakReport:
    seconds: float
    mutations: int = 0
    envelopes: dict[str, int] = field(default_factory=dict)
    delivered: int = 0
    rss_kib: list[tuple[float, int]] = field(default_factory=list)


async def soak(asgi_server_factory: AsgiServerFactory, login: Login, seconds: float) -> SoakReport:
    report = SoakReport(seconds)
    worker = asgi_server_factory()
    alice = account(worker.base_url, login, "alice")
    bob = account(worker.base_url, login, "bob")
    projects = project_ids(worker.base_url, alice)
    audiences = ["global", alice.audience, bob.audience]
    consumers = [
        VerityConsumer(worker.base_url, audiences=["global", acct.audience], cookies=acct.cookies)
        for acct, _ in zip(itertools.cycle([alice, bob]), range(CONSUMERS), strict=False)
    ]
    # Every tenth consumer is the origin of some mutations (echo rewriting).
    client_ids = {
        a.audience: [c.client_id for c in consumers[::10] if a.audience in c.audiences]
        for a in (alice, bob)
    }
    count = int(seconds * RATE) + 1
    mutations = mixed_mutations([alice, bob], projects, count, client_ids=client_ids, tag="soak")
    mutator = Mutator([worker.base_url])
    for consumer in consumers:
        consumer.start()
    try:
        await wait_all(consumers, said_hello, timeout=60)
        began = time.monotonic()
        next_sample = began
        in_flight: set[asyncio.Task[object]] = set()
        for n, mutation in enumerate(mutations):
            due = began + n / RATE
            now = time.monotonic()
            if now >= next_sample:
                report.rss_kib.append((now - began, rss_kib(worker.pid)))
                next_sample += SAMPLE_EVERY
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(mutator.send(mutation))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            if len(in_flight) >= 8:  # the server fell behind: wait rather than pile up
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        if in_flight:
            await asyncio.wait(in_flight)
        final = await settled(lambda: sqlite_counters(worker, audiences))
        await wait_all(consumers, caught_up(final), timeout=120)
        report.rss_kib.append((time.monotonic() - began, rss_kib(worker.pid)))
    finally:
        for consumer in consumers:
            await consumer.stop()
        await mutator.aclose()

    stats = mutator.stats
    report.mutations = stats.sent
    report.envelopes = final
    assert stats.ok == stats.sent, stats
    assert stats.missing_directives == []
    stored = {a: sqlite_envelopes(worker, a) for a in audiences}
    for audience in audiences:
        assert sorted(stored[audience]) == list(range(1, final[audience] + 1))
    problems = [p for c in consumers for p in delivery_problems(c, final, stored)]
    assert problems == []
    for consumer in consumers:
        # No fault, so nothing to notice: one connection, no gap, no duplicate,
        # every seq in order.
        assert consumer.connections == 1, consumer.summary()
        assert consumer.gaps == [] and consumer.resyncs == [], consumer.summary()
        assert consumer.duplicates == [] and consumer.errors == [], consumer.summary()
        for audience in consumer.audiences:
            start = next(h.last_seq for h in consumer.hellos if h.audience == audience)
            assert consumer.received[audience] == list(range(start + 1, final[audience] + 1))
        report.delivered += sum(len(v) for v in consumer.received.values())
    # Echoes went to their origin as empty envelopes with the same seq.
    echoes = sum(1 for c in consumers for e in c.envelopes if not e.directives)
    assert echoes > 0
    assert all(not c.echo_dropped for c in consumers)  # the server rewrote every echo
    # Memory levels off: after the first third (warm-up), RSS grows by less
    # than a generous constant for the rest of the run.
    samples = report.rss_kib
    warm = [kib for at, kib in samples if at >= seconds / 3]
    assert warm, samples
    assert max(warm) - warm[0] < 32 * 1024, samples
    print(
        f"\nsoak {seconds:.0f}s: {report.mutations} mutations, envelopes {report.envelopes}, "
        f"{report.delivered} deliveries to {CONSUMERS} consumers, {echoes} echoes, "
        f"rss KiB first/settled-start/max/last "
        f"{samples[0][1]}/{warm[0]}/{max(k for _, k in samples)}/{samples[-1][1]}"
    )
    return report


@pytest.mark.anyio
async def test_soak(asgi_server_factory: AsgiServerFactory, login: Login) -> None:
    await soak(asgi_server_factory, login, DEFAULT_SECONDS)


@pytest.mark.soak
@pytest.mark.anyio
async def test_soak_long(asgi_server_factory: AsgiServerFactory, login: Login) -> None:
    seconds = os.environ.get("VERITY_SOAK_SECONDS")
    if not seconds:
        pytest.skip("set VERITY_SOAK_SECONDS to run the long soak")
    await soak(asgi_server_factory, login, float(seconds))
