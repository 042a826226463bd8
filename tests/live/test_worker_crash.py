"""A uvicorn worker SIGKILLed mid-burst: two workers behind one Redis.

Its consumers reconnect and are told what they missed; the survivor's never
notice; every seq the server allocated is received or seen as a gap. See
docs/reliability.md for the figures.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from liveservers.processes import RedisServer

from .conftest import AsgiServerFactory
from .scenarios import (
    Login,
    Mutator,
    account,
    caught_up,
    delivery_problems,
    mixed_mutations,
    project_ids,
    redis_client,
    redis_counters,
    redis_envelopes,
    run_burst,
    said_hello,
    settled,
    wait_all,
)
from .sse import VerityConsumer

BURST = 240
CONCURRENCY = 8


@pytest.mark.anyio
async def test_worker_sigkill_mid_burst_loses_nothing_unnoticed(
    asgi_server_factory: AsgiServerFactory,
    redis_server: RedisServer,
    login: Login,
    tmp_path: Path,
) -> None:
    env = {"VERITY_REDIS": redis_server.address}
    db = tmp_path / "shared.sqlite3"
    workers = [asgi_server_factory(env=env, sqlite_path=db) for _ in range(2)]
    survivor, victim = workers
    alice = account(survivor.base_url, login, "alice")
    bob = account(survivor.base_url, login, "bob")
    projects = project_ids(survivor.base_url, alice)
    audiences = ["global", alice.audience, bob.audience]

    consumers: dict[str, list[VerityConsumer]] = {"survivor": [], "victim": []}
    for (label, worker), acct in itertools.product(
        (("survivor", survivor), ("victim", victim)), (alice, bob)
    ):
        for _ in range(2):
            consumers[label].append(
                VerityConsumer(
                    worker.base_url,
                    audiences=["global", acct.audience],
                    cookies=acct.cookies,
                    max_backoff=0.5,
                )
            )
    everyone = consumers["survivor"] + consumers["victim"]
    # Some mutations claim a consumer as their origin, on either worker.
    client_ids = {
        a.audience: [c.client_id for c in everyone if a.audience in c.audiences]
        for a in (alice, bob)
    }
    mutations = mixed_mutations([alice, bob], projects, BURST, client_ids=client_ids)
    mutator = Mutator([survivor.base_url, victim.base_url])
    for consumer in everyone:
        consumer.start()
    try:
        await wait_all(everyone, said_hello, timeout=30)
        killed = asyncio.Event()

        def progress(done: int) -> None:
            if done == BURST // 3:
                killed.set()

        async def crash_and_restart() -> None:
            await killed.wait()
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(0.3)  # mutations keep flowing to the survivor meanwhile
            await asyncio.to_thread(victim.start)

        await asyncio.gather(
            run_burst(mutator, mutations, concurrency=CONCURRENCY, on_progress=progress),
            crash_and_restart(),
        )
        # One more round over every target after the restart, so every audience
        # has an envelope that every consumer must end up at.
        per_round = len(alice.todo_ids) + len(bob.todo_ids) + len(projects)
        await run_burst(
            mutator,
            mixed_mutations([alice, bob], projects, per_round, tag="after"),
            concurrency=2,
        )
        client = redis_client(redis_server)
        final = await settled(lambda: redis_counters(client, audiences))
        await wait_all(everyone, caught_up(final), timeout=60)
    finally:
        for consumer in everyone:
            await consumer.stop()
        await mutator.aclose()

    stored = {a: redis_envelopes(client, a, final[a]) for a in audiences}
    stats = mutator.stats
    assert stats.bad_status == []
    assert stats.missing_directives == []
    assert stats.ok + stats.failed == stats.sent
    assert stats.failed <= CONCURRENCY  # only requests in flight at the SIGKILL have no answer
    # Every seq is stored exactly once, contiguous from 1 (the Lua script is atomic).
    for audience in audiences:
        assert sorted(stored[audience]) == list(range(1, final[audience] + 1))
        assert all(stored[audience][s]["seq"] == s for s in stored[audience])
    problems = [p for c in everyone for p in delivery_problems(c, final, stored)]
    assert problems == []
    # The survivor's consumers never lost their stream: every seq, in order, no gap.
    for consumer in consumers["survivor"]:
        assert consumer.gaps == [], consumer.summary()
        assert consumer.connections == 1, consumer.summary()
        for audience in consumer.audiences:
            start = next(h.last_seq for h in consumer.hellos if h.audience == audience)
            expected = list(range(start + 1, final[audience] + 1))
            assert consumer.received[audience] == expected, consumer.summary()
    # The victim's consumers reconnected, and their hello told them what they missed.
    # (They may also record a seq jump on the live stream just after that hello:
    # see test_fresh_redis_worker_streams_skip_nothing.)
    for consumer in consumers["victim"]:
        assert consumer.connections >= 2, consumer.summary()
        assert any(e.kind == "transport" for e in consumer.errors), consumer.summary()
    victim_gaps = [g for c in consumers["victim"] for g in c.gaps]
    # They are logged in with a client id, so the server remembered their
    # positions (issue 15): a reconnect replays what they missed, or, started
    # above what they hold, its hello shows the gap.
    replayed = sum(len(c.replayed) for c in consumers["victim"])
    assert replayed or any(g.reason == "hello" for g in victim_gaps), (
        "nothing published while it was down"
    )
    print(
        f"\nworker-crash: sent={stats.sent} ok={stats.ok} no-answer={stats.failed} "
        f"rerouted={stats.rerouted} final={final} consumers={len(everyone)} "
        f"victim-gaps={[(g.audience, g.previous, g.seq, g.reason) for g in victim_gaps]} "
        f"victim-replayed={replayed}"
    )
