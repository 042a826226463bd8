"""Open one directive batch per request, inject the pull copy into the
response, and publish the push copy: once the response has been sent when
the request is the only one in flight, else as the view returns.

DRF responses are edited in ``process_template_response``, which Django
calls after the view (and an ``ATOMIC_REQUESTS`` commit) but before the
response is rendered, so ``response.data`` simply gains a key. Other JSON
responses are rewritten on the way out. Only 2xx responses are touched, and
DRF's ``ReturnDict`` stays one, with the serializer its renderers read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from verity_django import batching, pull
from verity_django.conf import conf

_INJECTED = "_verity_directives_injected"


class _InFlight:
    """How many requests this process has inside the middleware right now.

    A lone request's push copy waits for its response to be sent, so the
    requester does not wait for storage (bench W1: 1.13 to 1.02). With other
    requests in flight it is published before the response, as the view
    returns, keeping the back-pressure of the old order: one pair of runs
    showed deferral costing concurrent throughput (bench W5 0.98 to 0.84),
    but later runs of W5 spread over 0.74-0.98 with deferral on and off
    alike, so that evidence is weak (bench/README.md).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0

    def enter(self) -> None:
        with self.lock:
            self.count += 1

    def leave(self) -> bool:
        """Count one request out; whether it was the only one in flight."""
        with self.lock:
            self.count -= 1
            return self.count == 0

    def others(self) -> bool:
        """Whether other requests than the caller's are in flight."""
        with self.lock:
            return self.count > 1


_in_flight = _InFlight()


class DirectiveMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.async_mode = iscoroutinefunction(self.get_response)
        if self.async_mode:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.async_mode:
            return self.__acall__(request)
        if not conf.ENABLED:
            return self.get_response(request)
        opened = batching.Batch.for_request(request)
        request.verity_batch = opened  # type: ignore[attr-defined]
        response: HttpResponseBase | None = None
        _in_flight.enter()
        try:
            with batching.activate(opened):
                got: HttpResponseBase = self.get_response(request)  # type: ignore[assignment]
                self._inject_json(request, got)
                response = got
        finally:
            if not (_in_flight.leave() and opened.close_after(response)):
                opened.close()
            _forget_batch(request)
        assert response is not None
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if not conf.ENABLED:
            return await self.get_response(request)  # type: ignore[no-any-return,misc]
        opened = batching.Batch.for_request(request)
        request.verity_batch = opened  # type: ignore[attr-defined]
        response: HttpResponseBase | None = None
        _in_flight.enter()
        try:
            with batching.activate(opened):
                got: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
                self._inject_json(request, got)
                response = got
        finally:
            if not (_in_flight.leave() and opened.close_after(response)):
                if opened and not opened.closed:
                    await sync_to_async(opened.close)()
                else:
                    opened.closed = True
            _forget_batch(request)
        assert response is not None
        return response

    def process_template_response(self, request: HttpRequest, response: Any) -> Any:
        if not conf.ENABLED:
            return response
        self._inject_drf(request, response)
        opened: batching.Batch | None = getattr(request, "verity_batch", None)
        if opened is not None and opened and _in_flight.others():
            # The view has returned: publish now, in the thread Django runs
            # this hook in anyway, rather than in a hop of its own to a
            # thread after the response (ASGI; bench W5: 150 Python calls
            # per request). What changes later goes out as a batch of its own.
            opened.close()
        return response

    @staticmethod
    def _inject_drf(request: HttpRequest, response: Any) -> None:
        if not hasattr(response, "data") or not _is_success(response):
            return
        if not (conf.INJECT_DRF_RESPONSES or getattr(response, "verity_inject", False)):
            return
        if not pull.wants_directives(request):
            return
        if response.data is None and response.status_code == 204:
            items = pull.directives_for(request)
            if not items:
                return
            response.status_code = 200
            response.data = {"directives": items}
        elif isinstance(response.data, dict):
            # A copy of the same type: DRF's ReturnDict.copy() keeps the
            # serializer that the browsable API and HTMLFormRenderer read.
            data = response.data.copy()
            data["directives"] = pull.directives_for(request)
            response.data = data
        else:
            return
        setattr(response, _INJECTED, True)

    @staticmethod
    def _inject_json(request: HttpRequest, response: HttpResponseBase) -> None:
        if getattr(response, _INJECTED, False) or hasattr(response, "data"):
            return
        if response.streaming or not isinstance(response, HttpResponse):
            return
        if not _is_success(response) or not pull.wants_directives(request):
            return
        if response.status_code == 204 and not response.content:
            items = pull.directives_for(request)
            if not items:
                return
            response.status_code = 200
            response["Content-Type"] = "application/json"
            response.content = json.dumps({"directives": items}).encode()
            return
        if not response.get("Content-Type", "").startswith("application/json"):
            return
        try:
            body = json.loads(response.content)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        body["directives"] = pull.directives_for(request)
        response.content = json.dumps(body).encode()


def _forget_batch(request: HttpRequest) -> None:
    # A request is reference-cycle garbage (DRF's Request and its view point
    # at each other), so whatever it holds waits for the cycle collector. The
    # batch no longer needs it (a response closed later holds the batch
    # itself), so it is freed when the request ends. Held, it left the
    # collector 24 objects more to find per PATCH (bench W5's gen-0
    # collections: a tenth more than with verity off; 4% more since).
    vars(request).pop("verity_batch", None)


def _is_success(response: HttpResponseBase) -> bool:
    # Errors keep their own shape: a form maps every key of a 400 to a field.
    return 200 <= response.status_code < 300
