"""Fixtures for tests that start real processes (see liveservers/processes.py and sse.py).

Every test under tests/live is marked ``live``. Every server a fixture starts is
stopped at teardown, and when the test failed its log is printed, so it shows
up under "Captured stdout teardown".

Pushpin in front of the demo project, which needs to know pushpin's control
URL at start-up, is started in this order::

    port = free_port()
    proxy = pushpin_factory(f"127.0.0.1:{port}")
    app = asgi_server_factory(env={"VERITY_GRIP_URL": proxy.grip_url}, port=port)

Async tests use anyio's pytest plugin: ``@pytest.mark.anyio`` (asyncio only).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import closing
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from liveservers.processes import (
    AsgiServer,
    AsgiServerWithEventsOnSmallDisk,
    ManagedProcess,
    PostgresServer,
    Pushpin,
    RedisServer,
    require_binary,
    run_manage,
)

LIVE_DIR = Path(__file__).resolve().parent

# Only the database variables reach migrate/seed_demo: preparing a database must
# not need redis or pushpin to be up, nor publish anything through them.
_TRANSPORT_ENV = ("VERITY_REDIS", "VERITY_GRIP_URL")

_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not just this folder's.
    for item in items:
        if item.path.is_relative_to(LIVE_DIR):
            item.add_marker(pytest.mark.live)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Remembered so fixtures can print server logs only for failed tests.
    report = yield
    item.stash.setdefault(_reports_key, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_reports_key, {})
    return any(report.failed for report in reports.values())


def _stop_all(request: pytest.FixtureRequest, servers: list[ManagedProcess]) -> None:
    """Stop in reverse start order; print logs if the test failed; stop every one."""
    errors: list[BaseException] = []
    for server in reversed(servers):
        try:
            server.stop()
        except BaseException as exc:  # keep stopping the others first
            errors.append(exc)
        if _test_failed(request):
            print(f"\n===== {server.name} log =====")
            print(_tail(server.log_text()))
    if errors:
        raise errors[0]


def _tail(text: str, lines: int = 300) -> str:
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


@pytest.fixture
def anyio_backend() -> str:
    # VerityConsumer is asyncio code; never run it under trio.
    return "asyncio"


# --------------------------------------------------------------------------
# Infrastructure servers
# --------------------------------------------------------------------------


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A fresh, memory-only redis-server for this test."""
    server = RedisServer(binary=require_binary("redis-server"))
    try:
        server.start()
        yield server
    finally:
        _stop_all(request, [server])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole session; its default database is ``verity``."""
    require_binary("initdb")
    require_binary("postgres")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of an empty database of its own, dropped after the test."""
    name = f"verity_{uuid.uuid4().hex[:12]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


