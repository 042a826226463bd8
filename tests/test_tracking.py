"""Evaluating rules on a save costs no query."""

from __future__ import annotations

from typing import Any

from django.test import override_settings

import verity_django
from tests.testapp.models import Todo
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
