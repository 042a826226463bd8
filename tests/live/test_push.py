"""The push path against real processes: uvicorn, redis-server, pushpin.

Every test starts its own servers on loopback (see conftest.py) and reads
the SSE stream as the Verity client does (sse.VerityConsumer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from liveservers.processes import AsgiServer, RedisServer, free_port, run_manage

from .conftest import AsgiServerFactory, PushpinFactory
from .sse import VerityConsumer, read_events

pytestmark = pytest.mark.anyio

Login = Callable[[str, str, str], httpx.Cookies]
WAIT = 15.0


class Api:
    """A logged-in client of the demo API that asks for directives."""

    def __init__(self, base_url: str, cookies: httpx.Cookies, client_id: str) -> None:
        self.client = httpx.Client(base_url=base_url, cookies=cookies, timeout=15.0)
        self.client_id = client_id
        self.me = self.client.get("/api/auth/me/").json()

    def _headers(self) -> dict[str, str]:
        return {
            "X-CSRFToken": self.client.cookies["csrftoken"],
            "X-Verity-Directive-Request": "send me directives",
            "X-Client-ID": self.client_id,
        }

    def send(self, method: str, url: str, body: Any = None) -> dict[str, Any]:
        response = self.client.request(method, url, json=body, headers=self._headers())
        assert response.status_code < 300, response.text
        data: dict[str, Any] = response.json()
        return data

    @property
    def audience(self) -> str:
        return f"user-{self.me['id']}"


def without_source(directive: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in directive.items() if k != "source"}


def seqs_are_contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(1, len(seqs) + 1))


async def hello_received(consumer: VerityConsumer) -> None:
    await consumer.wait_for(lambda c: len(c.hellos) >= len(c.audiences), WAIT)


async def test_one_client_mutates_the_other_receives(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    cookies = login(server.base_url, "alice", "alice-password")
    api = Api(server.base_url, cookies, "window-a")
    audiences = (api.audience, "global")
    async with (
        VerityConsumer(server.base_url, audiences, "window-a", cookies) as a,
        VerityConsumer(server.base_url, audiences, "window-b", cookies) as b,
    ):
        await hello_received(a)
        await hello_received(b)
        body = await asyncio.to_thread(api.send, "PATCH", "/api/todos/1/", {"status": "done"})
        await b.wait_for(lambda c: len(c.envelopes) >= 1, WAIT)
        await a.wait_for(lambda c: len(c.envelopes) >= 1, WAIT)

    [received] = b.envelopes
    assert received.audience == api.audience
    # Pushed envelopes name no client; the pull copy keeps its source.
    assert received.source is None
    assert {x["source"] for x in body["directives"]} == {"window-a"}
    pulled = {x["idempotency_key"]: without_source(x) for x in body["directives"]}
    pushed = {x["idempotency_key"]: x for x in received.directives}
    assert pushed == pulled
    statuses = [
        x["params"]["status"] for x in received.directives if "status" in x.get("params", {})
    ]
    assert statuses == ["active", "done"]

    [echo] = a.envelopes
    assert echo.seq == received.seq
    assert echo.raw == {
        "type": "directives",
        "seq": received.seq,
        "audience": api.audience,
        "directives": [],
    }
    assert a.gaps == [] and b.gaps == []
    assert a.echo_dropped == [] and b.duplicates == []


async def test_hello_announces_the_last_seq(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    cookies = login(server.base_url, "alice", "alice-password")
    api = Api(server.base_url, cookies, "writer")
    for i in range(5):
        api.send("PATCH", "/api/todos/1/", {"title": f"title {i}"})
    events = await asyncio.to_thread(
        read_events,
        f"{server.base_url}/api/events?audience={api.audience}&audience=global",
        3,
        WAIT,
        None,
        dict(cookies),
    )
    assert events[0].event == "stream-open"
    hellos = [e.json() for e in events[1:]]
    assert hellos == [
        {"type": "hello", "audience": api.audience, "last_seq": 5},
        {"type": "hello", "audience": "global", "last_seq": 0},
    ]


async def test_foreign_audience_is_refused_with_403(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    alice = Api(server.base_url, login(server.base_url, "alice", "alice-password"), "a")
    bob_cookies = login(server.base_url, "bob", "bob-password")
    response = httpx.get(
        f"{server.base_url}/api/events?audience={alice.audience}", cookies=bob_cookies, timeout=WAIT
    )
    assert response.status_code == 403
    assert response.json() == {
        "detail": "You may not read these audiences.",
        "audiences": [alice.audience],
    }
    async with VerityConsumer(
        server.base_url, (alice.audience,), "bob", bob_cookies, stop_on_http_error=True
    ) as spy:
        await spy.wait_for(lambda c: c.status_codes != [], WAIT)
        alice.send("PATCH", "/api/todos/1/", {"title": "secret"})
        await asyncio.sleep(0.5)
    assert spy.status_codes == [403]
    assert spy.envelopes == [] and spy.hellos == []


async def test_command_in_another_process_reaches_clients_without_redis(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    cookies = login(server.base_url, "alice", "alice-password")
    api = Api(server.base_url, cookies, "writer")
    async with VerityConsumer(server.base_url, ("global",), "reader", cookies) as consumer:
        await hello_received(consumer)
        started = time.monotonic()
        result = await asyncio.to_thread(
            run_manage,
            "verity_force_reload",
            "--idempotency-key",
            "deploy-1",
            env=server.env,
            check=True,
        )
        assert "audience 'global' with seq 1" in result.stdout
        await consumer.wait_for(lambda c: len(c.envelopes) >= 1, WAIT)
        latency = time.monotonic() - started
        await asyncio.to_thread(api.send, "POST", "/api/projects/", {"name": "New"})
        await asyncio.to_thread(
            run_manage,
            "verity_emit",
            '{"op": "refresh_collection", "name": "projects"}',
            env=server.env,
            check=True,
        )
        await consumer.wait_for(lambda c: len(c.envelopes) >= 3, WAIT)
    print(f"force reload from another process reached the client {latency:.2f} s after start")
    reload_envelope = consumer.envelopes[0]
    assert reload_envelope.source is None
    assert reload_envelope.directives[0]["op"] == "force_reload_page"
    assert reload_envelope.directives[0]["idempotency_key"] == "deploy-1"
    assert consumer.received["global"] == [1, 2, 3]
    assert consumer.gaps == [] and consumer.duplicates == []


BURST_SCRIPT = """
from verity_django import directives as d
from verity_django.publishing import publish_now
for i in range(500):
    publish_now("global", [d.refresh_item("project", i)])
