"""The publisher against transports that accept connections and never answer.

A black-hole TCP listener stands in for Redis, and separately for Pushpin's
control port; a real redis-server whose disk fills up, and a SQLite
database of the envelopes' own on a disk that fills up, stand in for a
storage that refuses writes. Mutations must still answer (each with its pull
directives) and a concurrent one must not queue behind the first; once the
transport is back, every envelope is stored exactly once, in seq order.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from liveservers.processes import (
    LOOPBACK,
    AsgiServer,
    AsgiServerWithEventsOnSmallDisk,
    RedisOnSmallDisk,
    RedisServer,
    free_port,
    require_binary,
    run_manage,
)
from tests.black_hole import BlackHole

from .conftest import AsgiServerFactory
from .sse import VerityConsumer

pytestmark = pytest.mark.anyio

Login = Callable[[str, str, str], httpx.Cookies]
# A mutation may wait out one transport timeout (1 s by default), never more.
ANSWER_WITHIN = 2.0


@pytest.fixture
def hole_port() -> int:
    return free_port()


def mutate(base_url: str, cookies: httpx.Cookies, todo: int, title: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=base_url, cookies=cookies, timeout=ANSWER_WITHIN) as client:
        response = client.patch(
            f"/api/todos/{todo}/",
            json={"title": title},
            headers={
                "X-CSRFToken": cookies["csrftoken"],
                "X-Verity-Directive-Request": "send me directives",
                "X-Client-ID": "window-a",
            },
        )
    assert response.status_code == 200, response.text
    directives: list[dict[str, Any]] = response.json()["directives"]
    assert directives
    return directives


def mutate_concurrently(base_url: str, cookies: httpx.Cookies, titles: list[str]) -> list[Any]:
    # httpx's timeout fails the test if either waits beyond one transport timeout.
    with ThreadPoolExecutor(len(titles)) as pool:
        return list(pool.map(lambda t: mutate(base_url, cookies, 1, t), titles))


async def test_a_black_hole_redis_never_holds_up_requests_and_nothing_is_lost(
    asgi_server_factory: AsgiServerFactory, login: Login, hole_port: int
) -> None:
    hole = BlackHole(hole_port)
    server = asgi_server_factory({"VERITY_REDIS": f"{LOOPBACK}:{hole_port}"})
    cookies = login(server.base_url, "alice", "alice-password")
    pulled = mutate_concurrently(server.base_url, cookies, ["one", "two"])
    pulled += [mutate(server.base_url, cookies, 1, f"later-{i}") for i in range(3)]
    hole.close()
    with RedisServer(port=hole_port) as redis_server:
        import redis

        client = redis.Redis(host=LOOPBACK, port=redis_server.port)
        me = httpx.get(f"{server.base_url}/api/auth/me/", cookies=cookies).json()
        channel = f"verity.user-{me['id']}"
        stored: list[dict[str, Any]] = []
        for _ in range(200):
            count = int(client.get(f"verity:counter:{channel}") or 0)
            if count >= len(pulled):
                break
            await _sleep(0.1)
        for seq in range(1, len(pulled) + 1):
            raw = client.get(f"verity:event:{channel}:{seq}")
            assert raw is not None, seq
            stored.append(json.loads(json.loads(raw)["data"]))
    # Each mutation's envelope exactly once, in the order the mutations
    # committed, carrying the keys of its pull copy.
    keys = [{x["idempotency_key"] for x in envelope["directives"]} for envelope in stored]
    expected = [{x["idempotency_key"] for x in directives} for directives in pulled]
    assert sorted(map(sorted, keys)) == sorted(map(sorted, expected))
    assert keys[2:] == expected[2:]
    assert [e["seq"] for e in stored] == list(range(1, len(pulled) + 1))


async def test_a_black_hole_pushpin_control_port_never_holds_up_requests(
    asgi_server_factory: AsgiServerFactory, login: Login, hole_port: int
) -> None:
    hole = BlackHole(hole_port)
    try:
        server = asgi_server_factory({"VERITY_GRIP_URL": f"http://{LOOPBACK}:{hole_port}"})
        cookies = login(server.base_url, "alice", "alice-password")
        me = httpx.get(f"{server.base_url}/api/auth/me/", cookies=cookies).json()
        audience = f"user-{me['id']}"
        async with VerityConsumer(server.base_url, (audience,), "window-b", cookies) as b:
            await b.wait_for(lambda c: len(c.hellos) >= 1, 15)
            start = b.hellos[0].last_seq
            pulled = await _in_thread(mutate_concurrently, server.base_url, cookies, ["x", "y"])
            for i in range(3):
                pulled.append(await _in_thread(mutate, server.base_url, cookies, 1, f"z{i}"))
            await b.wait_for(lambda c: len(c.received.get(audience, [])) >= len(pulled), 30)
        # Direct streams get every envelope once, in seq order, while the
        # proxy's control port swallows the GRIP publishes.
        assert b.received[audience] == list(range(start + 1, start + len(pulled) + 1))
    finally:
        hole.close()


class _Watched:
    """alice mutating todo 1 while a client watches her own audience: what
    each mutation pulled, and what the client received."""

    def __init__(
        self, server: AsgiServer, cookies: httpx.Cookies, audience: str, watcher: VerityConsumer
    ) -> None:
        self.server = server
        self.cookies = cookies
        self.audience = audience
        self.watcher = watcher
        self.start = watcher.hellos[0].last_seq
        self.pulled: list[list[dict[str, Any]]] = []
        self.concurrent: int | None = None

    async def mutate(self, title: str) -> None:
        self.pulled.append(await _in_thread(mutate, self.server.base_url, self.cookies, 1, title))

    async def mutate_concurrently(self, titles: list[str]) -> None:
        self.concurrent = len(self.pulled)
        self.pulled += await _in_thread(
            mutate_concurrently, self.server.base_url, self.cookies, titles
        )

    async def all_arrived(self, timeout: float) -> None:
        count = len(self.pulled)
        await self.watcher.wait_for(
            lambda c: len(c.received.get(self.audience, [])) >= count, timeout
        )

    async def after_recovery(self) -> None:
        await self.mutate("after")
        await self.all_arrived(30)
        # One more, once the rest is in: a copy sent twice would arrive before it.
        await self.mutate("last")
        await self.all_arrived(15)

    def assert_every_envelope_once_in_order(self) -> None:
        """Nothing for the client to resync, and each envelope carries the
        idempotency keys of its pull copy (the concurrent pair in either order)."""
        watcher = self.watcher
        seqs = list(range(self.start + 1, self.start + len(self.pulled) + 1))
        assert watcher.received[self.audience] == seqs
        assert (watcher.gaps, watcher.resyncs, watcher.duplicates, watcher.errors) == (
            [],
            [],
            [],
            [],
        )
        keys = [{x["idempotency_key"] for x in e.directives} for e in watcher.envelopes]
        expected = [{x["idempotency_key"] for x in directives} for directives in self.pulled]
        assert self.concurrent is not None
        pair = slice(self.concurrent, self.concurrent + 2)
        assert keys[: pair.start] == expected[: pair.start]
        assert sorted(map(sorted, keys[pair])) == sorted(map(sorted, expected[pair]))
        assert keys[pair.stop :] == expected[pair.stop :]


@contextlib.asynccontextmanager
async def _watched_by_alice(server: AsgiServer, login: Login) -> AsyncIterator[_Watched]:
    """alice's session and a client on her audience, which has received
    her first mutation."""
    cookies = login(server.base_url, "alice", "alice-password")
    me = httpx.get(f"{server.base_url}/api/auth/me/", cookies=cookies).json()
    audience = f"user-{me['id']}"
    async with VerityConsumer(server.base_url, (audience,), "window-b", cookies) as watcher:
        await watcher.wait_for(lambda c: len(c.hellos) >= 1, 15)
        watched = _Watched(server, cookies, audience, watcher)
        await watched.mutate("before")
        await watched.all_arrived(15)
        yield watched


@pytest.fixture
def redis_on_small_disk() -> Iterator[RedisOnSmallDisk]:
    with RedisOnSmallDisk(binary=require_binary("redis-server")) as server:
        yield server


async def test_a_full_disk_under_redis_fails_no_request_and_loses_no_envelope(
    asgi_server_factory: AsgiServerFactory,
    login: Login,
    redis_on_small_disk: RedisOnSmallDisk,
) -> None:
    """Redis's disk fills up: it refuses every write (``MISCONF``) but keeps
    its data, so once there is room again the stream goes on with no gap."""
    redis_server = redis_on_small_disk
    server = asgi_server_factory({"VERITY_REDIS": redis_server.address})
    async with _watched_by_alice(server, login) as watched:
        log_before = len(server.log_text())
        await _in_thread(redis_server.fill_disk)
        await watched.mutate_concurrently(["a", "b"])
        for i in range(3):
            await watched.mutate(f"full-{i}")
        while_full = server.log_text()[log_before:]
        assert await _in_thread(redis_server.aof_writes_fail)
        await _in_thread(redis_server.free_disk)
        await watched.after_recovery()

    assert (
        f"could not store an envelope for audience '{watched.audience}' (ResponseError: MISCONF"
        in while_full
    ), while_full
    watched.assert_every_envelope_once_in_order()


@pytest.fixture
def events_template(tmp_path: Path) -> Path:
    """A migrated database for the stored envelopes alone."""
    path = tmp_path / "events.sqlite3"
    env = {
        "VERITY_SQLITE_PATH": str(tmp_path / "not-migrated.sqlite3"),
        "VERITY_EVENTS_SQLITE_PATH": str(path),
    }
    run_manage("migrate", "--database", "events", "--noinput", env=env, check=True)
    return path


async def test_a_full_disk_under_the_storage_database_fails_no_request_and_loses_no_envelope(
    asgi_server_factory: AsgiServerFactory, login: Login, events_template: Path
) -> None:
    """The stored envelopes live in a SQLite database of their own whose disk
    fills up: the project's writes go on and answer with their pull
    directives, the appends fail and wait, and once there is room the stream
    goes on with no gap."""
    server = asgi_server_factory(events_on_small_disk=events_template)
    assert isinstance(server, AsgiServerWithEventsOnSmallDisk)
    async with _watched_by_alice(server, login) as watched:
        failed_store = f"could not store an envelope for audience '{watched.audience}'"
        log_before = len(server.log_text())
        await _in_thread(server.fill_disk)
        # SQLite may still write into room its files already hold, and finds
        # some again after a failure: mutate until an append fails, within a
        # bound, and take up whatever was freed before each step.
        for i in range(20):
            await watched.mutate(f"full-{i}")
            await _sleep(0.2)
            if failed_store in server.log_text()[log_before:]:
                break
            await _in_thread(server.fill_disk)
        else:
            pytest.fail("every append still succeeded on a full disk")
        first_failed = len(watched.pulled) - 1
        await _in_thread(server.fill_disk)
        await watched.mutate_concurrently(["a", "b"])
        await _in_thread(server.fill_disk)
        await watched.mutate("still-full")
        # The disk stays full until the retries have met all of them.
        waiting = f"; {len(watched.pulled) - first_failed} envelope(s) wait"
        for _ in range(100):
            await _in_thread(server.fill_disk)
            if waiting in server.log_text()[log_before:]:
                break
            await _sleep(0.1)
        while_full = server.log_text()[log_before:]
        await _in_thread(server.free_disk)
        await watched.after_recovery()

    assert f"{failed_store} (OperationalError: database or disk is full" in while_full, while_full
    assert waiting in while_full, while_full
    watched.assert_every_envelope_once_in_order()


async def test_a_management_command_envelope_reaches_a_connected_client(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    server = asgi_server_factory()
    cookies = login(server.base_url, "alice", "alice-password")
    async with VerityConsumer(server.base_url, ("global",), "window-c", cookies) as c:
        await c.wait_for(lambda x: len(x.hellos) >= 1, 15)
        env = {k: v for k, v in server.env.items() if k.startswith("VERITY_")}
        await _in_thread(
            run_manage, "verity_emit", '{"op":"refresh_collection","name":"from-cli"}', env=env
        )
        await c.wait_for(lambda x: len(x.envelopes) >= 1, 15)
    [envelope] = c.envelopes
    assert [d["name"] for d in envelope.directives] == ["from-cli"]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


async def _in_thread(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(func, *args, **kwargs)


def test_a_script_exiting_while_redis_is_a_black_hole_exits_and_logs_what_it_lost(
    hole_port: int,
) -> None:
    """A process that ends while its transport hangs waits ``FLUSH_TIMEOUT``
    for its backlog, then exits anyway and says what was not published."""
    hole = BlackHole(hole_port)
    script = (
        "from verity_django import directives, emit; emit(directives.refresh_collection('at-exit'))"
    )
    try:
        # The subprocess timeout only keeps a hang from stalling the suite.
        result = run_manage(
            "shell", "-c", script, env={"VERITY_REDIS": f"{LOOPBACK}:{hole_port}"}, timeout=60
        )
    finally:
        hole.close()
    assert result.returncode == 0, result.stderr
    assert "could not store an envelope for audience 'global'" in result.stderr
    assert "exiting with 1 envelope(s) not published" in result.stderr


def test_a_command_whose_database_never_answers_gives_up_in_time_and_says_so(
    hole_port: int,
) -> None:
    """``verity_emit`` waits ``FLUSH_TIMEOUT`` (5 s) for its envelope, then
    fails with a clear error, even when the storage is a PostgreSQL that
    accepts the connection and never answers and no ``connect_timeout`` is
    set (Django's default, which check W024 warns about; psycopg 3 then
    waits 130 s per connect). Exiting waits once more for the envelope still in flight, then says it
    was not published."""
    hole = BlackHole(hole_port)
    silent = f"postgres://verity:verity@{LOOPBACK}:{hole_port}/verity"
    try:
        # The subprocess timeout only keeps a hang from stalling the suite.
        result = run_manage(
            "verity_emit",
            '{"op": "refresh_collection", "name": "todos"}',
            env={"VERITY_DATABASE_URL": silent, "VERITY_DATABASE_CONNECT_TIMEOUT": "0"},
            timeout=60,
        )
    finally:
        hole.close()
    assert result.returncode == 1, result.stderr
    assert "verity_django.W024" in result.stderr
    assert "Could not publish to 'global': not published within 5.0 s" in result.stderr
    assert "exiting with 1 envelope(s) not published" in result.stderr
    assert "Sent to audience" not in result.stdout


_KEEP_A_RESPONSE_UNCLOSED = """
import builtins, weakref

