"""The pull path: directives in the responses of the mutations that caused them."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client, override_settings
from rest_framework.test import APIClient

from tests.conftest import DIRECTIVE_HEADERS
from tests.testapp.models import Project, Todo
from verity_django.testing import strip_metadata

pytestmark = pytest.mark.urls("tests.pullviews.urls")


def test_patch_returns_item_and_both_status_collections(api: APIClient, todo: Todo) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/", {"status": "done"}, format="json", **DIRECTIVE_HEADERS
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "done"
    assert strip_metadata(body["directives"]) == [
        {"op": "refresh_item", "name": "todo", "id": todo.pk},
        {
            "op": "refresh_collection",
            "name": "todos",
            "params": {"status": "active"},
            "params_mode": "contains",
        },
        {
            "op": "refresh_collection",
            "name": "todos",
            "params": {"status": "done"},
            "params_mode": "contains",
        },
        {
            "op": "refresh_collection",
            "name": "todos",
            "params": {"project": todo.project_id},
            "params_mode": "contains",
        },
        {"op": "refresh_item", "name": "project", "id": todo.project_id},
    ]
    for item in body["directives"]:
        assert item["source"] == "client-a"


def test_create_returns_collection_rules_only(api: APIClient, project: Project) -> None:
    response = api.post(
        "/api/todos/", {"title": "New", "project": project.pk}, format="json", **DIRECTIVE_HEADERS
    )
    assert response.status_code == 201
    assert strip_metadata(response.json()["directives"]) == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_item", "name": "project", "id": project.pk},
    ]


def test_delete_answers_200_with_directives_and_never_the_deleted_item(
    api: APIClient, todo: Todo
) -> None:
    response = api.delete(f"/api/todos/{todo.pk}/", **DIRECTIVE_HEADERS)
    assert response.status_code == 200
    assert strip_metadata(response.json()["directives"]) == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_item", "name": "project", "id": todo.project_id},
    ]


def test_delete_without_the_request_header_stays_204(api: APIClient, todo: Todo) -> None:
    response = api.delete(f"/api/todos/{todo.pk}/")
    assert response.status_code == 204
    assert response.content == b""


@pytest.mark.parametrize(
    "value", ["send me directives", "  SEND me DIRECTIVES ", "Send  Me\tDirectives"]
)
def test_request_header_ignores_case_and_spaces(api: APIClient, todo: Todo, value: str) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/",
        {"title": "x"},
        format="json",
        HTTP_X_VERITY_DIRECTIVE_REQUEST=value,
    )
    assert "directives" in response.json()


@pytest.mark.parametrize("value", ["", "yes", "send me directive"])
def test_other_header_values_get_no_directives(api: APIClient, todo: Todo, value: str) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/",
        {"title": "x"},
        format="json",
        HTTP_X_VERITY_DIRECTIVE_REQUEST=value,
    )
    assert "directives" not in response.json()


@override_settings(VERITY={"ALWAYS_INCLUDE_IN_RESPONSES": True})
def test_always_on_setting(api: APIClient, todo: Todo) -> None:
    response = api.patch(f"/api/todos/{todo.pk}/", {"title": "x"}, format="json")
    assert len(response.json()["directives"]) == 4


@pytest.mark.parametrize(
    ("header", "value"), [("HTTP_X_VERITY_CLIENT_ID", "doc-id"), ("HTTP_X_CLIENT_ID", "code-id")]
)
def test_source_comes_from_either_client_id_header(
    api: APIClient, todo: Todo, header: str, value: str
) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/",
        {"title": "x"},
        format="json",
        HTTP_X_VERITY_DIRECTIVE_REQUEST="send me directives",
        **{header: value},
    )
    assert {item["source"] for item in response.json()["directives"]} == {value}


def test_pull_and_push_copies_share_idempotency_keys(api: APIClient, todo: Todo) -> None:
    from verity_django.signals import envelope_published

    pushed: list[str] = []

    def record(sender: Any, envelope: str, **kwargs: Any) -> None:
        pushed.append(envelope)

    envelope_published.connect(record, dispatch_uid="test-keys")
    try:
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
        )
    finally:
        envelope_published.disconnect(dispatch_uid="test-keys")
    import json

    [envelope] = [json.loads(e) for e in pushed]
    assert envelope["audience"] == f"user-{todo.owner_id}"
    assert "source" not in envelope  # pushed envelopes name no client
    pulled = {x["idempotency_key"] for x in response.json()["directives"]}
    assert {x["idempotency_key"] for x in envelope["directives"]} == pulled


@pytest.mark.parametrize("url", ["/t/generic/", "/t/apiview/", "/t/function/", "/t/optin/"])
def test_every_drf_view_style_gets_directives(api: APIClient, url: str) -> None:
    response = api.post(url, {"name": "p"}, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code in (200, 201)
    assert strip_metadata(response.json()["directives"]) == [
        {"op": "refresh_collection", "name": "projects"}
    ]


def test_non_dict_bodies_are_left_valid(api: APIClient, alice: Any) -> None:
    response = api.post("/t/list/", {}, format="json", **DIRECTIVE_HEADERS)
    assert response.json() == [1, 2]


@override_settings(VERITY={"INJECT_DRF_RESPONSES": False})
def test_mixin_opts_in_when_global_injection_is_off(api: APIClient) -> None:
    plain = api.post("/t/apiview/", {}, format="json", **DIRECTIVE_HEADERS)
    assert "directives" not in plain.json()
    opted = api.post("/t/optin/", {}, format="json", **DIRECTIVE_HEADERS)
    assert len(opted.json()["directives"]) == 1


def test_plain_django_json_response(alice: Any) -> None:
    client = Client()
    client.force_login(alice)
    response = client.post("/t/plain/", **DIRECTIVE_HEADERS)
    body = response.json()
    assert body["ok"] is True
    assert strip_metadata(body["directives"]) == [{"op": "refresh_collection", "name": "projects"}]


def test_plain_django_204_becomes_200_with_directives(alice: Any, project: Project) -> None:
    client = Client()
    client.force_login(alice)
    response = client.post("/t/plain-delete/", **DIRECTIVE_HEADERS)
    assert response.status_code == 200
    assert strip_metadata(response.json()["directives"]) == [
        {"op": "refresh_collection", "name": "projects"}
    ]


def test_get_requests_carry_an_empty_list(api: APIClient, todo: Todo) -> None:
    response = api.get(f"/api/todos/{todo.pk}/", **DIRECTIVE_HEADERS)
    assert response.json()["directives"] == []


@override_settings(VERITY={"ENABLED": False})
def test_disabled_app_changes_nothing(api: APIClient, todo: Todo) -> None:
    response = api.patch(
        f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
    )
    assert "directives" not in response.json()


def test_session_mutations_still_need_csrf(alice: Any, todo: Todo) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.login(username="alice", password="alice-password")
    response = client.patch(
        f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
    )
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    todo.refresh_from_db()
    assert todo.title == "Buy milk"
