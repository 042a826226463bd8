"""Envelopes, seq, and publishing failures."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.test import override_settings
from rest_framework.test import APIClient

from tests.conftest import DIRECTIVE_HEADERS
from tests.testapp.models import Todo
from verity_django import directives as d
from verity_django import publishing
from verity_django.audiences import channel_for
from verity_django.publishing import publish_or_raise


def stored(audience: str) -> list[dict[str, Any]]:
    events = publishing.storage().get_events(channel_for(audience), 0)
    return [json.loads(e.data) | {"_id": e.id} for e in events]


def test_envelope_shape_and_contiguous_seq_per_audience(db: Any) -> None:
    for _ in range(3):
        publish_or_raise("user-1", [d.refresh_collection("todos")], source="c1")
    publish_or_raise("global", [d.refresh_item("todo", 1)])
    envelopes = stored("user-1")
    assert [e["seq"] for e in envelopes] == [1, 2, 3]
    assert [e["_id"] for e in envelopes] == [1, 2, 3]
    assert envelopes[0] == {
        "type": "directives",
        "seq": 1,
        "audience": "user-1",
        "source": "c1",
        "directives": [{"op": "refresh_collection", "name": "todos"}],
        "_id": 1,
    }
    assert [e["seq"] for e in stored("global")] == [1]


def test_force_reload_envelope_never_carries_a_source(db: Any) -> None:
    publish_or_raise("global", [d.force_reload_page(idempotency_key="k")], source="c1")
    [envelope] = stored("global")
    assert "source" not in envelope


def test_replay_after_a_seq(db: Any) -> None:
    for i in range(5):
        publish_or_raise("global", [d.refresh_item("todo", i)])
    events = publishing.storage().get_events(channel_for("global"), 3)
    assert [json.loads(e.data)["seq"] for e in events] == [4, 5]


def test_publish_failure_never_fails_the_request(
    api: APIClient, todo: Todo, monkeypatch: Any, caplog: Any
) -> None:
    class Broken:
        def append_sequenced(self, *args: Any) -> Any:
            raise ConnectionError("storage is down")

    monkeypatch.setattr(publishing, "storage", lambda: Broken())
    before = publishing.counters.envelopes_failed
    with caplog.at_level(logging.ERROR, logger="verity_django.publishing"):
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
        )
    assert response.status_code == 200
    assert len(response.json()["directives"]) == 4
    assert publishing.counters.envelopes_failed == before + 1
    assert "could not publish 4 directive(s) to audience 'user-" in caplog.text
    assert "storage is down" in caplog.text
    # Once storage is back, the waiting envelope goes out first, in order.
    monkeypatch.undo()
    api.patch(f"/api/todos/{todo.pk}/", {"title": "y"}, format="json", **DIRECTIVE_HEADERS)
    envelopes = stored(f"user-{todo.owner_id}")
    assert [e["seq"] for e in envelopes][-2:] == [2, 3]
    assert len(envelopes[-2]["directives"]) == 4


def test_push_can_be_switched_off(api: APIClient, todo: Todo) -> None:
    before = stored(f"user-{todo.owner_id}")
    with override_settings(VERITY={"PUSH": False}):
        response = api.patch(
            f"/api/todos/{todo.pk}/", {"title": "x"}, format="json", **DIRECTIVE_HEADERS
        )
    assert len(response.json()["directives"]) == 4
    assert stored(f"user-{todo.owner_id}") == before


def test_one_envelope_per_audience_per_request(api: APIClient, alice: Any) -> None:
    response = api.post("/api/todos/", {"title": "a"}, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code == 201
    assert len(stored(f"user-{alice.pk}")) == 1


@pytest.mark.django_db(transaction=True)
def test_rolled_back_request_consumes_no_seq(alice: Any) -> None:
    from django.db import transaction

    from tests.testapp.models import Project

    with pytest.raises(RuntimeError), transaction.atomic():
        Project.objects.create(name="x", owner=alice)
        raise RuntimeError
    Project.objects.create(name="y", owner=alice)
    assert [e["seq"] for e in stored("global")] == [1]
