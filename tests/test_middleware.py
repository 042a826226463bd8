"""The push copy of a request's batch is published once its response was sent.

The requester's response (with its pull copy) does not wait for storage and
transports; servers call ``response.close()`` once the body is written, and
that publishes. A response that is never closed still publishes, in the
background, when it is collected.
"""

from __future__ import annotations

import gc
import json
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import AnonymousUser
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.test import RequestFactory

from tests.testapp.models import Project
from tests.waiting import wait_for
from verity_django import publishing
from verity_django.middleware import DirectiveMiddleware
from verity_django.signals import directives_committed
from verity_django.storage import configured


def stored_seqs(audience: str) -> list[int]:
    return [json.loads(e.data)["seq"] for e in configured().get_events(f"verity.{audience}", 0)]


def _request() -> HttpRequest:
    request = RequestFactory().post("/anything/", HTTP_X_CLIENT_ID="window-a")
    request.user = AnonymousUser()
    return request


def _creating(alice: Any, response: Callable[[], HttpResponseBase]) -> Any:
    def view(request: HttpRequest) -> HttpResponseBase:
        Project.objects.create(name="p", owner=alice)
        return response()

    return view


@pytest.fixture
def drained() -> Iterator[None]:
    yield
    assert publishing.flush(timeout=5)


@pytest.mark.django_db(transaction=True)
def test_the_push_copy_waits_for_the_response_to_be_closed(alice: Any) -> None:
    middleware = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))
    response = middleware(_request())
    assert stored_seqs("global") == []
    response.close()
    assert stored_seqs("global") == [1]


@pytest.mark.django_db(transaction=True)
def test_the_async_path_waits_for_the_close_too(alice: Any) -> None:
    async def get_response(request: HttpRequest) -> HttpResponseBase:
        from asgiref.sync import sync_to_async

        return await sync_to_async(_creating(alice, lambda: JsonResponse({"ok": True})))(request)

    middleware = DirectiveMiddleware(get_response)
    response = async_to_sync(middleware)(_request())
    assert stored_seqs("global") == []
    response.close()
    assert stored_seqs("global") == [1]


def _async_creating(alice: Any) -> Callable[[HttpRequest], Any]:
    async def get_response(request: HttpRequest) -> HttpResponseBase:
        from asgiref.sync import sync_to_async

        return await sync_to_async(_creating(alice, lambda: JsonResponse({"ok": True})))(request)

    return get_response


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.django_db(transaction=True)
def test_a_request_lets_go_of_its_batch_once_its_response_is_closed(alice: Any, path: str) -> None:
    """Django's and DRF's requests are reference-cycle garbage, freed only by
    the cycle collector, so a batch they still held would wait for it too
    (bench W5: 24 objects more per request for the collector to find). The
    request here stays alive, and the collector is off."""
    delivered: list[weakref.ref[Any]] = []

    def keep(sender: Any, batch: Any, **kwargs: Any) -> None:
        delivered.append(weakref.ref(batch))

    directives_committed.connect(keep, dispatch_uid="test-keep")
    request = _request()
    gc.disable()
    try:
        if path == "sync":
            response = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))(
                request
            )
        else:
            response = async_to_sync(DirectiveMiddleware(_async_creating(alice)))(request)
        response.close()
        assert len(delivered) == 1
        assert delivered[0]() is None
    finally:
        gc.enable()
        directives_committed.disconnect(dispatch_uid="test-keep")
    assert stored_seqs("global") == [1]


@pytest.mark.django_db(transaction=True)
def test_a_response_that_is_never_closed_still_publishes(alice: Any, drained: None) -> None:
    # An ASGI client that leaves before the response is sent: Django drops
    # the response without closing it.
    middleware = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))
    response = middleware(_request())
    del response
    gc.collect()
    wait_for(lambda: stored_seqs("global") == [1])


