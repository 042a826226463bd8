"""Endpoints only the benchmarks use (routed by ``bench.urls``)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from django.db import transaction
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from testproject.todos.api import TodoViewSet
from testproject.todos.models import Project, Todo
from testproject.todos.serializers import TodoSerializer

# F1/F2 publish to the audience every anonymous SSE client may read.
PUBLISH_CHANNEL = "verity.global"
_raw_lock = threading.Lock()


@api_view(["POST"])
def save_many(request: Request) -> Response:
    """W4: save ``count`` of the user's todos one by one in one transaction."""
    count = int(request.data.get("count", 200))
    with transaction.atomic():
        todos = list(Todo.objects.filter(owner=request.user).order_by("id")[:count])
        for todo in todos:
            todo.status = Todo.Status.DONE if todo.status == Todo.Status.ACTIVE else "active"
            todo.save()
    return Response({"saved": len(todos)})


def raw_envelope(seq: int) -> str:
    """The JSON a verity publish of one Project update carries, built by hand."""
    now = int(time.time() * 1000)
    envelope = {
        "type": "directives",
        "seq": seq,
        "audience": "global",
        "directives": [
            {
                "op": "refresh_item",
                "name": "project",
                "id": 1,
                "idempotency_key": uuid.uuid4().hex,
                "timestamp": now,
            },
            {
                "op": "refresh_collection",
                "name": "projects",
                "idempotency_key": uuid.uuid4().hex,
                "timestamp": now,
            },
        ],
    }
    return json.dumps(envelope, separators=(",", ":"))


@csrf_exempt
@require_POST
def publish(request: HttpRequest, mode: str) -> HttpResponseBase:
    """F1/F2: one message to ``global``; answers the moment it was handed over.

    ``verity``: update a Project (audience ``global``) in a transaction; ``t0``
    is the commit, and the middleware publishes the envelope afterwards.
    ``raw``: ``django_eventstream.send_event`` of the same envelope, seq
    included (the storage's next id), so that the events view treats it as the
    envelope it is; ``t0`` is taken just before ``send_event``.
    """
    if mode == "verity":
        with transaction.atomic():
            project = Project.objects.order_by("id").first()
            if project is None:
                return JsonResponse({"detail": "no project; run seed_demo"}, status=500)
            project.name = f"bench {time.time_ns()}"
            project.save()
        return JsonResponse({"t0": time.time()})
    if mode == "raw":
        from django_eventstream import send_event

        from verity_django.storage import configured as storage

        with _raw_lock:
            seq = storage().get_current_id(PUBLISH_CHANNEL) + 1
            data = raw_envelope(seq)
            t0 = time.time()
            send_event(PUBLISH_CHANNEL, "message", data, json_encode=False, async_publish=False)
            stored = storage().get_current_id(PUBLISH_CHANNEL)
            _tailer_skip(PUBLISH_CHANNEL, seq)
        if stored != seq:
            return JsonResponse({"detail": f"seq {seq} was stored as {stored}"}, status=500)
        return JsonResponse({"t0": t0, "seq": seq})
    return JsonResponse({"detail": f"unknown mode {mode!r}"}, status=404)


def _tailer_skip(channel: str, seq: int) -> None:
    """Tell this process's verity tailer that ``seq`` was already delivered.

    ``send_event`` queues the raw message to the listeners itself. Left alone,
    verity's tailer would find it in storage on its next poll and hand it to
    every listener again (the events view then drops the copy): work that
    only exists because the benchmark mixes raw sends into a verity server,
    and that would land inside the raw baseline's measurement.
    """
    from verity_django import tailer as tailers

    tailer = tailers._tailer
    if tailer is None or tailer.loop.is_closed():
        return

    def skip() -> None:
        if tailer.positions.get(channel) == seq - 1:
            tailer.positions[channel] = seq

    tailer.loop.call_soon_threadsafe(skip)


@require_GET
def stats(request: HttpRequest) -> HttpResponseBase:
    """Publishing counters and the storage's current seq of ``?channel=`` channels."""
    from verity_django.publishing import counters
    from verity_django.storage import configured

    channels = request.GET.getlist("channel")
    seqs: dict[str, Any] = dict(configured().get_current_ids(channels)) if channels else {}
    return JsonResponse({"counters": counters.as_dict(), "seq": seqs})


async def _idle_stream() -> AsyncIterator[bytes]:
    yield b":" + b" " * 2048 + b"\n\nevent: stream-open\ndata:\n\n"
    while True:
        await asyncio.sleep(20)
        yield b"event: keep-alive\ndata:\n\n"


async def idle_stream(request: HttpRequest) -> HttpResponseBase:
    """M1 floor: the cheapest SSE-shaped response Django can hold open under
    ASGI (an async view, no database, no listener)."""
    return StreamingHttpResponse(_idle_stream(), content_type="text/event-stream")


def raw_events(request: HttpRequest) -> HttpResponseBase:
    """django-eventstream's own view on ``verity.global`` (M1 comparison)."""
    from django_eventstream.views import events

    response: HttpResponseBase = events(request, channels=[PUBLISH_CHANNEL])
    return response


class HandwrittenTodoViewSet(TodoViewSet):
    """W1h: the demo's todo endpoint on a server with verity off, computing the
    same directives by hand and sending them with django_eventstream's
    ``send_event`` on the same storage, as a hand-rolled server does."""

    def perform_update(self, serializer: TodoSerializer) -> None:  # type: ignore[override]
        assert serializer.instance is not None
        old_status = serializer.instance.status
        todo = serializer.save()
        now = int(time.time() * 1000)
        source = self.request.headers.get("X-Client-ID")

        def stamped(op: str, name: str, **fields: Any) -> dict[str, Any]:
            key = uuid.uuid4().hex
            return {"op": op, "name": name, **fields, "idempotency_key": key, "timestamp": now}

        by_status = [{"status": old_status}, {"status": todo.status}]
        self.directives = [
            stamped("refresh_item", "todo", id=todo.pk),
            *(stamped("refresh_collection", "todos", params=p) for p in by_status),
            stamped("refresh_collection", "todos", params={"project": todo.project_id}),
            stamped("refresh_item", "project", id=todo.project_id),
        ]
        for directive in self.directives:
            directive["source"] = source
        from django_eventstream import send_event

        from verity_django.storage import configured

        channel = f"verity.user-{todo.owner_id}"
        with _raw_lock:
            seq = configured().get_current_id(channel) + 1
            envelope = {
                "type": "directives",
                "seq": seq,
                "audience": f"user-{todo.owner_id}",
                "directives": self.directives,
            }
            send_event(
                channel,
                "message",
                json.dumps(envelope, separators=(",", ":")),
                json_encode=False,
                async_publish=False,
            )
            _tailer_skip(channel, seq)

    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        response = super().partial_update(request, *args, **kwargs)
        response.data = {**response.data, "directives": self.directives}
        return response
