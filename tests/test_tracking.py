"""Evaluating rules on a save costs no query."""

from __future__ import annotations

import contextlib
from typing import Any

from django.db import transaction
from django.test import override_settings

import verity_django
from tests.testapp.models import Todo
from verity_django import tracking
from verity_django.testing import capture_directives


@override_settings(VERITY={"PUSH": False})
def test_save_adds_zero_queries(todo: Todo, django_assert_num_queries: Any) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    with capture_directives() as captured, verity_django.batch():
        with django_assert_num_queries(1):
            loaded.status = "done"
            loaded.project = None
            loaded.save()
    names = [(x["op"], x["name"], x.get("params")) for x in captured]
    assert ("refresh_collection", "todos", {"status": "active"}) in names
    assert ("refresh_collection", "todos", {"status": "done"}) in names
    assert ("refresh_item", "project", None) in names


@override_settings(VERITY={"PUSH": False})
def test_old_values_come_from_load_time(todo: Todo) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    with capture_directives() as captured:
        loaded.status = "done"
        loaded.save()
        loaded.status = "active"
        loaded.save()
    per_batch = [
        [
            x.to_dict()["params"]["status"]
            for x in batch.directives()
            if x.params and "status" in x.params
        ]
        for batch in captured.batches
    ]
    assert per_batch == [["active", "done"], ["done", "active"]]


@override_settings(VERITY={"PUSH": False})
def test_deferred_params_field_falls_back_to_whole_collection(todo: Todo) -> None:
    loaded = Todo.objects.only("id", "title", "owner_id", "project_id").get(pk=todo.pk)
    with capture_directives() as captured:
        loaded.title = "x"
        loaded.save(update_fields=["title"])
    assert {"op": "refresh_collection", "name": "todos"} in captured.bare


class RolledBack(Exception):
    pass


def test_a_save_in_a_block_that_rolled_back_is_forgotten(todo: Todo) -> None:
    """Django keeps the instance's values; the snapshot goes back to the row's."""
    loaded = Todo.objects.get(pk=todo.pk)
    with contextlib.suppress(RolledBack), transaction.atomic():
        loaded.status = "done"
        loaded.save()
        assert tracking.previous(loaded) is not None
        assert tracking.previous(loaded)["status"] == "done"  # type: ignore[index]
        raise RolledBack
    assert tracking.previous(loaded)["status"] == "active"  # type: ignore[index]
    assert loaded.status == "done"


def test_only_the_savepoints_that_rolled_back_are_undone(todo: Todo) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    with transaction.atomic():
        loaded.status = "done"
        loaded.save()
        with contextlib.suppress(RolledBack), transaction.atomic():
            loaded.title = "inner"
            loaded.status = "active"
            loaded.save()
            raise RolledBack
        with transaction.atomic():
            loaded.description = "kept"
            loaded.save(update_fields=["description"])
    # The outer save and the released savepoint stand; the rolled-back one is undone.
    assert tracking.previous(loaded)["status"] == "done"  # type: ignore[index]


def test_a_refresh_in_a_block_that_rolled_back_is_forgotten(todo: Todo) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    with contextlib.suppress(RolledBack), transaction.atomic():
        Todo.objects.filter(pk=todo.pk).update(status="done")
        loaded.refresh_from_db()
        assert tracking.previous(loaded)["status"] == "done"  # type: ignore[index]
        raise RolledBack
    assert tracking.previous(loaded)["status"] == "active"  # type: ignore[index]


def test_a_rolled_back_save_then_a_partial_save_tells_the_rows_audience(
    todo: Todo, bob: Any
) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    with contextlib.suppress(RolledBack), transaction.atomic():
        loaded.owner = bob
        loaded.save()
        raise RolledBack
    with capture_directives() as captured:
        loaded.status = "done"
        loaded.save(update_fields=["status"])
    assert captured.audiences == {f"user-{todo.owner_id}"}
