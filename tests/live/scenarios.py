"""The demo under load, as the fault and soak tests drive and judge it.

Logged-in demo users (``account``), PATCHes sent the way a browser tab sends
them (``Mutator``, ``run_burst``), and the oracle every scenario ends with:
``delivery_problems`` checks that each seq a consumer's audiences reached was
received, or noticed as a gap (which makes the real client resync), against
the server's storage read directly (SQLite file or Redis keys).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sqlite3
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from liveservers.processes import PYTHON, REPO_ROOT, AsgiServer, RedisServer, child_env

from .sse import VerityConsumer

Login = Callable[[str, str, str], httpx.Cookies]


@dataclass
class Account:
    """A logged-in demo user: cookies, CSRF token, pk, and the ids it may edit."""

    username: str
    cookies: httpx.Cookies
    pk: int
    todo_ids: list[int]

    @property
    def audience(self) -> str:
        return f"user-{self.pk}"

    @property
    def csrf(self) -> str:
        token = self.cookies.get("csrftoken")
        assert token, f"{self.username} has no csrftoken cookie"
        return token


def account(base_url: str, login: Login, username: str) -> Account:
    cookies = login(base_url, username, f"{username}-password")
    with httpx.Client(base_url=base_url, cookies=cookies, timeout=15) as client:
        me = client.get("/api/auth/me/").json()
        todos = client.get("/api/todos/").json()
    return Account(username, cookies, int(me["id"]), [int(i) for i in todos["ids"]])


def project_ids(base_url: str, acct: Account) -> list[int]:
    with httpx.Client(base_url=base_url, cookies=acct.cookies, timeout=15) as client:
        return [int(i) for i in client.get("/api/projects/").json()["ids"]]


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass(frozen=True)
class Mutation:
    """One PATCH: what it edits and which audience its envelope goes to."""

    path: str
    body: dict[str, Any]
    audience: str
    acct: Account
    client_id: str | None = None


@dataclass
class MutationStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0  # no answer (the worker died, or was down)
    rerouted: int = 0  # refused by a dead worker, sent to a live one instead
    bad_status: list[str] = field(default_factory=list)
    missing_directives: list[str] = field(default_factory=list)
    directives_seen: int = 0


class Mutator:
    """Sends PATCHes as a browser tab does: session cookie, CSRF token, directive header."""

    def __init__(self, base_urls: Sequence[str]) -> None:
        self.base_urls = list(base_urls)
        self.stats = MutationStats()
        self._clients: dict[tuple[str, str], httpx.AsyncClient] = {}

    def _client(self, base_url: str, acct: Account) -> httpx.AsyncClient:
        key = (base_url, acct.username)
        client = self._clients.get(key)
        if client is None:
            client = httpx.AsyncClient(
                base_url=base_url,
                cookies=httpx.Cookies(acct.cookies),
                timeout=httpx.Timeout(30.0),
                limits=httpx.Limits(max_connections=20),
            )
            self._clients[key] = client
        return client

    async def send(self, mutation: Mutation, worker: int = 0) -> httpx.Response | None:
        headers = {
            "X-CSRFToken": mutation.acct.csrf,
            "X-Verity-Directive-Request": "send me directives",
        }
        if mutation.client_id is not None:
            headers["X-Client-ID"] = mutation.client_id
        self.stats.sent += 1
        order = [worker, *(i for i in range(len(self.base_urls)) if i != worker)]
        for attempt, index in enumerate(order):
            client = self._client(self.base_urls[index], mutation.acct)
            try:
                response = await client.patch(mutation.path, json=mutation.body, headers=headers)
            except httpx.ConnectError:
                # Nothing listens: the request never reached a worker, so a load
                # balancer would send it to the next one.
                if attempt + 1 < len(order):
                    self.stats.rerouted += 1
                    continue
                self.stats.failed += 1
                return None
            except httpx.TransportError:
                # The worker died with the request in flight: its outcome is unknown.
                self.stats.failed += 1
                return None
            self._check(mutation, response)
            return response
        return None

    def _check(self, mutation: Mutation, response: httpx.Response) -> None:
        if response.status_code != 200:
            self.stats.bad_status.append(f"{mutation.path}: {response.status_code}")
            return
        self.stats.ok += 1
        directives = response.json().get("directives")
        if not directives:
            self.stats.missing_directives.append(mutation.path)
            return
        self.stats.directives_seen += len(directives)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


async def run_burst(
    mutator: Mutator,
    mutations: Sequence[Mutation],
    *,
    concurrency: int,
    on_progress: Callable[[int], None] | None = None,
) -> None:
    """Send every mutation, ``concurrency`` at a time, spreading them over the workers."""
    queue = list(enumerate(mutations))
    done = 0

    async def worker() -> None:
        nonlocal done
        while queue:
            index, mutation = queue.pop(0)
            await mutator.send(mutation, worker=index % len(mutator.base_urls))
            done += 1
            if on_progress is not None:
                on_progress(done)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def mixed_mutations(
    accounts: Sequence[Account],
    projects: Sequence[int],
    count: int,
    *,
    client_ids: Mapping[str, Sequence[str]] | None = None,
    tag: str = "burst",
) -> list[Mutation]:
    """``count`` PATCHes cycling over every user's todos and the global projects.

    ``client_ids`` maps an audience to the consumer ids that some of its
    mutations claim as their origin (so that echo rewriting is exercised).
    """
    out: list[Mutation] = []
    targets: list[tuple[str, str, Account]] = []
    for acct in accounts:
        targets += [(f"/api/todos/{i}/", acct.audience, acct) for i in acct.todo_ids]
    targets += [(f"/api/projects/{i}/", "global", accounts[0]) for i in projects]
    ids = {a: itertools.cycle([*c, None]) for a, c in (client_ids or {}).items() if c}
    for n, (url, audience, acct) in zip(range(count), itertools.cycle(targets), strict=False):
        key = "name" if "projects" in url else "title"
        client_id = next(ids[audience]) if audience in ids else None
        out.append(Mutation(url, {key: f"{tag} {n}"}, audience, acct, client_id))
    return out


def public(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """A stored envelope as readers get it: without its owner tag."""
    return {k: v for k, v in envelope.items() if k != "origin"}


def echo_form(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """What the originating connection receives instead of its own envelope."""
    return {
        "type": "directives",
        "seq": envelope["seq"],
        "audience": envelope["audience"],
        "directives": [],
    }


def delivery_problems(
    consumer: VerityConsumer,
    final: Mapping[str, int],
    stored: Mapping[str, Mapping[int, dict[str, Any]]] | None = None,
) -> list[str]:
    """Everything that breaks "each seq was received, or its loss was noticed".

    For each audience the consumer carries, every seq from its first hello's
    ``last_seq`` + 1 up to ``final[audience]`` must be in ``received``, or
    inside a recorded gap (previous < seq <= gap.seq), which makes the client
    resync. No (audience, seq) may arrive twice with different content, and
    with ``stored`` every envelope must be the stored one (or its echo form).
    """
    problems: list[str] = []
    name = consumer.client_id
    for audience in consumer.audiences:
        hellos = [h for h in consumer.hellos if h.audience == audience]
        if not hellos:
            problems.append(f"{name}: no hello for {audience}")
            continue
        received = set(consumer.received.get(audience, []))
        gaps = [g for g in consumer.gaps if g.audience == audience]
        unnoticed = [
            seq
            for seq in range(hellos[0].last_seq + 1, final[audience] + 1)
            if seq not in received and not any(g.previous < seq <= g.seq for g in gaps)
        ]
        if unnoticed:
            problems.append(f"{name}: {audience} seqs lost without a gap: {unnoticed[:20]}")
        if consumer.tracked.get(audience) != final[audience]:
            problems.append(
                f"{name}: {audience} tracked {consumer.tracked.get(audience)} != {final[audience]}"
            )
    for dup in consumer.duplicates:
        if not dup.same_content:
            problems.append(f"{name}: {dup.audience} seq {dup.seq} twice with different content")
    if stored is not None:
        for env in consumer.envelopes:
            original = stored.get(env.audience, {}).get(env.seq)
            if original is None:
                problems.append(f"{name}: {env.audience} seq {env.seq} was never stored")
            elif env.raw != public(original) and not (
                "origin" in original and env.raw == echo_form(original)
            ):
                problems.append(f"{name}: {env.audience} seq {env.seq} differs from storage")
    foreign = [e for e in consumer.errors if e.kind in ("foreign-audience", "bad-json")]
    problems += [f"{name}: {e.kind}: {e.detail[:200]}" for e in foreign]
    return problems


async def wait_all(
    consumers: Sequence[VerityConsumer],
    predicate: Callable[[VerityConsumer], bool],
    timeout: float,
) -> None:
    await asyncio.gather(*(c.wait_for(predicate, timeout=timeout) for c in consumers))


def caught_up(final: Mapping[str, int]) -> Callable[[VerityConsumer], bool]:
    return lambda c: c.connected and all(c.tracked.get(a) == final[a] for a in c.audiences)


def said_hello(c: VerityConsumer) -> bool:
    """Connected, and a hello for every audience on the current connection."""
    have = {h.audience for h in c.hellos_on(c.connections)}
    return c.connected and have >= set(c.audiences)


def sqlite_counters(worker: AsgiServer, audiences: Sequence[str]) -> dict[str, int]:
    """Seq counters of DatabaseStorage, read straight from a server's SQLite file."""
    path = worker.env["VERITY_SQLITE_PATH"]
    with contextlib.closing(sqlite3.connect(path, timeout=20)) as conn:
        rows = conn.execute("SELECT name, value FROM django_eventstream_eventcounter").fetchall()
    found = {str(name): int(value) for name, value in rows}
    return {a: found.get(f"verity.{a}", 0) for a in audiences}


