"""The pull path inside DRF: its own renderers with the directive header on,
injection only into 2xx responses, and 204 turned into 200 only when there
are directives to carry.

Oracle: for generated (status, body, change) triples on DRF and plain Django
views, the response is exactly what the contract says, judged from the bytes
the client receives.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import override_settings
from django.urls import path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import generics
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.renderers import BrowsableAPIRenderer, HTMLFormRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.test import APIClient
from rest_framework.views import APIView

from testproject.todos.models import Todo
from testproject.todos.serializers import TodoSerializer
from tests.conftest import DIRECTIVE_HEADERS
from verity_django import middleware

pytestmark = [pytest.mark.urls(__name__), pytest.mark.demo]


class TodoForms(generics.ListCreateAPIView[Todo]):
    serializer_class = TodoSerializer
    renderer_classes = [JSONRenderer, BrowsableAPIRenderer]
    parser_classes = [JSONParser, FormParser, MultiPartParser]

    def get_queryset(self) -> Any:
        return Todo.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: Any) -> None:
        serializer.save(owner=self.request.user)


class TodoForm(generics.RetrieveUpdateAPIView[Todo]):
    """A serializer rendered as an HTML form, as DRF's HTMLFormRenderer does."""

    serializer_class = TodoSerializer
    renderer_classes = [HTMLFormRenderer, JSONRenderer]

    def get_queryset(self) -> Any:
        return Todo.objects.filter(owner=self.request.user)


class Probe(APIView):
    """Answers the status asked for, after optionally changing a todo."""

    def get(self, request: Request) -> Response:
        return self.answer(request)

    def post(self, request: Request) -> Response:
        return self.answer(request)

    @staticmethod
    def answer(request: Request) -> Response:
        code = int(request.query_params["status"])
        if request.query_params.get("change") == "1":
            Todo.objects.create(title="probe", owner=request.user)
        data = None if code == 204 else {"detail": "x"}
        return Response(data, status=code)


def plain_probe(request: HttpRequest) -> HttpResponse:
    code = int(request.GET["status"])
    if request.GET.get("change") == "1":
        Todo.objects.create(title="probe", owner=request.user)  # type: ignore[misc]
    if code == 204:
        return HttpResponse(status=204)
    return JsonResponse({"detail": "x"}, status=code)


urlpatterns = [
    path("forms/", TodoForms.as_view()),
    path("form/<int:pk>/", TodoForm.as_view()),
    path("probe/", Probe.as_view()),
    path("plain/", plain_probe),
]

HTML = {"HTTP_ACCEPT": "text/html"}


# ------------------------------------------------------------ DRF's renderers


def test_html_form_renderer_with_the_header(api: APIClient, todo: Todo) -> None:
    response = api.get(f"/form/{todo.pk}/", **HTML, **DIRECTIVE_HEADERS)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="title"' in html and todo.title in html


def test_html_form_renderer_after_a_change_keeps_the_serializer(api: APIClient, todo: Todo) -> None:
    response = api.patch(
        f"/form/{todo.pk}/", {"title": "renamed"}, format="json", **HTML, **DIRECTIVE_HEADERS
    )
    assert response.status_code == 200
    assert response.data.serializer is not None  # type: ignore[attr-defined]
    assert [d["op"] for d in response.data["directives"]][:1] == ["refresh_item"]  # type: ignore[index]
    assert 'value="renamed"' in response.content.decode()


def test_browsable_api_post_shows_the_directives(api: APIClient, alice: Any) -> None:
    response = api.post("/forms/", {"title": "from the form"}, **HTML, **DIRECTIVE_HEADERS)
    assert response.status_code == 201
    html = response.content.decode()
    assert "&quot;directives&quot;" in html and "refresh_collection" in html


def test_browsable_api_invalid_post_keeps_input_and_field_errors(
    api: APIClient, alice: Any
) -> None:
    typed = "t" * 201
    response = api.post("/forms/", {"title": typed}, **HTML, **DIRECTIVE_HEADERS)
    assert response.status_code == 400
    html = response.content.decode()
    assert "Ensure this field has no more than 200 characters." in html
    assert f'value="{typed}"' in html
    assert "directives" not in html


def test_json_error_keeps_its_shape(api: APIClient, alice: Any) -> None:
    response = api.post("/forms/", {"title": ""}, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code == 400
    assert set(response.json()) == {"title"}


@pytest.mark.django_db(transaction=True)
def test_csrf_failure_has_no_directives_key(alice: Any) -> None:
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(alice)
    with override_settings(VERITY={"ALWAYS_INCLUDE_IN_RESPONSES": True}):
        response = api.post("/forms/", {"title": "x"}, format="json")
    assert response.status_code == 403
    assert "directives" not in response.json()


def test_logout_without_directives_stays_204(api: APIClient) -> None:
    response = api.post("/probe/?status=204", **DIRECTIVE_HEADERS)
    assert response.status_code == 204 and response.content == b""


# --------------------------------------------------------------------- oracle

cases = st.tuples(
    st.sampled_from([200, 201, 202, 204, 400, 403, 404, 409, 500]),
    st.booleans(),  # the request changes a todo, so it has directives
    st.booleans(),  # the client asks for directives
    st.sampled_from(["drf", "plain"]),
    st.booleans(),  # ALWAYS_INCLUDE_IN_RESPONSES
)


def check(api: APIClient, code: int, change: bool, asks: bool, kind: str, always: bool) -> None:
    headers = DIRECTIVE_HEADERS if asks else {}
    url = f"/{'probe' if kind == 'drf' else 'plain'}/?status={code}&change={int(change)}"
    with override_settings(VERITY={"ALWAYS_INCLUDE_IN_RESPONSES": always}):
        response = api.post(url, **headers)
    wanted = asks or always
    success = 200 <= code < 300
    if code == 204:
        if wanted and change:
            assert response.status_code == 200
            body = json.loads(response.content)
            assert set(body) == {"directives"} and body["directives"]
        else:
            assert response.status_code == 204 and response.content == b""
        return
    assert response.status_code == code
    body = json.loads(response.content)
    if wanted and success:
        assert set(body) == {"detail", "directives"}
        assert bool(body["directives"]) == change
    else:
        assert body == {"detail": "x"}


ORACLE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@ORACLE
@given(cases)
def test_injection_follows_the_contract(api: APIClient, case: tuple[Any, ...]) -> None:
    check(api, *case)


def test_the_oracle_catches_injection_into_errors(
    api: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(middleware, "_is_success", lambda response: True)
    with pytest.raises(AssertionError):
        check(api, 400, True, True, "drf", False)