"""


async def test_a_500_envelope_burst_arrives_in_full_and_in_order(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    cookies = login(server.base_url, "alice", "alice-password")
    api = Api(server.base_url, cookies, "writer")
    consumers = [
        VerityConsumer(server.base_url, ("global",), f"reader-{i}", cookies) for i in range(3)
    ]
    for consumer in consumers:
        consumer.start()
    try:
        for consumer in consumers:
            await hello_received(consumer)
        # 500 envelopes from another process while 60 concurrent requests
        # publish from the server's own threads.
        script = asyncio.to_thread(
            run_manage, "shell", "-c", BURST_SCRIPT, env=server.env, check=True
        )

        def mutate(i: int) -> None:
            api.send("PATCH", "/api/projects/1/", {"name": f"name {i}"})

        with ThreadPoolExecutor(max_workers=6) as pool:
            requests = asyncio.get_running_loop().run_in_executor(
                None, lambda: list(pool.map(mutate, range(60)))
            )
            await asyncio.gather(script, requests)
        total = 560
        for consumer in consumers:
            await consumer.wait_for(lambda c: len(c.received.get("global", [])) >= total, 60)
    finally:
        for consumer in consumers:
            await consumer.stop()
    for consumer in consumers:
        assert seqs_are_contiguous(consumer.received["global"]), consumer.summary()
        assert consumer.gaps == [] and consumer.duplicates == []


async def test_two_workers_share_seq_and_delivery_through_redis(
    asgi_server_factory: AsgiServerFactory, redis_server: RedisServer, login: Login, tmp_path: Any
) -> None:
    env = {"VERITY_REDIS": redis_server.address}
    sqlite = tmp_path / "shared.sqlite3"
    worker1 = asgi_server_factory(env, sqlite)
    worker2 = asgi_server_factory(env, sqlite)
    cookies = login(worker1.base_url, "alice", "alice-password")
    api1 = Api(worker1.base_url, cookies, "w1")
    api2 = Api(worker2.base_url, cookies, "w2")
    audience = api1.audience
    on1 = VerityConsumer(worker1.base_url, (audience,), "reader-1", cookies)
    on2 = VerityConsumer(worker2.base_url, (audience,), "reader-2", cookies)
    async with on1, on2:
        await hello_received(on1)
        await hello_received(on2)

        def mutate(pair: tuple[int, Api]) -> None:
            i, api = pair
            api.send("PATCH", "/api/todos/1/", {"title": f"t{i}"})

        jobs = [(i, api1 if i % 2 else api2) for i in range(40)]
        with ThreadPoolExecutor(max_workers=4) as pool:
            await asyncio.to_thread(lambda: list(pool.map(mutate, jobs)))
        for consumer in (on1, on2):
            await consumer.wait_for(lambda c: len(c.received.get(audience, [])) >= 40, WAIT)
    for consumer in (on1, on2):
        assert consumer.received[audience] == list(range(1, 41)), consumer.summary()
        assert consumer.gaps == [] and consumer.duplicates == []
    assert {e.source for e in on1.envelopes} == {None}


async def test_pushpin_holds_the_connections(
    asgi_server_factory: AsgiServerFactory, pushpin_factory: PushpinFactory, login: Login
) -> None:
    port = free_port()
    proxy = pushpin_factory(f"127.0.0.1:{port}")
    app: AsgiServer = asgi_server_factory({"VERITY_GRIP_URL": proxy.control_url}, port=port)
    cookies = login(app.base_url, "alice", "alice-password")
    api = Api(app.base_url, cookies, "writer")
    api.send("PATCH", "/api/todos/1/", {"title": "before"})
    async with VerityConsumer(
        proxy.http_url, (api.audience, "global"), "reader", cookies
    ) as consumer:
        await hello_received(consumer)
        for i in range(3):
            await asyncio.to_thread(api.send, "PATCH", "/api/todos/1/", {"title": f"t{i}"})
        await asyncio.to_thread(api.send, "POST", "/api/projects/", {"name": "p"})
        await consumer.wait_for(lambda c: len(c.envelopes) >= 4, WAIT)
    assert [h.last_seq for h in consumer.hellos] == [1, 0]
    assert consumer.received[api.audience] == [2, 3, 4]
    assert consumer.received["global"] == [1]
    assert consumer.gaps == [] and consumer.duplicates == []
    # Behind Pushpin nothing rewrites per connection; envelopes name no
    # client, so the originator's copy goes through its seq bookkeeping.
    assert all(e.source is None and "origin" not in e.raw for e in consumer.envelopes)


async def test_keep_alives_arrive_within_20_seconds(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    async with VerityConsumer(server.base_url, ("global",), "idle") as consumer:
        await hello_received(consumer)
        await consumer.wait_for(
            lambda c: any(e.event.event == "keep-alive" for e in c.named_events), 25
        )
    assert consumer.errors == []
