"""Revocation across real processes: two uvicorn workers sharing a database,
with and without Redis, and revocations made by a third process (a
``manage.py shell``) or by a logout on the other worker.

Random rounds (fixed seeds) open streams as random users and sessions, on
random workers, with random audiences; then revoke at random (a user, a
user's audience, an audience for everybody, a session's logout). The oracle
below, written independently of verity_django, says which streams must end;
every other stream must still receive an envelope published afterwards.
A cut stream ends with a ``stream-error`` and nothing after it.

Behind Pushpin (one instance, GRIP with its key) the streams are held by the
proxy, not by a server process: a revocation from a shell, a logout and a
revocation of an audience for everybody each end exactly the held streams
they name, and the others keep receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from liveservers.processes import LOOPBACK, AsgiServer, RedisServer, free_port, run_manage

from .conftest import AsgiServerFactory, PushpinFactory
from .sse import SSEEvent, iter_events

pytestmark = pytest.mark.anyio

Login = Callable[[str, str, str], httpx.Cookies]
WAIT = 15.0
USERS = {"alice": "alice-password", "bob": "bob-password"}


@dataclass
class Session:
    username: str
    pk: int
    cookies: httpx.Cookies
    logged_out: bool = False


@dataclass(eq=False)
class Watched:
    """One SSE connection, read in the background."""

    base_url: str
    session: Session
    audiences: tuple[str, ...]
    events: list[SSEEvent] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    status: int | None = None
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        params = [("audience", a) for a in self.audiences]
        try:
            async with (
                httpx.AsyncClient(
                    cookies=self.session.cookies, timeout=httpx.Timeout(10.0, read=None)
                ) as client,
                client.stream("GET", f"{self.base_url}/api/events", params=params) as response,
            ):
                self.status = response.status_code
                async for event in iter_events(response):
                    self.events.append(event)
        finally:
            self.ended.set()

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task

    def messages(self) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if e.event == "message" and e.data]

    @property
    def hellos(self) -> int:
        return sum(1 for m in self.messages() if m["type"] == "hello")

    def received(self, name: str) -> bool:
        return any(
            x.get("name") == name
            for m in self.messages()
            if m["type"] == "directives"
            for x in m["directives"]
        )

    def describe(self) -> str:
        return f"{self.session.username}@{self.base_url} {self.audiences}: {self.events!r}"


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def shell(env: dict[str, str], code: str) -> None:
    result = run_manage("shell", "-c", code, env=env, check=True)
    assert "Traceback" not in result.stderr, result.stderr


def revoke_in_another_process(
    env: dict[str, str], plan: list[tuple[str | None, str | None]]
) -> None:
    code = (
        "import verity_django\n"
        "from django.contrib.auth import get_user_model\n"
        f"for username, audience in {plan!r}:\n"
        "    user = get_user_model().objects.get(username=username) if username else None\n"
        "    verity_django.revoke(user, audience)\n"
    )
    shell(env, code)


def emit_in_another_process(env: dict[str, str], name: str, audiences: set[str]) -> None:
    args = ["verity_emit", json.dumps({"op": "refresh_collection", "name": name})]
    for audience in sorted(audiences):
        args += ["--audience", audience]
    run_manage(*args, env=env, check=True)


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def must_end(
    stream: Watched,
    revocations: list[tuple[str | None, str | None]],
    logouts: list[Session],
) -> bool:
    """A revocation names a user (or everybody) and an audience (or all of
    them); a logout names a session."""
    if stream.session in logouts:
        return True
    return any(
        (user is None or user == stream.session.username)
        and (audience is None or audience in stream.audiences)
        for user, audience in revocations
    )


# --------------------------------------------------------------------------
# Random rounds
# --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["redis", "database"])
# One fixed seed per transport: each round is a long live run (suite budget).
@pytest.mark.parametrize("seed", [1])
async def test_random_revocations_across_two_workers(
    asgi_server_factory: AsgiServerFactory,
    request: pytest.FixtureRequest,
    login: Login,
    tmp_path: Any,
    transport: str,
    seed: int,
) -> None:
    rng = random.Random(seed)
    env: dict[str, str] = {}
    if transport == "redis":
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        env["VERITY_REDIS"] = redis_server.address
    sqlite = tmp_path / "shared.sqlite3"
    workers = [asgi_server_factory(env, sqlite), asgi_server_factory(env, sqlite)]
    shell_env = {**env, "VERITY_SQLITE_PATH": str(sqlite)}

    def new_session(username: str) -> Session:
        cookies = login(workers[0].base_url, username, USERS[username])
        me = httpx.get(f"{workers[0].base_url}/api/auth/me/", cookies=cookies).json()
        return Session(username, me["id"], cookies)

    sessions = [new_session(u) for u in ("alice", "alice", "bob", "bob")]
    for round_ in range(3):
        await one_round(rng, workers, sessions, shell_env, round_)


async def one_round(
    rng: random.Random,
    workers: list[AsgiServer],
    sessions: list[Session],
    shell_env: dict[str, str],
    round_: int,
) -> None:
    streams: list[Watched] = []
    live = [s for s in sessions if not s.logged_out]
    for _ in range(6):
        session = rng.choice(live)
        own = f"user-{session.pk}"
        audiences = tuple(rng.choice([("global",), (own,), (own, "global")]))
        streams.append(Watched(rng.choice(workers).base_url, session, audiences))
    for stream in streams:
        stream.start()
    try:
        await until(lambda: all(s.hellos == len(s.audiences) for s in streams), "hellos")
        pks = {s.username: s.pk for s in sessions}
        revocations: list[tuple[str | None, str | None]] = []
        for _ in range(rng.randint(1, 2)):
            user = rng.choice([None, "alice", "bob"])
            choices: list[str | None] = ["global"]
            if user is not None:
                choices += [None, f"user-{pks[user]}"]
            revocations.append((user, rng.choice(choices)))
        logouts: list[Session] = []
        if rng.random() < 0.5 and len(live) > 2:
            logouts.append(rng.choice(live))

        await asyncio.to_thread(revoke_in_another_process, shell_env, revocations)
        for session in logouts:
            worker = rng.choice(workers)
            response = httpx.post(
                f"{worker.base_url}/api/auth/logout/",
                cookies=session.cookies,
                headers={"X-CSRFToken": session.cookies["csrftoken"]},
            )
            assert response.status_code == 204, response.text
            session.logged_out = True

        doomed = [s for s in streams if must_end(s, revocations, logouts)]
        kept = [s for s in streams if s not in doomed]
        plan = f"round {round_}: {revocations} logouts {[s.username for s in logouts]}"
        await until(lambda: all(s.ended.is_set() for s in doomed), f"{plan}: cut streams end")
        for stream in doomed:
            assert stream.events[-1].event == "stream-error", stream.describe()
            assert stream.events[-1].json()["condition"] == "forbidden"
            assert not any(e.event == "message" and '"directives"' in e.data for e in stream.events)

        probe = f"probe-{round_}"
        audiences = {a for s in kept for a in s.audiences}
        if audiences:
            await asyncio.to_thread(emit_in_another_process, shell_env, probe, audiences)
        await until(lambda: all(s.received(probe) for s in kept), f"{plan}: the others go on")
        assert not any(s.ended.is_set() for s in kept), [s.describe() for s in kept]
        assert not any(s.received(probe) for s in doomed)
    finally:
        for stream in streams:
            await stream.stop()


async def test_a_plain_eventsource_reconnects_after_a_cut(
    asgi_server_factory: AsgiServerFactory, redis_server: RedisServer, login: Login, tmp_path: Any
) -> None:
    """Cut on one worker by a revocation made in another process; the
    reconnect (with the Last-Event-ID an EventSource keeps) is served from
    where it left off, since the user may still read the audience."""
    env = {"VERITY_REDIS": redis_server.address}
    sqlite = tmp_path / "shared.sqlite3"
    worker = asgi_server_factory(env, sqlite)
    shell_env = {**env, "VERITY_SQLITE_PATH": str(sqlite)}
    cookies = login(worker.base_url, "alice", "alice-password")
    stream = Watched(worker.base_url, Session("alice", 0, cookies), ("global",))
    stream.start()
    await until(lambda: stream.hellos == 1, "hello")
    await asyncio.to_thread(emit_in_another_process, shell_env, "first", {"global"})
    await until(lambda: stream.received("first"), "the first envelope")
    await asyncio.to_thread(revoke_in_another_process, shell_env, [("alice", "global")])
    await until(stream.ended.is_set, "the stream is cut")
    assert stream.events[-1].event == "stream-error"
    last_id = next(e.id for e in reversed(stream.events) if e.id)
    assert last_id.startswith("verity.global:")
    await asyncio.to_thread(emit_in_another_process, shell_env, "while-away", {"global"})
    async with (
        httpx.AsyncClient(cookies=cookies, timeout=httpx.Timeout(10.0, read=None)) as client,
        client.stream(
            "GET",
            f"{worker.base_url}/api/events?audience=global",
            headers={"Last-Event-ID": last_id},
        ) as response,
    ):
        assert response.status_code == 200
        names: list[str] = []
        async with asyncio.timeout(WAIT):
            async for event in iter_events(response):
                if event.event == "message" and '"directives"' in event.data:
                    names += [x["name"] for x in event.json()["directives"]]
                    break
    assert names == ["while-away"]


# --------------------------------------------------------------------------
# Behind Pushpin
# --------------------------------------------------------------------------


MINT_ES_META = """
import time, jwt
from django.conf import settings
claims = {{"iss": "es", "exp": int(time.time()) + 3600, "channels": {channels!r}, "user": {user!r}}}
print(jwt.encode(claims, settings.SECRET_KEY.encode()))
"""


def es_meta_token(env: dict[str, str], user: int, audience: str) -> str:
    """A valid es-meta token for ``user``'s stream of ``audience``, exactly
    what django-eventstream writes into a next link (and so into access logs)."""
    code = MINT_ES_META.format(channels=[f"verity.{audience}"], user=str(user))
    result = run_manage("shell", "-c", code, env=env, check=True)
    return result.stdout.strip().splitlines()[-1]


def assert_cut(stream: Watched) -> None:
    """Ended with the stream-error of a cut, and no envelope after the hello."""
    assert stream.ended.is_set(), stream.describe()
    assert stream.events[-1].event == "stream-error", stream.describe()
    assert stream.events[-1].json()["condition"] == "forbidden", stream.describe()


async def test_revocations_reach_the_streams_pushpin_holds(
    asgi_server_factory: AsgiServerFactory, pushpin_factory: PushpinFactory, login: Login
) -> None:
    port = free_port()
    proxy = pushpin_factory(f"{LOOPBACK}:{port}")
    app = asgi_server_factory({"VERITY_GRIP_URL": proxy.grip_url}, port=port)
    shell_env = dict(app.env)

    def new_session(username: str) -> Session:
        cookies = login(app.base_url, username, USERS[username])
        me = httpx.get(f"{app.base_url}/api/auth/me/", cookies=cookies).json()
        return Session(username, me["id"], cookies)

    alice, alice_too, bob = new_session("alice"), new_session("alice"), new_session("bob")
    own = Watched(proxy.http_url, alice, (f"user-{alice.pk}", "global"))
    shared = Watched(proxy.http_url, alice_too, ("global",))
    bobs = Watched(proxy.http_url, bob, (f"user-{bob.pk}", "global"))
    streams = [own, shared, bobs]
    for stream in streams:
        stream.start()
    try:
        await until(lambda: all(s.hellos == len(s.audiences) for s in streams), "hellos")

        # A user's audience, from another process: only the stream carrying it.
        await asyncio.to_thread(revoke_in_another_process, shell_env, [("alice", own.audiences[0])])
        await until(own.ended.is_set, "alice's own stream is cut")
        assert_cut(own)
        await asyncio.to_thread(emit_in_another_process, shell_env, "first", {"global"})
        await until(lambda: shared.received("first") and bobs.received("first"), "the others")
        assert not own.received("first")

        # The reconnect is authorized afresh: alice may still read her audience.
        again = Watched(proxy.http_url, alice, own.audiences)
        streams.append(again)
        again.start()
        await until(lambda: again.hellos == 2, "alice's reconnect")

        # A logout ends that session's held streams only.
        response = httpx.post(
            f"{app.base_url}/api/auth/logout/",
            cookies=bob.cookies,
            headers={"X-CSRFToken": bob.cookies["csrftoken"]},
        )
        assert response.status_code == 204, response.text
        await until(bobs.ended.is_set, "bob's stream ends with his session")
        assert_cut(bobs)
        gone = Watched(proxy.http_url, bob, bobs.audiences)
        streams.append(gone)
        gone.start()
        await until(gone.ended.is_set, "bob's reconnect is refused")
        assert gone.status == 403 and gone.hellos == 0

        # A next link's es-meta token (as an access log shows it), replayed
        # through Pushpin without a session (Pushpin signs the request, but drops the
        # client's Grip-Last): it names nobody, so no byte of alice's stream.
        token = await asyncio.to_thread(es_meta_token, shell_env, alice.pk, own.audiences[0])
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None)) as client,
            client.stream(
                "GET",
                f"{proxy.http_url}/api/events",
                params={
                    "audience": own.audiences[0],
                    "link": "next",
                    "recover": "true",
                    "es-meta": token,
                },
                headers={"Grip-Last": f"events-verity.{own.audiences[0]}; last-id=0"},
            ) as response,
        ):
            replayed: list[SSEEvent] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WAIT):
                    async for event in iter_events(response):
                        replayed.append(event)
                        if event.event == "message":
                            break
        assert [e.event for e in replayed] == ["stream-error"], replayed

        # An audience for everybody.
        await asyncio.to_thread(revoke_in_another_process, shell_env, [(None, "global")])
        await until(lambda: shared.ended.is_set() and again.ended.is_set(), "global's streams")
        assert_cut(shared)
        assert_cut(again)
        assert not own.received("first") and not again.received("first")
    finally:
        for stream in streams:
            await stream.stop()
