"""The events view's stream, in process: hello, envelopes, echo, revocation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings

from verity_django import directives as d
from verity_django.publishing import publish_or_raise

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def messages(content: AsyncIterator[bytes], n: int) -> list[dict[str, Any]]:
    """The first n unnamed events' JSON data, and any stream-error."""
    out: list[dict[str, Any]] = []
    buffer = ""
    async with asyncio.timeout(10):
        async for chunk in content:
            buffer += chunk.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                lines = block.split("\n")
                event = next((x[7:] for x in lines if x.startswith("event: ")), "message")
                data = "\n".join(x[6:] for x in lines if x.startswith("data: "))
                if event == "message" and data:
                    out.append(json.loads(data))
                elif event == "stream-error":
                    out.append({"stream-error": json.loads(data)})
                if len(out) >= n:
                    return out
    return out


async def open_stream(user: Any, query: str) -> Any:
    client = AsyncClient()
    await sync_to_async(client.force_login)(user)
    response = await client.get(f"/api/events?{query}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/event-stream"
    return response


async def test_hello_then_envelopes_in_seq_order(alice: Any) -> None:
    audience = f"user-{alice.pk}"
    for _ in range(3):
        await sync_to_async(publish_or_raise)(audience, [d.refresh_item("todo", 1)])
    response = await open_stream(alice, f"audience={audience}&audience=global")
    stream = response.streaming_content
    hellos = await messages(stream, 2)
    assert hellos == [
        {"type": "hello", "audience": audience, "last_seq": 3},
        {"type": "hello", "audience": "global", "last_seq": 0},
    ]
    await sync_to_async(publish_or_raise)(audience, [d.refresh_collection("todos")], source="x")
    [envelope] = await messages(stream, 1)
    assert envelope == {
        "type": "directives",
        "seq": 4,
        "audience": audience,
        "source": "x",
        "directives": [{"op": "refresh_collection", "name": "todos"}],
    }
    await stream.aclose()


async def test_own_envelope_arrives_empty_with_the_same_seq(alice: Any) -> None:
    response = await open_stream(alice, "client_id=me")
    stream = response.streaming_content
    assert await messages(stream, 1) == [{"type": "hello", "audience": "global", "last_seq": 0}]
    await sync_to_async(publish_or_raise)("global", [d.refresh_collection("a")], source="me")
    await sync_to_async(publish_or_raise)("global", [d.refresh_collection("b")], source="other")
    own, foreign = await messages(stream, 2)
    assert own == {"type": "directives", "seq": 1, "audience": "global", "directives": []}
    assert foreign["seq"] == 2
    assert foreign["directives"] == [{"op": "refresh_collection", "name": "b"}]
    await stream.aclose()


async def test_last_event_id_replays_for_plain_eventsource(alice: Any) -> None:
    for name in ("a", "b", "c"):
        await sync_to_async(publish_or_raise)("global", [d.refresh_collection(name)])
    client = AsyncClient()
    response = await client.get("/api/events", headers={"Last-Event-ID": "verity.global:1"})
    stream = response.streaming_content
    hello, second, third = await messages(stream, 3)
    assert hello == {"type": "hello", "audience": "global", "last_seq": 1}
    assert [second["seq"], third["seq"]] == [2, 3]
    await stream.aclose()


async def test_revoking_access_cuts_a_live_stream(alice: Any) -> None:
    from django_eventstream import channel_permission_changed

    audience = "team-a"
    allow = {"team-a": True}

    def authorize(user: Any, name: str) -> bool:
        return allow.get(name, False)

    with override_settings(VERITY={"AUTHORIZE": authorize}):
        response = await open_stream(alice, f"audience={audience}")
        stream = response.streaming_content
        await messages(stream, 1)
        allow["team-a"] = False
        await sync_to_async(channel_permission_changed)(alice, "verity.team-a")
        [error] = await messages(stream, 1)
        assert error["stream-error"]["condition"] == "forbidden"
        await sync_to_async(publish_or_raise)(audience, [d.refresh_collection("secret")])
        rest = await messages(stream, 100)
    # django-eventstream re-checks permission and repeats the error, then the stream ends.
    assert rest
    assert all("stream-error" in x for x in rest)


async def test_user_audiences_can_be_added_automatically(alice: Any) -> None:
    with override_settings(VERITY={"AUTO_SUBSCRIBE_USER_AUDIENCES": True}):
        response = await open_stream(alice, "")
        stream = response.streaming_content
        hellos = await messages(stream, 2)
    assert [h["audience"] for h in hellos] == ["global", f"user-{alice.pk}"]
    await stream.aclose()


async def test_global_can_require_authentication(db: Any) -> None:
    client = AsyncClient()
    with override_settings(VERITY={"GLOBAL_REQUIRES_AUTHENTICATION": True}):
        refused = await client.get("/api/events")
    assert refused.status_code == 403
    allowed = await client.get("/api/events")
    assert allowed.status_code == 200
    await allowed.streaming_content.aclose()