class Early:
    pass

# weakref's exit hook registered before verity_django's, as any library
# using weakref.finalize does: that hook runs last.
early = Early()
weakref.finalize(early, print)

from django.contrib.auth import get_user_model
from django.http import JsonResponse
from django.test import RequestFactory
from testproject.todos.models import Project
from verity_django.middleware import DirectiveMiddleware

owner = get_user_model().objects.create(username="exiting")

def view(request):
    Project.objects.create(name="kept unclosed", owner=owner)
    return JsonResponse({})

request = RequestFactory().post("/anything/")
request.user = owner
builtins.kept = DirectiveMiddleware(view)(request)  # alive, never closed, at exit
"""

_STORED_NAMES = """
import json
from verity_django.storage import configured
events = configured().get_events("verity.global", 0)
print(json.dumps([json.loads(e.data)["directives"] for e in events]))
"""


def test_a_response_alive_and_unclosed_at_exit_still_publishes(tmp_path: Any) -> None:
    """A script that ends holding a response nobody closed (its batch waits
    for the close): the batch is delivered before the process exits."""
    env = {"VERITY_SQLITE_PATH": str(tmp_path / "db.sqlite3")}
    run_manage("migrate", "--verbosity", "0", env=env, check=True)
    # The subprocess timeouts only keep a hang from stalling the suite.
    result = run_manage("shell", "-c", _KEEP_A_RESPONSE_UNCLOSED, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    stored = run_manage("shell", "-c", _STORED_NAMES, env=env, timeout=60, check=True)
    # The last line: Django's shell may say first what it imported.
    [directives] = json.loads(stored.stdout.strip().splitlines()[-1])
    assert [x["name"] for x in directives] == ["projects"]