class PushpinFactory(Protocol):
    def __call__(
        self,
        upstream: str | AsgiServer,
        *,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Pushpin: ...


@pytest.fixture
def pushpin_factory(request: pytest.FixtureRequest) -> Iterator[PushpinFactory]:
    """``start(upstream)``: a pushpin routing everything to ``host:port`` (or an AsgiServer)."""
    binary = require_binary("pushpin")
    require_binary("condure")
    require_binary("zurl")
    started: list[ManagedProcess] = []

    def start(
        upstream: str | AsgiServer,
        *,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Pushpin:
        address = upstream.address if isinstance(upstream, AsgiServer) else upstream
        proxy = Pushpin(address, binary=binary, overrides=overrides)
        started.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        _stop_all(request, started)


# --------------------------------------------------------------------------
# The demo project
# --------------------------------------------------------------------------


class AsgiServerFactory(Protocol):
    def __call__(
        self,
        env: Mapping[str, str] | None = None,
        sqlite_path: Path | str | None = None,
        *,
        port: int | None = None,
        prepare: bool = True,
        events_on_small_disk: Path | None = None,
    ) -> AsgiServer: ...


@pytest.fixture(scope="session")
def _prepared_databases() -> set[str]:
    """Databases already migrated and seeded this session (seed_demo runs once per DB)."""
    return set()


def prepare_database(env: Mapping[str, str]) -> None:
    """``migrate --noinput`` and ``seed_demo`` against the database ``env`` selects."""
    db_env = {key: value for key, value in env.items() if key not in _TRANSPORT_ENV}
    run_manage("migrate", "--noinput", env=db_env, check=True)
    run_manage("seed_demo", env=db_env, check=True)


class _PreparedSqlite:
    """One SQLite file migrated and seeded once per session, copied for each new one.

    ``migrate`` and ``seed_demo`` are two Django start-ups (about 5 s here) and
    give every fresh file the same schema and rows: a copy of the first is that
    database. Neither reads anything but the database variables, and seeding
    publishes nothing (it runs under ``disabled()``), so no other variable of a
    server can make its database differ.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp_path_factory = tmp_path_factory
        self._template: Path | None = None

    def create(self, path: Path) -> None:
        if self._template is None:
            template = self._tmp_path_factory.mktemp("sqlite-template") / "db.sqlite3"
            prepare_database({"VERITY_SQLITE_PATH": str(template)})
            self._template = template
        # The backup API copies a consistent database whatever its journal holds.
        with closing(sqlite3.connect(self._template)) as source:
            with closing(sqlite3.connect(path)) as target:
                source.backup(target)


@pytest.fixture(scope="session")
def _prepared_sqlite(tmp_path_factory: pytest.TempPathFactory) -> _PreparedSqlite:
    return _PreparedSqlite(tmp_path_factory)


@pytest.fixture
def asgi_server_factory(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _prepared_databases: set[str],
    _prepared_sqlite: _PreparedSqlite,
) -> Iterator[AsgiServerFactory]:
    """``start(env=None, sqlite_path=None, *, port=None, prepare=True) -> AsgiServer``.

    Without ``VERITY_DATABASE_URL`` in ``env`` the server uses SQLite: a fresh
    file per call, or ``sqlite_path`` (pass the same path to share one database
    between servers). Unless ``prepare=False``, each database is migrated and
    seeded (demo users alice and bob) the first time it is used: a new SQLite
    file is a copy of one prepared once per session.
    The database env the server got is in ``server.env``. With
    ``events_on_small_disk`` (a migrated events database), the stored
    envelopes live in a copy of it on a disk of the server's own
    (:class:`AsgiServerWithEventsOnSmallDisk`).
    """
    started: list[ManagedProcess] = []

    def start(
        env: Mapping[str, str] | None = None,
        sqlite_path: Path | str | None = None,
        *,
        port: int | None = None,
        prepare: bool = True,
        events_on_small_disk: Path | None = None,
    ) -> AsgiServer:
        server_env = dict(env or {})
        new_sqlite_file: Path | None = None
        if "VERITY_DATABASE_URL" in server_env:
            database_key = server_env["VERITY_DATABASE_URL"]
        else:
            if sqlite_path is None:
                sqlite_path = tmp_path_factory.mktemp("sqlite") / "db.sqlite3"
            server_env["VERITY_SQLITE_PATH"] = str(sqlite_path)
            database_key = str(Path(sqlite_path).resolve())
            if not Path(sqlite_path).exists():
                new_sqlite_file = Path(sqlite_path)
        if prepare and database_key not in _prepared_databases:
            if new_sqlite_file is not None:
                _prepared_sqlite.create(new_sqlite_file)
            else:
                prepare_database(server_env)
            _prepared_databases.add(database_key)
        server = (
            AsgiServer(env=server_env, port=port)
            if events_on_small_disk is None
            else AsgiServerWithEventsOnSmallDisk(events_on_small_disk, server_env, port)
        )
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        _stop_all(request, started)


@pytest.fixture
def login() -> Callable[[str, str, str], httpx.Cookies]:
    """``login(base_url, username, password) -> cookies`` (session + CSRF) of a logged-in user."""

    def do_login(base_url: str, username: str, password: str) -> httpx.Cookies:
        with httpx.Client(base_url=base_url, timeout=15.0) as client:
            # The first GET sets the csrftoken cookie the login POST must echo.
            client.get("/api/auth/me/")
            token = client.cookies.get("csrftoken")
            if not token:
                raise AssertionError(f"GET {base_url}/api/auth/me/ set no csrftoken cookie")
            response = client.post(
                "/api/auth/login/",
                json={"username": username, "password": password},
                headers={"X-CSRFToken": token},
            )
            if response.status_code >= 400:
                raise AssertionError(
                    f"login as {username} failed: {response.status_code} {response.text[:500]}"
                )
            # Login rotates the CSRF token; the client's jar has the new one.
            return httpx.Cookies(client.cookies)

    return do_login
