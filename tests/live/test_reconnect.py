"""Reconnect without loss (issue 15), against real processes.

A consumer reads its stream through ``CuttingProxy``, a small loopback TCP
proxy that cuts connections the way networks do: the client gets a reset, the
server gets no FIN and keeps writing into a socket nobody reads. While the
consumer is away, more envelopes are published. It reconnects with the same
``client_id`` and must end up with every envelope of its audience: no gap, no
resync, each directive applied once after idempotency.

The oracle is a second consumer of the same audience that is never cut: the
directives the cut consumer applied must be exactly the ones the reference
applied. Cut points, pace and time away are generated (hypothesis, a few
examples per transport), and the same checker fails with replay turned off.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from liveservers.processes import LOOPBACK, AsgiServer, RedisServer, free_port

from .conftest import AsgiServerFactory, PushpinFactory
from .proxy import CuttingProxy
from .sse import VerityConsumer, read_events

Login = Callable[[str, str, str], httpx.Cookies]
WAIT = 20.0
# Short, so that a stream lives longer than its margin and the start moves up.
MARGIN = "1.0"


@pytest.fixture
def cutting_proxy() -> Iterator[Callable[[int], CuttingProxy]]:
    made: list[CuttingProxy] = []

    def make(upstream_port: int) -> CuttingProxy:
        proxy = CuttingProxy(upstream_port)
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


# --------------------------------------------------------------------------
# Publishing, and the checker
# --------------------------------------------------------------------------


class Writer:
    """Alice's other window: every PATCH publishes one envelope, to her own
    audience (a todo) or to ``global`` (a project)."""

    def __init__(self, base_url: str, cookies: httpx.Cookies, *, to_global: bool = False) -> None:
        self.client = httpx.Client(base_url=base_url, cookies=cookies, timeout=15.0)
        me = self.client.get("/api/auth/me/").json()
        self.audience = "global" if to_global else f"user-{me['id']}"
        self.url = "/api/projects/1/" if to_global else "/api/todos/1/"
        self.field = "name" if to_global else "title"
        self.count = 0

    def patch(self) -> None:
        self.count += 1
        response = self.client.patch(
            self.url,
            json={self.field: f"change {self.count}"},
            headers={"X-CSRFToken": self.client.cookies["csrftoken"], "X-Client-ID": "writer"},
        )
        assert response.status_code == 200, response.text

    def close(self) -> None:
        self.client.close()


def keys(directives: list[Any]) -> collections.Counter[str]:
    return collections.Counter(str(x["idempotency_key"]) for x in directives)


def check_no_loss(cut: VerityConsumer, reference: VerityConsumer, audience: str) -> None:
    """The seq-stream checker: the cut consumer saw no gap and no resync, and
    applied exactly the directives the never-cut reference applied, each once."""
    assert reference.gaps == [] and reference.resyncs == [], reference.summary()
    assert cut.gaps == [] and cut.resyncs == [], cut.summary()
    assert cut.errors == [] or all(e.kind == "transport" for e in cut.errors), cut.summary()
    assert cut.tracked[audience] == reference.tracked[audience]
    applied = keys(cut.applied)
    assert max(applied.values(), default=1) == 1, "a directive applied twice"
    assert applied == keys(reference.applied), cut.summary()
    # Each connection resumed exactly where its hello said.
    for hello in cut.hellos:
        after = [e.seq for e in cut.envelopes if e.connection == hello.connection]
        assert after == list(range(hello.last_seq + 1, hello.last_seq + 1 + len(after)))


@dataclass(frozen=True)
class Case:
    before: int  # envelopes the consumer receives before the cut
    pace: float  # seconds between PATCHes, cut or not
    away: int  # envelopes published while the consumer cannot reconnect
    after: int  # envelopes published once it is back
    clean: bool  # a clean close (FIN) instead of a cut


cases = st.builds(
    Case,
    before=st.integers(1, 25),
    pace=st.sampled_from([0.0, 0.02, 0.08]),
    away=st.integers(1, 6),
    after=st.integers(0, 4),
    clean=st.booleans(),
)


async def reconnect_scenario(
    case: Case,
    proxy: CuttingProxy,
    reader_url: str,
    writer: Writer,
    cookies: httpx.Cookies,
    client_id: str,
    *,
    reconnect_to: int | None = None,
) -> tuple[VerityConsumer, VerityConsumer]:
    """Publish across a cut; return the cut consumer and the reference once
    both hold the last seq."""
    audience = writer.audience
    cut = VerityConsumer(proxy.base_url, (audience,), client_id, cookies)
    reference = VerityConsumer(reader_url, (audience,), f"{client_id}-ref", cookies)
    publishing = True

    def publish_steadily() -> None:
        while publishing:
            writer.patch()
            time.sleep(case.pace)

    async with cut, reference:
        for consumer in (cut, reference):
            await consumer.wait_for(lambda c: len(c.hellos) >= 1, WAIT)
        background = asyncio.create_task(asyncio.to_thread(publish_steadily))
        try:
            await cut.wait_for(lambda c: len(c.envelopes) >= case.before, WAIT)
            proxy.accepting.clear()
            if case.clean:
                await cut.drop_connection()
            else:
                assert proxy.cut() == 1
            publishing = False
            await background
            for _ in range(case.away):
                await asyncio.to_thread(writer.patch)
            if reconnect_to is not None:
                proxy.upstream_port = reconnect_to
        finally:
            publishing = False
            await background
            proxy.accepting.set()
        await cut.wait_for(lambda c: c.connections >= 2 and len(c.hellos) >= 2, WAIT)
        for _ in range(case.after):
            await asyncio.to_thread(writer.patch)
        final = await asyncio.to_thread(current_seq, reader_url, audience, cookies)
        await reference.wait_for(lambda c: c.tracked.get(audience, 0) >= final, WAIT)
        await cut.wait_for(lambda c: c.tracked.get(audience, 0) >= final or bool(c.resyncs), WAIT)
    return cut, reference


def current_seq(base_url: str, audience: str, cookies: httpx.Cookies) -> int:
    """The audience's seq now: what the hello of a stream without client id says."""
    events = read_events(f"{base_url}/api/events?audience={audience}", 2, WAIT, None, dict(cookies))
    last_seq: int = events[1].json()["last_seq"]
    return last_seq