def sqlite_envelopes(worker: AsgiServer, audience: str) -> dict[int, dict[str, Any]]:
    path = worker.env["VERITY_SQLITE_PATH"]
    with contextlib.closing(sqlite3.connect(path, timeout=20)) as conn:
        rows = conn.execute(
            "SELECT eid, data FROM django_eventstream_event WHERE channel = ? ORDER BY eid",
            [f"verity.{audience}"],
        ).fetchall()
    return {int(eid): json.loads(data) for eid, data in rows}


# --------------------------------------------------------------------------
# Redis helpers (storage keys of verity_django.storage.RedisStorage)
# --------------------------------------------------------------------------


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)


async def settled(
    read: Callable[[], dict[str, int]], *, quiet: float = 0.5, timeout: float = 30
) -> dict[str, int]:
    """The counters ``read`` returns once they stop moving for ``quiet`` seconds.

    A lone request's push copy is stored after its response was sent, so the
    counters read as the last response arrives can still miss its envelope,
    which a consumer then receives past them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = await asyncio.to_thread(read)
    while True:
        await asyncio.sleep(quiet)
        again = await asyncio.to_thread(read)
        if again == last:
            return last
        assert loop.time() < deadline, f"the counters never settled: {last} then {again}"
        last = again


def redis_counters(client: redis.Redis, audiences: Sequence[str]) -> dict[str, int]:
    values = client.mget([f"verity:counter:verity.{a}" for a in audiences])
    return {a: int(v) if v else 0 for a, v in zip(audiences, values, strict=True)}


def redis_envelopes(client: redis.Redis, audience: str, last: int) -> dict[int, dict[str, Any]]:
    if last == 0:
        return {}
    keys = [f"verity:event:verity.{audience}:{i}" for i in range(1, last + 1)]
    out: dict[int, dict[str, Any]] = {}
    for seq, raw in zip(range(1, last + 1), client.mget(keys), strict=True):
        if raw is not None:
            out[seq] = json.loads(json.loads(raw)["data"])
    return out


_PUBLISHER = """
import sys
import django

django.setup()
from verity_django import directives as d
from verity_django.publishing import publish_now

audience, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blob = "x" * size
for n in range(count):
    result = {"data": {"id": n, "blob": blob}, "ts": 0}
    publish_now(audience, [d.refresh_item("todo", n, result=result)])
"""


def publish_from_another_process(worker: AsgiServer, audience: str, count: int, size: int) -> None:
    """Store ``count`` envelopes of about ``size`` bytes from a separate Django
    process (a shell, a Celery worker) sharing the server's database."""
    subprocess.run(
        [PYTHON, "-c", _PUBLISHER, audience, str(count), str(size)],
        cwd=REPO_ROOT,
        env=child_env(worker.env),
        check=True,
        capture_output=True,
        timeout=120,
    )
