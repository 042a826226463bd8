"""Verity adds no CSRF bypass: session-authenticated mutations need the token
exactly as DRF requires, with or without verity's request headers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import AsgiServerFactory
from .scenarios import Login, account, said_hello, sqlite_counters
from .sse import VerityConsumer


@pytest.mark.anyio
async def test_session_mutations_need_csrf_exactly_as_drf_requires(
    asgi_server_factory: AsgiServerFactory, login: Login
) -> None:
    worker = asgi_server_factory()
    alice = account(worker.base_url, login, "alice")
    todo = alice.todo_ids[0]
    verity_headers = {
        "X-Verity-Directive-Request": "send me directives",
        "X-Client-ID": "attacker-tab",
        "X-Verity-Client-ID": "attacker-tab",
    }
    attempts: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
        ("PATCH", f"/api/todos/{todo}/", {"title": "csrf"}, {}),
        ("PUT", f"/api/todos/{todo}/", {"title": "csrf", "status": "done"}, {}),
        ("POST", "/api/todos/", {"title": "csrf"}, {}),
        ("DELETE", f"/api/todos/{todo}/", None, {}),
        ("PATCH", f"/api/todos/{todo}/", {"title": "csrf"}, {"X-CSRFToken": "x" * 64}),
        ("PATCH", f"/api/todos/{todo}/", {"title": "csrf"}, {"X-CSRFToken": ""}),
        # The right token from a foreign page: Django checks Origin when sent.
        (
            "PATCH",
            f"/api/todos/{todo}/",
            {"title": "csrf"},
            {"X-CSRFToken": alice.csrf, "Origin": "http://evil.example"},
        ),
    ]
    consumer = VerityConsumer(
        worker.base_url, audiences=["global", alice.audience], cookies=alice.cookies
    )
    async with (
        consumer,
        httpx.AsyncClient(base_url=worker.base_url, cookies=alice.cookies, timeout=15) as client,
    ):
        await consumer.wait_for(said_hello, timeout=30)
        start = {h.audience: h.last_seq for h in consumer.hellos}
        for method, path, body, extra in attempts:
            response = await client.request(
                method, path, json=body, headers={**verity_headers, **extra}
            )
            assert response.status_code == 403, (method, path, extra, response.text)
            assert "CSRF" in response.json()["detail"], response.text
            assert response.json().get("directives", []) == []
        unchanged = await client.get(f"/api/todos/{todo}/")
        assert unchanged.json()["title"] != "csrf"
        assert sqlite_counters(worker, [alice.audience]) == {alice.audience: start[alice.audience]}
        # The same request with the token goes through, and takes the next seq.
        ok = await client.patch(
            f"/api/todos/{todo}/",
            json={"title": "with token"},
            headers={**verity_headers, "X-CSRFToken": alice.csrf},
        )
        assert ok.status_code == 200
        assert ok.json()["directives"]
        expected = start[alice.audience] + 1
        await consumer.wait_for(lambda c: c.tracked.get(alice.audience) == expected, 15)
    assert consumer.received == {alice.audience: [expected]}
    assert consumer.gaps == []
