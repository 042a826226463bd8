"""The helpers users import in their own tests."""

from __future__ import annotations

from typing import Any

from tests.testapp.models import Todo
from verity_django.testing import CapturedDirectives, capture_directives, strip_metadata


def test_contract_example_is_a_one_liner(todo: Todo) -> None:
    with capture_directives() as captured:
        todo.title = "New"
        todo.save()
    assert captured == [
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
            "params": {"project": todo.project_id},
            "params_mode": "contains",
        },
        {"op": "refresh_item", "name": "project", "id": todo.project_id},
    ]
    assert len(captured) == 4
    assert all("idempotency_key" in x for x in captured.directives)


def test_fixture_records_the_test(verity_directives: CapturedDirectives, alice: Any) -> None:
    Todo.objects.create(title="x", owner=alice)
    assert verity_directives.for_audience(f"user-{alice.pk}") == [
        {"op": "refresh_collection", "name": "todos"}
    ]


def test_strip_metadata_handles_invalidate_targets() -> None:
    data = [
        {
            "op": "invalidate",
            "idempotency_key": "k",
            "targets": [{"op": "refresh_item", "name": "a", "id": 1, "timestamp": 1}],
        }
    ]
    assert strip_metadata(data) == [
        {"op": "invalidate", "targets": [{"op": "refresh_item", "name": "a", "id": 1}]}
    ]


def test_atomic_blocks_inside_a_test_transaction_are_run(alice: Any) -> None:
    from django.db import transaction

    with capture_directives() as captured:
        with transaction.atomic():
            Todo.objects.create(title="x", owner=alice)
    assert captured == [{"op": "refresh_collection", "name": "todos"}]