def run_cases(
    scenario: Callable[[Case, str], Any],
    examples: int,
) -> None:
    counter = iter(range(10_000))
    replayed: list[int] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        # Real processes: report the first failing case instead of shrinking it.
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def run(case: Case) -> None:
        cut, reference = asyncio.run(scenario(case, f"page-{next(counter)}"))
        check_no_loss(cut, reference, reference.audiences[0])
        replayed.append(len(cut.replayed))

    run()
    # A reconnect that resumed exactly at the client's seq replays nothing; most must.
    assert sum(replayed) > 0, replayed


# --------------------------------------------------------------------------
# The transports
# --------------------------------------------------------------------------


@dataclass
class Setup:
    proxy: CuttingProxy
    reader_url: str
    writer: Writer
    cookies: httpx.Cookies
    other_port: int | None = None


@pytest.fixture
def one_uvicorn(
    asgi_server_factory: AsgiServerFactory,
    login: Login,
    cutting_proxy: Callable[[int], CuttingProxy],
) -> Iterator[Callable[..., Setup]]:
    writers: list[Writer] = []

    def make(**env: str) -> Setup:
        server = asgi_server_factory({"VERITY_REPLAY_MARGIN": MARGIN, **env})
        cookies = login(server.base_url, "alice", "alice-password")
        writers.append(Writer(server.base_url, cookies))
        return Setup(cutting_proxy(server.port), server.base_url, writers[-1], cookies)

    yield make
    for writer in writers:
        writer.close()


def scenario_for(setup: Setup) -> Callable[[Case, str], Any]:
    def scenario(case: Case, client_id: str) -> Any:
        return reconnect_scenario(
            case,
            setup.proxy,
            setup.reader_url,
            setup.writer,
            setup.cookies,
            client_id,
            reconnect_to=setup.other_port,
        )

    return scenario


def test_one_uvicorn_replays_what_a_cut_stream_missed(one_uvicorn: Callable[..., Setup]) -> None:
    run_cases(scenario_for(one_uvicorn()), examples=8)


def test_the_checker_fails_without_replay(one_uvicorn: Callable[..., Setup]) -> None:
    setup = one_uvicorn(VERITY_REPLAY_RETENTION="0")
    with pytest.raises(AssertionError, match=r"gaps=\[Gap"):
        cut, reference = asyncio.run(
            scenario_for(setup)(Case(5, 0.02, 3, 1, clean=False), "page-broken")
        )
        check_no_loss(cut, reference, setup.writer.audience)


def test_two_uvicorns_behind_redis_reconnecting_to_the_other(
    asgi_server_factory: AsgiServerFactory,
    redis_server: RedisServer,
    login: Login,
    cutting_proxy: Callable[[int], CuttingProxy],
    tmp_path: Any,
) -> None:
    env = {"VERITY_REDIS": redis_server.address, "VERITY_REPLAY_MARGIN": MARGIN}
    sqlite = tmp_path / "shared.sqlite3"
    first = asgi_server_factory(env, sqlite)
    second = asgi_server_factory(env, sqlite)
    cookies = login(first.base_url, "alice", "alice-password")
    writer = Writer(first.base_url, cookies)
    ports = [first.port, second.port]
    setup = Setup(cutting_proxy(first.port), second.base_url, writer, cookies)

    def scenario(case: Case, client_id: str) -> Any:
        # Every reconnect goes to the other process than the one it was cut from.
        setup.proxy.upstream_port = ports[0]
        ports.reverse()
        return reconnect_scenario(
            case, setup.proxy, setup.reader_url, writer, cookies, client_id, reconnect_to=ports[0]
        )

    try:
        run_cases(scenario, examples=5)
    finally:
        writer.close()