@pytest.mark.django_db(transaction=True)
def test_a_response_collected_where_the_backlog_is_locked_still_publishes(
    alice: Any, drained: None
) -> None:
    # The collector runs finalizers in whichever thread allocates, also one
    # holding the publisher's backlog lock: delivering the batch right there
    # deadlocked that thread.
    middleware = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))
    response = middleware(_request())
    collected = weakref.ref(response)
    # Automatic collections off: only the collection below, in the thread
    # that holds the lock, may free the response (a cycle refcounts never free).
    gc.disable()
    try:
        cycle: list[Any] = [response]
        cycle.append(cycle)
        del response, cycle

        def collect_holding_the_backlog_lock() -> None:
            with publishing._publisher.lock:
                gc.collect()

        collector = threading.Thread(target=collect_holding_the_backlog_lock, daemon=True)
        assert collected() is not None
        collector.start()
        collector.join(timeout=10)
    finally:
        gc.enable()
    assert not collector.is_alive(), "the finalizer deadlocked its thread"
    assert collected() is None
    wait_for(lambda: stored_seqs("global") == [1])


@pytest.mark.django_db(transaction=True)
def test_a_streaming_response_publishes_before_it_streams(alice: Any) -> None:
    middleware = DirectiveMiddleware(_creating(alice, lambda: StreamingHttpResponse(iter([b"x"]))))
    middleware(_request())
    assert stored_seqs("global") == [1]


@pytest.mark.django_db(transaction=True)
def test_the_pull_copy_and_the_push_copy_share_their_keys(alice: Any) -> None:
    request = _request()
    request.META["HTTP_X_VERITY_DIRECTIVE_REQUEST"] = "send me directives"
    middleware = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))
    response = middleware(request)
    pulled = {x["idempotency_key"] for x in json.loads(response.content)["directives"]}
    response.close()
    [event] = configured().get_events("verity.global", 0)
    pushed = {x["idempotency_key"] for x in json.loads(event.data)["directives"]}
    assert pulled == pushed
    assert pulled


@pytest.mark.django_db(transaction=True)
def test_with_another_request_in_flight_the_push_copy_goes_out_as_the_view_returns(
    alice: Any,
) -> None:
    # Deferred, it would overlap the other requests' writes (bench W5).
    inside, release = threading.Event(), threading.Event()

    def waiting(request: HttpRequest) -> HttpResponseBase:
        inside.set()
        release.wait(5)
        return JsonResponse({"ok": True})

    other = threading.Thread(target=DirectiveMiddleware(waiting), args=(_request(),))
    other.start()
    try:
        assert inside.wait(5)
        middleware = DirectiveMiddleware(_creating(alice, lambda: JsonResponse({"ok": True})))
        middleware(_request())
        assert stored_seqs("global") == [1]
    finally:
        release.set()
        other.join(5)


@pytest.mark.django_db(transaction=True)
def test_with_another_request_in_flight_a_drf_response_publishes_as_the_view_returns(
    alice: Any,
) -> None:
    """The push copy goes out in ``process_template_response`` (the thread
    Django runs it in anyway), with the pull copy's keys; a change made after
    that still goes out, as a batch of its own."""
    from rest_framework.renderers import JSONRenderer
    from rest_framework.response import Response

    inside, release = threading.Event(), threading.Event()

    def waiting(request: HttpRequest) -> HttpResponseBase:
        inside.set()
        release.wait(5)
        return JsonResponse({"ok": True})

    seen_before_render: list[list[int]] = []

    def handler_inside(request: HttpRequest) -> HttpResponseBase:
        # What Django's handler does between the view and the middleware.
        Project.objects.create(name="p", owner=alice)
        response = Response({"ok": True})
        response.accepted_renderer = JSONRenderer()
        response.accepted_media_type = "application/json"
        response.renderer_context = {}
        response = middleware.process_template_response(request, response)
        seen_before_render.append(stored_seqs("global"))
        response.render()
        Project.objects.create(name="later", owner=alice)
        return response

    other = threading.Thread(target=DirectiveMiddleware(waiting), args=(_request(),))
    other.start()
    try:
        assert inside.wait(5)
        middleware = DirectiveMiddleware(handler_inside)
        request = _request()
        request.META["HTTP_X_VERITY_DIRECTIVE_REQUEST"] = "send me directives"
        response = middleware(request)
    finally:
        release.set()
        other.join(5)
    response.close()
    assert seen_before_render == [[1]]
    assert stored_seqs("global") == [1, 2]
    first, later = (json.loads(e.data) for e in configured().get_events("verity.global", 0))
    pulled = {x["idempotency_key"] for x in json.loads(response.content)["directives"]}
    assert pulled == {x["idempotency_key"] for x in first["directives"]}
    assert pulled.isdisjoint(x["idempotency_key"] for x in later["directives"])
