"""A PostgreSQL that stops answering on the connections it already has: its
own statement timeout never fires, and TCP would wait for minutes. A stream
opened meanwhile is told 503 to retry instead of hanging with every other
stream behind it, and once the server answers again, streams open and
deliver as before. The server is stopped for real (SIGSTOP), not mocked."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
import pytest

from liveservers.processes import AsgiServer, PostgresServer, require_binary

from .scenarios import publish_from_another_process
from .sse import VerityConsumer

pytestmark = pytest.mark.anyio

StartServer = Callable[..., AsgiServer]


async def test_streams_opened_while_postgresql_is_stopped_are_told_to_retry(
    asgi_server_factory: StartServer,
) -> None:
    require_binary("initdb")
    require_binary("postgres")
    database = PostgresServer().start()
    try:
        url = database.create_database(f"verity_{uuid.uuid4().hex[:12]}")
        server = asgi_server_factory({"VERITY_DATABASE_URL": url})
        events = f"{server.base_url}/api/events"
        async with VerityConsumer(server.base_url, ("global",), "before") as before:
            await before.wait_for(lambda c: len(c.hellos) >= 1, 15)
            database.pause()
            try:
                # Every storage read now waits on a server that never answers.
                async with httpx.AsyncClient(timeout=30) as client:
                    answers = [
                        await client.get(events, params={"audience": "global"}) for _ in range(6)
                    ]
            finally:
                database.resume()
            assert [a.status_code for a in answers] == [503] * 6
            assert answers[0].headers["Retry-After"] == "2"
            assert answers[0].json() == {
                "detail": "The event storage is not answering; try again shortly."
            }
            log = server.log_text()
            assert "did not answer a storage read within 2 s" in log
            # Past four stuck reads, later ones are refused without waiting.
            assert "refusing more until one returns" in log

            async with VerityConsumer(server.base_url, ("global",), "after") as after:
                await after.wait_for(lambda c: len(c.hellos) >= 1, 30)
                await asyncio.to_thread(publish_from_another_process, server, "global", 3, 50)
                for consumer in (before, after):
                    await consumer.wait_for(lambda c: len(c.received.get("global", [])) >= 3, 30)
                    assert consumer.received["global"][-3:] == [1, 2, 3]
                    assert not consumer.duplicates
            # The tailer failed on every poll meanwhile, and says so once.
            log = server.log_text()
            assert log.count("delivery from storage failed (") == 1
            assert "Traceback" not in log
            assert "delivery from storage works again, after" in log
    finally:
        database.resume()
        database.stop()