@pytest.mark.parametrize("audience", ["global", "user"])
def test_pushpin_replays_from_the_previous_connections_start(
    asgi_server_factory: AsgiServerFactory,
    pushpin_factory: PushpinFactory,
    login: Login,
    cutting_proxy: Callable[[int], CuttingProxy],
    audience: str,
) -> None:
    """Pushpin's recovery requests (``link=next&recover=true``, without the
    session cookie) are signed with its key: on alice's own audience they
    stream as alice, so the held stream goes on after each recovery."""
    port = free_port()
    pushpin = pushpin_factory(f"{LOOPBACK}:{port}")
    app: AsgiServer = asgi_server_factory(
        {"VERITY_GRIP_URL": pushpin.grip_url, "VERITY_REPLAY_MARGIN": MARGIN}, port=port
    )
    cookies = login(app.base_url, "alice", "alice-password")
    writer = Writer(app.base_url, cookies, to_global=audience == "global")
    pushpin_port = int(pushpin.http_url.rsplit(":", 1)[1].rstrip("/"))
    setup = Setup(cutting_proxy(pushpin_port), pushpin.http_url, writer, cookies)
    scenario = scenario_for(setup)

    async def never_cut_by_a_recovery(case: Case, client_id: str) -> Any:
        cut, reference = await scenario(case, client_id)
        # The reference is never cut: a recovery refused would end it.
        assert reference.errors == [] and reference.connections == 1, reference.summary()
        return cut, reference

    try:
        run_cases(never_cut_by_a_recovery, examples=3)
    finally:
        writer.close()
    if audience == "user":
        # The recoveries this relied on did happen, and were served.
        recoveries = [line for line in app.log_text().splitlines() if "recover=true" in line]
        print(f"{len(recoveries)} recovery requests")
        assert recoveries and all(" 200 " in line for line in recoveries), recoveries


# --------------------------------------------------------------------------
# Who gets a replay
# --------------------------------------------------------------------------


def test_past_the_retention_the_reconnect_resyncs(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory({"VERITY_REPLAY_RETENTION": "1"})
    cookies = login(server.base_url, "alice", "alice-password")
    writer = Writer(server.base_url, cookies)
    try:
        # Global is untouched by the PATCHes; the test checks the user audience.
        again = asyncio.run(_reconnect_user_audience(server.base_url, writer, cookies, 2.0))
    finally:
        writer.close()
    assert [(g.reason, g.seq - g.previous) for g in again.gaps] == [("hello", 1)]


def test_within_the_retention_the_reconnect_replays(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory({"VERITY_REPLAY_RETENTION": "30"})
    cookies = login(server.base_url, "alice", "alice-password")
    writer = Writer(server.base_url, cookies)
    try:
        again = asyncio.run(_reconnect_user_audience(server.base_url, writer, cookies, 0.0))
    finally:
        writer.close()
    held = again.hellos[0].previous
    assert held is not None and again.hellos[0].last_seq < held
    assert again.gaps == [] and [e.seq for e in again.replayed] == [held]
    assert len(again.skipped) > 0 and again.tracked[writer.audience] == held + 1


def test_another_user_with_the_same_client_id_gets_no_replay(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    alice = login(server.base_url, "alice", "alice-password")
    bob = login(server.base_url, "bob", "bob-password")
    writer = Writer(server.base_url, alice)

    async def run() -> tuple[VerityConsumer, VerityConsumer]:
        async with VerityConsumer(server.base_url, ("global",), "shared-id", alice) as first:
            await first.wait_for(lambda c: len(c.hellos) >= 1, WAIT)
            # Envelopes to global, which both may read: a project rename.
            for i in range(3):
                await asyncio.to_thread(
                    writer.client.patch,
                    "/api/projects/1/",
                    json={"name": f"p{i}"},
                    headers={"X-CSRFToken": writer.client.cookies["csrftoken"]},
                )
            await first.wait_for(lambda c: c.tracked.get("global", 0) >= 3, WAIT)
        async with VerityConsumer(server.base_url, ("global",), "shared-id", bob) as other:
            await other.wait_for(lambda c: len(c.hellos) >= 1, WAIT)
            await asyncio.sleep(0.5)
        return first, other

    try:
        first, other = asyncio.run(run())
    finally:
        writer.close()
    [hello] = other.hellos
    assert hello.last_seq == first.tracked["global"], "bob resumed from alice's position"
    assert other.envelopes == []


async def _reconnect_user_audience(
    base_url: str, writer: Writer, cookies: httpx.Cookies, pause: float
) -> VerityConsumer:
    audience = writer.audience
    async with VerityConsumer(base_url, (audience,), "page", cookies) as first:
        await first.wait_for(lambda c: len(c.hellos) >= 1, WAIT)
        await asyncio.to_thread(writer.patch)
        await first.wait_for(lambda c: len(c.envelopes) >= 1, WAIT)
    await asyncio.to_thread(writer.patch)
    await asyncio.sleep(pause)
    again = VerityConsumer(base_url, (audience,), "page", cookies)
    # The same page: it still holds its seq and its idempotency keys.
    again.tracked.update(first.tracked)
    again._keys.update(first._keys)
    async with again:
        held = first.tracked[audience]
        await again.wait_for(lambda c: c.tracked.get(audience, 0) > held or bool(c.gaps), WAIT)
    return again
