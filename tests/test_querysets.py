"""Bulk paths that send no model signals, on an opted-in manager."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import verity_django
from tests.testapp.models import Project, Tag, Todo
from verity_django import registry
from verity_django.rules import RefreshCollection
from verity_django.testing import capture_directives

pytestmark = pytest.mark.postgresql


def make_todos(owner: Any, project: Project, n: int, status: str = "active") -> list[Todo]:
    return Todo.objects.bulk_create(
        Todo(title=f"t{i}", owner=owner, project=project, status=status) for i in range(n)
    )


def test_small_update_refreshes_exact_items_and_both_params(alice: Any, project: Project) -> None:
    todos = make_todos(alice, project, 3)
    with capture_directives() as captured:
        count = Todo.objects.filter(pk__in=[t.pk for t in todos[:2]]).update(status="done")
    assert count == 2
    bare = captured.bare
    for t in todos[:2]:
        assert {"op": "refresh_item", "name": "todo", "id": t.pk} in bare
    assert {"op": "refresh_item", "name": "todo", "id": todos[2].pk} not in bare
    params = [x["params"] for x in bare if x.get("params", {}).keys() == {"status"}]
    assert params == [{"status": "active"}, {"status": "done"}]
    assert captured.audiences == {f"user-{alice.pk}"}


def test_update_with_an_expression_treats_the_new_value_as_unknown(todo: Todo) -> None:
    with capture_directives() as captured:
        Todo.objects.filter(pk=todo.pk).update(title=Concat(F("title"), Value("!")))
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in captured.bare


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_large_update_collapses_to_a_few_collection_refreshes(
    alice: Any, bob: Any, project: Project, django_assert_max_num_queries: Any
) -> None:
    make_todos(alice, project, 8)
    make_todos(bob, project, 2)
    with capture_directives() as captured:
        Todo.objects.all().update(status="done")
    assert sorted(x["name"] for x in captured.bare) == ["projects", "todos"]
    assert all(x["op"] == "refresh_collection" and "params" not in x for x in captured.bare)
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}


def test_update_with_an_expression_on_a_params_field_reads_the_new_value(
    alice: Any, project: Project
) -> None:
    todos = make_todos(alice, project, 2)
    with capture_directives() as captured:
        Todo.objects.filter(pk=todos[0].pk).update(status=Concat(Value("do"), Value("ne")))
    params = [x["params"] for x in captured.bare if x.get("params", {}).keys() == {"status"}]
    assert params == [{"status": "active"}, {"status": "done"}]
    assert {"op": "refresh_collection", "name": "todos"} not in captured.bare


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_large_update_moving_rows_to_another_owner_tells_both_owners(
    alice: Any, bob: Any, project: Project
) -> None:
    make_todos(alice, project, 8)
    with capture_directives() as captured:
        Todo.objects.filter(owner=alice).update(owner=bob)
    assert captured.for_audience(f"user-{bob.pk}") == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_collection", "name": "projects"},
    ]
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_large_update_by_expression_tells_the_owners_it_computes(
    alice: Any, bob: Any, project: Project
) -> None:
    make_todos(alice, project, 8)
    with capture_directives() as captured:
        Todo.objects.filter(owner=alice).update(owner=Value(bob.pk))
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_large_update_filtered_by_owner_needs_no_query_for_audiences(
    alice: Any, bob: Any, project: Project
) -> None:
    make_todos(alice, project, 8)
    make_todos(bob, project, 8)
    with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
        Todo.objects.filter(owner=alice).update(status="done")
    assert captured.audiences == {f"user-{alice.pk}"}
    # The bounded pre-read and the UPDATE; the owner is in the filter.
    assert len([q for q in queries if f'"{Todo._meta.db_table}"' in q["sql"]]) == 2
    with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
        Todo.objects.exclude(owner=alice).update(status="done")
    assert captured.audiences == {f"user-{bob.pk}"}
    assert len([q for q in queries if f'"{Todo._meta.db_table}"' in q["sql"]]) == 3


@pytest.mark.parametrize("rows", [2, 8])
@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_update_tells_callable_audiences_of_the_rows_as_they_are_now(alice: Any, rows: int) -> None:
    declared = registry.declaration(Project)
    verity_django.register(
        Project, directives=[RefreshCollection("projects")], audience=lambda p: f"team-{p.name}"
    )
    try:
        Project.objects.bulk_create(Project(name="red", owner=alice) for _ in range(rows))
        with capture_directives() as captured:
            Project.objects.filter(name="red").update(name="blue")
        assert captured.for_audience("team-blue") == [
            {"op": "refresh_collection", "name": "projects"}
        ]
    finally:
        verity_django.register(
            Project,
            directives=declared.directives,
            audience=declared.audience,
            relations=declared.relations,
        )


def test_bulk_create_emits_create_rules(alice: Any, project: Project) -> None:
    with capture_directives() as captured:
        make_todos(alice, project, 3)
    assert captured == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_item", "name": "project", "id": project.pk},
    ]


def test_bulk_update_compares_with_load_time_values(alice: Any, project: Project) -> None:
    make_todos(alice, project, 2)
    todos = list(Todo.objects.all())
    for t in todos:
        t.status = "done"
    with capture_directives() as captured:
        Todo.objects.bulk_update(todos, ["status"])
    statuses = sorted(
        x["params"]["status"] for x in captured.bare if "status" in x.get("params", {})
    )
    assert statuses == ["active", "done"]
    assert sum(1 for x in captured.bare if x["name"] == "todo") == 2


def test_m2m_changes_refresh_the_item_both_ways(todo: Todo) -> None:
    tag = Tag.objects.create(name="urgent")
    with capture_directives() as captured:
        todo.tags.add(tag)
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in captured.bare
    with capture_directives() as captured:
        tag.todos.remove(todo)
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in captured.bare
    tag.todos.add(todo)
    with capture_directives() as captured:
        tag.todos.clear()
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in captured.bare
    assert captured.audiences == {f"user-{todo.owner_id}"}


@pytest.mark.django_db(transaction=True)
def test_queryset_delete_makes_one_batch(alice: Any, project: Project) -> None:
    make_todos(alice, project, 2)
    with capture_directives() as captured:
        Todo.objects.all().delete()
    assert len(captured.batches) == 1
    assert captured == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_item", "name": "project", "id": project.pk},
    ]


def test_cascade_delete_refreshes_dependents(todo: Todo, alice: Any) -> None:
    audience = f"user-{alice.pk}"
    with capture_directives() as captured:
        alice.delete()
    assert {"op": "refresh_collection", "name": "projects"} in captured.bare
    assert {"op": "refresh_collection", "name": "todos"} in captured.for_audience(audience)


def team_of_project(todo: Todo) -> str:
    assert todo.project is not None
    return f"team-{todo.project.name}"


@override_settings(VERITY={"PUSH": False})
def test_update_with_a_callable_audience_costs_no_query_per_row(alice: Any) -> None:
    """Issue 10, finding 7: the callable reads ``todo.project`` of every row."""
    red = Project.objects.create(name="red", owner=alice)
    blue = Project.objects.create(name="blue", owner=alice)
    declared = registry.declaration(Todo)
    verity_django.register(Todo, directives=declared.directives, audience=team_of_project)
    try:
        make_todos(alice, red, 150)
        with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
            Todo.objects.all().update(project=blue)
    finally:
        verity_django.register(
            Todo, directives=declared.directives, audience=declared.audience, relations=["tags"]
        )
    assert captured.audiences == {"team-red", "team-blue"}
    # Rows before, the UPDATE, rows after, and the projects of each (one query each).
    assert len(queries) <= 6, [q["sql"][:80] for q in queries]


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_many_params_variants_of_a_collection_collapse(alice: Any) -> None:
    """Issue 10, finding 7: a bulk_update across projects is not one directive each."""
    projects = Project.objects.bulk_create(Project(name=f"p{i}", owner=alice) for i in range(8))
    todos = make_todos(alice, projects[0], 8)
    loaded = list(Todo.objects.all())
    for t, p in zip(loaded, projects, strict=True):
        t.project = p
    with capture_directives() as captured:
        Todo.objects.bulk_update(loaded, ["project"])
    todos_directives = [x for x in captured.bare if x["name"] == "todos"]
    assert todos_directives == [{"op": "refresh_collection", "name": "todos"}]
    assert len(todos) == 8
    assert captured.audiences == {f"user-{alice.pk}"}
