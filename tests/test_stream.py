"""The events view's stream, in process: hello, envelopes, echo, revocation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError
from django.test import AsyncClient, override_settings

from verity_django import directives as d
from verity_django import envelopes
from verity_django.conf import conf
from verity_django.publishing import publish_now
from verity_django.storage import Append, DatabaseStorage, configured

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
        await sync_to_async(publish_now)(audience, [d.refresh_item("todo", 1)])
    response = await open_stream(alice, f"audience={audience}&audience=global")
    stream = response.streaming_content
    hellos = await messages(stream, 2)
    assert hellos == [
        {"type": "hello", "audience": audience, "last_seq": 3},
        {"type": "hello", "audience": "global", "last_seq": 0},
    ]
    await sync_to_async(publish_now)(audience, [d.refresh_collection("todos")])
    [envelope] = await messages(stream, 1)
    assert envelope == {
        "type": "directives",
        "seq": 4,
        "audience": audience,
        "directives": [{"op": "refresh_collection", "name": "todos"}],
    }
    await stream.aclose()


def patch_as(user: Any, client_id: str, todo_id: int) -> None:
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_login(user)
    response = api.patch(
        f"/api/todos/{todo_id}/",
        {"title": client_id},
        format="json",
        HTTP_X_VERITY_DIRECTIVE_REQUEST="send me directives",
        HTTP_X_CLIENT_ID=client_id,
    )
    assert response.status_code == 200


async def test_own_envelope_arrives_empty_and_a_borrowed_id_blanks_nothing(
    alice: Any, bob: Any
) -> None:
    from tests.testapp.models import Project, Todo

    project = await Project.objects.acreate(name="p", owner=alice)
    todo = await Todo.objects.acreate(title="t", owner=alice, project=project)
    audience = f"user-{alice.pk}"
    response = await open_stream(alice, f"audience={audience}&client_id=me")
    stream = response.streaming_content
    [hello] = await messages(stream, 1)
    # Alice's own page, then another page of hers.
    await sync_to_async(patch_as)(alice, "me", todo.pk)
    await sync_to_async(patch_as)(alice, "other-page", todo.pk)
    own, foreign = await messages(stream, 2)
    assert own == {
        "type": "directives",
        "seq": hello["last_seq"] + 1,
        "audience": audience,
        "directives": [],
    }
    assert foreign["seq"] == hello["last_seq"] + 2
    assert foreign["directives"] and "origin" not in foreign and "source" not in foreign
    await stream.aclose()


def patch_project_as(user: Any, client_id: str, project_id: int) -> None:
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_login(user)
    response = api.patch(
        f"/api/projects/{project_id}/",
        {"name": client_id},
        format="json",
        HTTP_X_CLIENT_ID=client_id,
    )
    assert response.status_code == 200


async def test_another_user_presenting_a_client_id_blanks_nothing_of_its_owner(
    alice: Any, bob: Any
) -> None:
    """Bob copies the client id of Alice's page: his changes still reach that
    page in full (only Alice's own change comes back as the empty echo)."""
    from tests.testapp.models import Project

    project = await Project.objects.acreate(name="p", owner=alice)
    response = await open_stream(alice, "audience=global&client_id=alices-page")
    stream = response.streaming_content
    [hello] = await messages(stream, 1)
    await sync_to_async(patch_project_as)(bob, "alices-page", project.pk)
    await sync_to_async(patch_project_as)(alice, "alices-page", project.pk)
    borrowed, own = await messages(stream, 2)
    assert borrowed["seq"] == hello["last_seq"] + 1
    assert {x["op"] for x in borrowed["directives"]} == {"refresh_item", "refresh_collection"}
    assert "source" not in borrowed
    assert all("source" not in x for x in borrowed["directives"])
    assert own == {
        "type": "directives",
        "seq": hello["last_seq"] + 2,
        "audience": "global",
        "directives": [],
    }
    await stream.aclose()


async def test_last_event_id_replays_for_plain_eventsource(alice: Any) -> None:
    for name in ("a", "b", "c"):
        await sync_to_async(publish_now)("global", [d.refresh_collection(name)])
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
        await sync_to_async(publish_now)(audience, [d.refresh_collection("secret")])
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


async def test_a_rewinding_last_event_id_never_moves_the_tailer_back(
    alice: Any, monkeypatch: Any
) -> None:
    from verity_django.tailer import tailer

    for name in "abcdef":
        await sync_to_async(publish_now)("global", [d.refresh_collection(name)])
    first = await open_stream(alice, "")
    first_stream = first.streaming_content
    [hello] = await messages(first_stream, 1)
    assert hello["last_seq"] == 6
    assert tailer().positions["verity.global"] == 6
    reads: list[tuple[str, int]] = []
    original = DatabaseStorage.get_events

    def counted(self: Any, channel: str, last_id: int, limit: int = 100) -> Any:
        reads.append((channel, last_id))
        return original(self, channel, last_id, limit)

    monkeypatch.setattr(DatabaseStorage, "get_events", counted)
    client = AsyncClient()
    rewound = await client.get("/api/events", headers={"Last-Event-ID": "verity.global:1"})
    replay = rewound.streaming_content
    got = await messages(replay, 6)
    assert [m.get("seq", m.get("last_seq")) for m in got] == [1, 2, 3, 4, 5, 6]
    # The rewinding stream read its own range once; the tailer did not move,
    # so no other stream was handed (or re-read) any history.
    assert tailer().positions["verity.global"] == 6
    # (The revocation watcher reads its own channel on a timer of its own.)
    assert [r for r in reads if r[0] == "verity.global"] == [("verity.global", 1)]
    await sync_to_async(publish_now)("global", [d.refresh_collection("g")])
    [next_one] = await messages(first_stream, 1)
    assert next_one["seq"] == 7
    await replay.aclose()
    await first_stream.aclose()


async def test_other_processes_envelopes_arrive_under_steady_local_traffic(alice: Any) -> None:
    mine = f"user-{alice.pk}"
    response = await open_stream(alice, f"audience=global&audience={mine}")
    stream = response.streaming_content
    await messages(stream, 2)
    local = threading.Event()
    elsewhere_due = threading.Event()

    def traffic() -> None:
        # Local envelopes on another channel, far more often than POLL_INTERVAL.
        # The one writer: the in-memory test database refuses a second
        # concurrent writer at once ("table is locked") instead of waiting.
        while not local.is_set():
            publish_now(mine, [d.refresh_collection("local")])
            if elsewhere_due.is_set():
                # Stored as another process stores it: no offer reaches this tailer.
                head, tail = envelopes.parts("global", [d.refresh_collection("elsewhere")], None)
                try:
                    configured().append_many("message", [Append("verity.global", head, tail)])
                except OperationalError:
                    # "table is locked" by a concurrent read: the shared-cache
                    # test database does not wait for it; try again.
                    continue
                elsewhere_due.clear()
            time.sleep(0.01)

    pump = threading.Thread(target=traffic)
    pump.start()
    try:
        await asyncio.sleep(0.3)
        elsewhere_due.set()
        buffer = ""
        async with asyncio.timeout(5):
            async for chunk in stream:
                buffer += chunk.decode()
                if '"name":"elsewhere"' in buffer:
                    break
    finally:
        local.set()
        pump.join()
    await stream.aclose()


async def test_a_burst_past_a_streams_queue_arrives_whole_and_in_order(alice: Any) -> None:
    """25 envelopes stored elsewhere reach the tailer in one read and are
    handed to the stream at once: its queue holds 10 (django-eventstream's
    bound), so it overflows and reads the rest from storage."""
    from django_eventstream.views import MAX_PENDING

    audience = f"user-{alice.pk}"
    burst = 25
    assert burst > MAX_PENDING
    response = await open_stream(alice, f"audience={audience}")
    stream = response.streaming_content
    assert await messages(stream, 1) == [{"type": "hello", "audience": audience, "last_seq": 0}]

    def store_elsewhere() -> None:
        appends = []
        for i in range(burst):
            head, tail = envelopes.parts(audience, [d.refresh_item("todo", i)], None)
            appends.append(Append(f"verity.{audience}", head, tail))
        # As another process stores them: no offer reaches this tailer.
        configured().append_many("message", appends)

    await sync_to_async(store_elsewhere)()
    received = await messages(stream, burst)
    assert [m["seq"] for m in received] == list(range(1, burst + 1))
    assert [m["directives"][0]["id"] for m in received] == list(range(burst))
    await stream.aclose()


async def test_a_polled_envelope_is_read_back_only_if_its_own_offer_does_not_follow(
    monkeypatch: Any,
) -> None:
    from django_eventstream.event import Event

    from verity_django import tailer as tailers

    tailer = tailers.Tailer(asyncio.get_running_loop())
    tailer.positions = {"verity.a": 0}
    stored = [0]
    clock = [0.0]
    read_back: list[int] = []

    async def stored_ahead() -> dict[str, int]:
        return {c: stored[0] for c, p in tailer.positions.items() if stored[0] > p}

    async def catch_up(channel: str) -> None:
        read_back.append(stored[0])
        tailer.positions[channel] = stored[0]

    def dispatch(channel: str, events: list[Event]) -> None:
        tailer.positions[channel] = int(events[-1].id)

    monkeypatch.setattr(tailer, "_stored_ahead", stored_ahead)
    monkeypatch.setattr(tailer, "_catch_up", catch_up)
    monkeypatch.setattr(tailer, "_dispatch", dispatch)
    monkeypatch.setattr(
        tailers.Tailer, "_active_channels", staticmethod(lambda: set(tailer.positions))
    )
    monkeypatch.setattr(tailers.time, "monotonic", lambda: clock[0])
    grace = tailers._OFFER_GRACE

    # Stored here; the poll runs before the envelope's own offer arrives.
    stored[0] = 1
    await tailer._step()
    clock[0] += grace / 2
    tailer._offer("verity.a", Event("verity.a", "message", "{}", id=1))
    await tailer._step()
    clock[0] += grace
    await tailer._step()
    assert read_back == []
    assert tailer.positions["verity.a"] == 1

    # Stored by another process: no offer follows, so it is read back once
    # the grace has passed, and not before.
    clock[0] += conf.POLL_INTERVAL
    stored[0] = 3
    await tailer._step()
    clock[0] += grace / 2
    await tailer._step()
    assert read_back == []
    clock[0] += grace
    await tailer._step()
    assert read_back == [3]
    assert tailer.positions["verity.a"] == 3


async def test_offers_from_many_threads_all_reach_the_tailer_once_and_in_order() -> None:
    """Offers from other threads share one loop callback per burst; none may
    be left behind when a thread offers while the loop takes the others."""
    from django_eventstream.event import Event

    from verity_django import tailer as tailers

    tailer = tailers.Tailer(asyncio.get_running_loop())
    per_thread = 2000
    channels = [f"verity.t{i}" for i in range(4)]

    def offer_all(channel: str) -> None:
        for seq in range(1, per_thread + 1):
            tailer.offer_threadsafe(channel, Event(channel, "message", "{}", id=seq))

    threads = [threading.Thread(target=offer_all, args=(c,)) for c in channels]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for channel in channels:
        seqs = [int(event.id) for c, event in tailer._offers if c == channel]
        assert seqs == list(range(1, per_thread + 1))
    assert not tailer._incoming


async def test_the_tailer_asks_storage_every_poll_interval_however_many_offers_arrive(
    monkeypatch: Any,
) -> None:
    from django_eventstream.event import Event

    from verity_django import tailer as tailers

    tailer = tailers.Tailer(asyncio.get_running_loop())
    tailer.positions = {"verity.local": 0, "verity.elsewhere": 0}
    polls: list[float] = []
    clock = [0.0]

    async def stored_ahead() -> dict[str, int]:
        polls.append(clock[0])
        return {}

    def dispatch(channel: str, events: list[Event]) -> None:
        tailer.positions[channel] = int(events[-1].id)

    monkeypatch.setattr(tailer, "_stored_ahead", stored_ahead)
    monkeypatch.setattr(tailer, "_dispatch", dispatch)
    monkeypatch.setattr(
        tailers.Tailer, "_active_channels", staticmethod(lambda: set(tailer.positions))
    )
    monkeypatch.setattr(tailers.time, "monotonic", lambda: clock[0])
    # One second of a local envelope every 10 ms on one channel: storage must
    # still be asked about the other one every POLL_INTERVAL (0.25 s).
    for seq in range(1, 101):
        tailer._offer("verity.local", Event("verity.local", "message", "{}", id=seq))
        await tailer._step()
        clock[0] += 0.01
    assert len(polls) >= 3
    assert tailer.positions["verity.local"] == 100
