"""A stream holds no database connection between storage reads, even with an
AUTHORIZE hook that queries the database: django-eventstream re-checks every
channel in the stream's own thread whenever it re-reads storage (after its
10-event queue overflows). Counted on PostgreSQL with ``pg_stat_activity``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import psycopg
import pytest

from liveservers.processes import AsgiServer, child_env

from .conftest import prepare_database
from .scenarios import publish_from_another_process
from .sse import VerityConsumer

pytestmark = pytest.mark.anyio

Login = Callable[[str, str, str], httpx.Cookies]
STREAMS = 4
BURST = 80


class DbAuthorizeServer(AsgiServer):
    def _process_env(self) -> dict[str, str]:
        env = child_env(self.env)
        env["DJANGO_SETTINGS_MODULE"] = "tests.live.db_authorize_settings"
        return env


def other_connections(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_overflowing_streams_release_their_connection(
    postgres_database: str, login: Login
) -> None:
    env = {"VERITY_DATABASE_URL": postgres_database}
    prepare_database(env)
    server = DbAuthorizeServer(env=env).start()
    try:
        cookies = login(server.base_url, "alice", "alice-password")
        me = httpx.get(f"{server.base_url}/api/auth/me/", cookies=cookies).json()
        audience = f"user-{me['id']}"
        consumers = [
            VerityConsumer(server.base_url, (audience,), f"reader-{i}", cookies)
            for i in range(STREAMS)
        ]
        for consumer in consumers:
            consumer.start()
        for consumer in consumers:
            await consumer.wait_for(lambda c: len(c.hellos) >= 1, 15)
        await asyncio.sleep(1)
        idle = other_connections(postgres_database)
        # A burst from another process: the tailer finds it in storage and
        # hands it over at once, so every stream overflows and re-reads.
        await asyncio.to_thread(publish_from_another_process, server, audience, BURST, 50)
        for consumer in consumers:
            await consumer.wait_for(lambda c: len(c.received.get(audience, [])) >= BURST, 30)
        await asyncio.sleep(1)
        after = other_connections(postgres_database)
        for consumer in consumers:
            await consumer.stop()
    finally:
        server.stop()
    assert after <= idle, (idle, after)
