"""Every change path tells the audiences the row had and has (issue 10's findings)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import verity_django
from tests.testapp.models import Board, Bug, Card, Column, Comment, Label, Project, Tag, Team, Todo
from verity_django import registry, rules
from verity_django.rules import RefreshCollection, RefreshItem
from verity_django.testing import capture_directives


@contextmanager
def declared(model: Any, **declaration: Any) -> Iterator[None]:
    """Give ``model`` other rules for the length of a test."""
    original = registry.declaration(model)
    verity_django.register(model, **declaration)
    try:
        yield
    finally:
        if original is None:
            verity_django.unregister(model)
        else:
            verity_django.register(
                model,
                directives=original.directives,
                audience=original.audience,
                relations=original.relations,
            )


def todo_rules(audience: Any) -> Any:
    return declared(
        Todo,
        directives=registry.declaration(Todo).directives,
        audience=audience,
        relations=["tags"],
    )


def team_of_project(todo: Todo) -> str:
    assert todo.project is not None
    return f"team-{todo.project.name}"


@pytest.fixture
def red_blue(alice: Any) -> tuple[Project, Project]:
    return (
        Project.objects.create(name="red", owner=alice),
        Project.objects.create(name="blue", owner=alice),
    )


# 1. A callable audience tells the old state's audience as well as the new one's.


def test_save_moving_a_row_tells_the_callables_old_and_new_audience(
    alice: Any, red_blue: tuple[Project, Project]
) -> None:
    red, blue = red_blue
    with todo_rules(team_of_project):
        todo = Todo.objects.create(title="t", owner=alice, project=red)
        loaded = Todo.objects.get(pk=todo.pk)
        with capture_directives() as captured:
            loaded.project = blue
            loaded.save()
    item = {"op": "refresh_item", "name": "todo", "id": todo.pk}
    assert item in captured.for_audience("team-red")
    assert item in captured.for_audience("team-blue")
    # Each team is told the project it can see, never the other one's.
    red_item = {"op": "refresh_item", "name": "project", "id": red.pk}
    blue_item = {"op": "refresh_item", "name": "project", "id": blue.pk}
    assert red_item in captured.for_audience("team-red")
    assert red_item not in captured.for_audience("team-blue")
    assert blue_item in captured.for_audience("team-blue")
    assert blue_item not in captured.for_audience("team-red")


@pytest.mark.parametrize("rows", [3, 8])
@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5})
def test_update_moving_rows_tells_the_callables_old_and_new_audience(
    alice: Any, red_blue: tuple[Project, Project], rows: int
) -> None:
    red, blue = red_blue
    with todo_rules(team_of_project):
        Todo.objects.bulk_create(Todo(title="t", owner=alice, project=red) for _ in range(rows))
        with capture_directives() as captured:
            Todo.objects.filter(project=red).update(project=blue)
    assert captured.for_audience("team-red")
    assert captured.for_audience("team-blue")


def queries_of(queries: CaptureQueriesContext, *models: Any) -> int:
    tables = [f'"{m._meta.db_table}"' for m in models]
    return sum(1 for q in queries if any(t in q["sql"] for t in tables))


@override_settings(VERITY={"PUSH": False})
def test_related_path_audience_tells_old_and_new(alice: Any, bob: Any) -> None:
    mine = Project.objects.create(name="mine", owner=alice)
    theirs = Project.objects.create(name="theirs", owner=bob)
    with todo_rules("project__owner"):
        todo = Todo.objects.create(title="t", owner=alice, project=mine)
        loaded = Todo.objects.get(pk=todo.pk)
        with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
            loaded.project = theirs
            loaded.save()
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}
    # The UPDATE, and one query for the owners of the old and the new project.
    assert queries_of(queries, Todo, Project) == 2


@override_settings(VERITY={"PUSH": False})
def test_related_path_audience_costs_one_query_per_bulk_operation(alice: Any, bob: Any) -> None:
    projects = [Project.objects.create(name=f"p{i}", owner=alice) for i in range(20)]
    theirs = Project.objects.create(name="theirs", owner=bob)
    with todo_rules("project__owner"):
        Todo.objects.bulk_create(Todo(title="t", owner=alice, project=p) for p in projects * 10)
        with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
            Todo.objects.all().update(project=theirs)
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}
    # 200 rows: the bounded read, the distinct projects, their owners, the UPDATE.
    assert queries_of(queries, Todo, Project) == 4


# 2. The reverse side of an m2m reaches the rows' own audiences.


@pytest.mark.parametrize("audience", ["owner", lambda todo: f"user-{todo.owner_id}"])
def test_reverse_m2m_changes_reach_the_declaring_rows_audiences(
    todo: Todo, bob: Any, project: Project, audience: Any
) -> None:
    other = Todo.objects.create(title="b", owner=bob, project=project)
    tag = Tag.objects.create(name="urgent")
    mine, theirs = f"user-{todo.owner_id}", f"user-{bob.pk}"
    with todo_rules(audience):
        for change, audiences in (
            (lambda: tag.todos.add(todo, other), {mine, theirs}),
            (lambda: tag.todos.remove(other), {theirs}),
            (lambda: tag.todos.clear(), {mine}),
        ):
            with capture_directives() as captured:
                change()
            assert captured.audiences == audiences
        with capture_directives() as captured:
            tag.todos.set([other])
    assert captured.audiences == {theirs}
    assert {"op": "refresh_item", "name": "todo", "id": other.pk} in captured.bare


# 3. SET_NULL and SET_DEFAULT, which Django applies with no signal.


def test_set_null_tells_the_rows_it_changes(todo: Todo, project: Project) -> None:
    with capture_directives() as captured:
        project.delete()
    told = captured.for_audience(f"user-{todo.owner_id}")
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in told
    for params in ({"project": project.pk}, {"project": None}):
        assert {
            "op": "refresh_collection",
            "name": "todos",
            "params": params,
            "params_mode": "contains",
        } in told


@pytest.mark.django_db(transaction=True)
def test_set_null_rolls_back_with_the_delete(todo: Todo, project: Project) -> None:
    pk = project.pk
    with capture_directives() as captured, transaction.atomic():
        project.delete()
        transaction.set_rollback(True)
    assert captured == []
    todo.refresh_from_db()
    assert todo.project_id == pk


def test_set_default_tells_the_rows_it_changes(alice: Any) -> None:
    team = Team.objects.create(name="a")
    board = Board.objects.create(team=team, name="b")
    doing = Column.objects.create(name="doing")
    card = Card.objects.create(board=board, title="c", column=doing, assignee=alice)
    with capture_directives() as captured:
        doing.delete()
    assert card.pk in [x.get("id") for x in captured.for_audience(f"team-{team.pk}")]
    assert {"op": "refresh_item", "name": "card", "id": card.pk} in captured.for_audience(
        f"user-{alice.pk}"
    )


def test_an_audience_the_row_enters_or_leaves_is_told_as_a_create_or_a_delete(
    todo: Todo, alice: Any, bob: Any
) -> None:
    """Its lists without params gained or lost the row (found by the oracle)."""
    with capture_directives() as captured:
        todo.owner = bob
        todo.save()
    whole = {"op": "refresh_collection", "name": "todos"}
    assert whole in captured.for_audience(f"user-{bob.pk}")
    assert whole in captured.for_audience(f"user-{alice.pk}")


# 6. Snapshots are what the database holds.


def test_save_with_update_fields_keeps_unsaved_fields_old(todo: Todo, bob: Any) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    loaded.owner = bob
    loaded.status = "done"
    with capture_directives() as captured:
        loaded.title = "renamed"
        loaded.save(update_fields=["title"])
    # The owner and the status in the database did not change.
    assert captured.audiences == {f"user-{todo.owner_id}"}
    assert all(x.get("params", {}).get("status") != "done" for x in captured.bare)
    with capture_directives() as captured:
        loaded.save()
    # Now both are written: the row left alice's lists and entered bob's.
    for audience in (f"user-{todo.owner_id}", f"user-{bob.pk}"):
        assert {"op": "refresh_collection", "name": "todos"} in captured.for_audience(audience)
    assert captured.audiences == {f"user-{todo.owner_id}", f"user-{bob.pk}"}


def test_bulk_update_takes_only_the_written_fields_as_new(todo: Todo, bob: Any) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    loaded.owner = bob
    loaded.title = "renamed"
    with capture_directives() as captured:
        Todo.objects.bulk_update([loaded], ["title"])
    assert captured.audiences == {f"user-{todo.owner_id}"}
    with capture_directives() as captured:
        Todo.objects.bulk_update([loaded], ["owner"])
    assert captured.audiences == {f"user-{todo.owner_id}", f"user-{bob.pk}"}


@pytest.mark.parametrize("fields", [None, ["status"]])
def test_refresh_from_db_takes_a_new_snapshot(todo: Todo, fields: Any) -> None:
    loaded = Todo.objects.get(pk=todo.pk)
    Todo.objects.filter(pk=todo.pk).update(status="done")
    loaded.refresh_from_db(fields=fields)
    with capture_directives() as captured:
        loaded.status = "active"
        loaded.save()
    statuses = [x["params"]["status"] for x in captured.bare if "status" in x.get("params", {})]
    assert statuses == ["done", "active"]


def test_raw_saves_emit_nothing(todo: Todo) -> None:
    with capture_directives() as captured:
        todo.save_base(raw=True)
    assert captured == []


# 8. User code inside rules never fails the request, and never goes unnoticed.


def counted() -> int:
    return rules.counters.user_code_errors


@pytest.mark.parametrize(
    "audience",
    [lambda todo: None, lambda todo: 1 / 0, lambda todo: ["team x"], lambda todo: 42],
    ids=["none", "raises", "invalid", "not-a-list"],
)
def test_a_failing_audience_callable_still_tells_the_known_audiences(
    todo: Todo, audience: Any, caplog: Any
) -> None:
    before = counted()
    with todo_rules(["owner", audience]), capture_directives() as captured:
        todo.title = "x"
        todo.save()
    assert captured.audiences == {f"user-{todo.owner_id}"}
    assert counted() > before
    assert any(
        r.levelno == logging.ERROR and "directive_audience callable" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "result", [lambda todo: {1, 2}, lambda todo: 1 / 0, lambda todo: float("nan")]
)
def test_a_failing_result_callable_drops_only_the_result(todo: Todo, result: Any) -> None:
    before = counted()
    with declared(Todo, directives=[RefreshItem("todo", result=result)], audience="owner"):
        with capture_directives() as captured:
            todo.title = "x"
            todo.save()
    assert captured == [{"op": "refresh_item", "name": "todo", "id": todo.pk}]
    assert counted() == before + 1


@pytest.mark.parametrize("key", [lambda todo, event: 1 / 0, lambda todo, event: 7])
def test_a_failing_idempotency_key_falls_back_to_a_random_key(todo: Todo, key: Any) -> None:
    before = counted()
    with declared(
        Todo,
        directives=[RefreshItem("todo", idempotency_key=key), RefreshCollection("todos")],
        audience="owner",
    ):
        with capture_directives() as captured:
            todo.title = "x"
            todo.save()
    assert captured == [
        {"op": "refresh_item", "name": "todo", "id": todo.pk},
        {"op": "refresh_collection", "name": "todos"},
    ]
    assert all(x["idempotency_key"] for x in captured.directives)
    assert counted() == before + 1


# Multi-table inheritance and proxies.


def test_a_multi_table_child_also_follows_its_parents_rules(alice: Any) -> None:
    team = Team.objects.create(name="a")
    board = Board.objects.create(team=team, name="b")
    with capture_directives() as captured:
        bug = Bug.objects.create(board=board, title="c", severity=2)
    names = {x["name"] for x in captured.for_audience(f"team-{team.pk}")}
    assert {"bugs", "cards", "board"} <= names
    with capture_directives() as captured:
        bug.title = "d"
        bug.save()
    assert {"op": "refresh_item", "name": "card", "id": bug.pk} in captured.bare


def test_deleting_an_m2m_target_tells_the_rows_it_was_linked_to(todo: Todo) -> None:
    tag = Tag.objects.create(name="urgent")
    todo.tags.add(tag)
    with capture_directives() as captured:
        tag.delete()
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} in captured.for_audience(
        f"user-{todo.owner_id}"
    )


def test_a_change_through_the_parent_class_runs_the_childs_rules(alice: Any) -> None:
    team = Team.objects.create(name="a")
    board = Board.objects.create(team=team, name="b")
    bug = Bug.objects.create(board=board, title="c", severity=2)
    card = Card.objects.get(pk=bug.pk)
    with capture_directives() as captured:
        card.assignee = alice
        card.save()
    assert {"op": "refresh_item", "name": "bug", "id": bug.pk} in captured.for_audience(
        f"user-{alice.pk}"
    )
    with capture_directives() as captured:
        Card.objects.filter(pk=bug.pk).update(title="d")
    assert {"op": "refresh_item", "name": "bug", "id": bug.pk} in captured.bare


def test_a_relation_declared_on_the_parent_tells_the_child_from_both_sides(db: Any) -> None:
    team = Team.objects.create(name="a")
    board = Board.objects.create(team=team, name="b")
    bug = Bug.objects.create(board=board, title="c", severity=2)
    label = Label.objects.create(name="l")
    bug_item = {"op": "refresh_item", "name": "bug", "id": bug.pk}
    for change in (
        lambda: label.cards.add(bug.pk),
        lambda: Card.objects.get(pk=bug.pk).labels.remove(label),
        lambda: bug.labels.add(label),
    ):
        with capture_directives() as captured:
            change()
        assert bug_item in captured.for_audience(f"team-{team.pk}")
    with capture_directives() as captured:
        label.delete()
    assert bug_item in captured.for_audience(f"team-{team.pk}")


# Rows below a change further up a related path.

WHOLE_TODOS = {"op": "refresh_collection", "name": "todos"}


def moved_todos(alice: Any, project: Project, n: int) -> list[Todo]:
    return Todo.objects.bulk_create(Todo(title="t", owner=alice, project=project) for _ in range(n))


@override_settings(VERITY={"PUSH": False})
def test_a_project_changing_owner_tells_its_todos_old_and_new_owner(
    alice: Any, bob: Any, project: Project
) -> None:
    """A card on a board moved to another team: none of the todo's own
    fields changed, yet its old owner's lists lost it and the new one's
    gained it, as if the todo itself had moved."""
    with todo_rules("project__owner"):
        [todo] = moved_todos(alice, project, 1)
        project = Project.objects.get(pk=project.pk)
        with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
            project.owner = bob
            project.save()
    project_item = {"op": "refresh_item", "name": "project", "id": project.pk}
    for audience in (f"user-{alice.pk}", f"user-{bob.pk}"):
        assert WHOLE_TODOS in captured.for_audience(audience)
        assert project_item in captured.for_audience(audience)
    # Neither audience saw a change of the todo's own data.
    assert {"op": "refresh_item", "name": "todo", "id": todo.pk} not in captured.bare
    # The UPDATE, and one query for the todos on the project.
    assert queries_of(queries, Todo, Project) == 2


def test_a_project_saved_without_a_new_owner_reads_no_todos(alice: Any, project: Project) -> None:
    with todo_rules("project__owner"):
        moved_todos(alice, project, 2)
        project = Project.objects.get(pk=project.pk)
        with CaptureQueriesContext(connection) as queries:
            project.name = "renamed"
            project.save()
            Project.objects.filter(pk=project.pk).update(name="again")
    assert queries_of(queries, Todo) == 0


@pytest.mark.parametrize("rows", [3, 8])
@override_settings(VERITY={"COLLAPSE_THRESHOLD": 5, "PUSH": False})
def test_update_and_bulk_update_of_projects_tell_their_todos_owners(
    alice: Any, bob: Any, project: Project, rows: int
) -> None:
    """Past COLLAPSE_THRESHOLD rows below, the whole collections are told."""
    with todo_rules("project__owner"):
        moved_todos(alice, project, rows)
        with capture_directives() as captured, CaptureQueriesContext(connection) as queries:
            Project.objects.filter(pk=project.pk).update(owner=bob)
        for audience in (f"user-{alice.pk}", f"user-{bob.pk}"):
            assert WHOLE_TODOS in captured.for_audience(audience)
        # The projects' own rules' read, their owners before, the UPDATE, and
        # the todos below (at most COLLAPSE_THRESHOLD + 1 of them).
        assert queries_of(queries, Todo, Project) == 4
        loaded = list(Project.objects.filter(pk=project.pk))
        for each in loaded:
            each.owner = alice
        with capture_directives() as captured:
            Project.objects.bulk_update(loaded, ["owner"])
        for audience in (f"user-{alice.pk}", f"user-{bob.pk}"):
            assert WHOLE_TODOS in captured.for_audience(audience)


def test_deleting_a_boards_lead_tells_the_cards_on_it(alice: Any) -> None:
    """SET_NULL of a key further up the path (Board.lead) moves the cards."""
    team = Team.objects.create(name="a")
    board = Board.objects.create(team=team, name="b", lead=alice)
    card = Card.objects.create(board=board, title="c")
    lead = f"user-{alice.pk}"
    with capture_directives() as captured:
        alice.delete()
    told = captured.for_audience(lead)
    # The whole list (which covers its params variants) and the card's board.
    assert {"op": "refresh_collection", "name": "cards"} in told
    assert {"op": "refresh_item", "name": "board", "id": board.pk} in told
    # The team saw the card before and after: nothing of it changed for them.
    assert {"op": "refresh_item", "name": "card", "id": card.pk} not in captured.for_audience(
        f"team-{team.pk}"
    )


def test_two_hops_up_tell_the_rows_two_below(alice: Any) -> None:
    """Comment's "card__board__team": a board's move tells its cards' comments."""
    here, there = Team.objects.create(name="a"), Team.objects.create(name="b")
    board = Board.objects.create(team=here, name="b")
    comment = Comment.objects.create(
        card=Card.objects.create(board=board, title="c"), author=alice, body="x"
    )
    with capture_directives() as captured:
        Board.objects.filter(pk=board.pk).update(team=there)
    listed = {"op": "refresh_collection", "name": "comments", "params": {"card": comment.card_id}}
    assert listed in captured.for_audience(f"team-{here.pk}")
    assert listed in captured.for_audience(f"team-{there.pk}")
    # The author read it before and after.
    assert listed not in captured.for_audience(f"user-{alice.pk}")


@override_settings(VERITY={"PUSH": False})
def test_a_model_with_no_rules_of_its_own_still_tells_the_rows_below(
    alice: Any, bob: Any, project: Project
) -> None:
    """What decides is the path, not whether the model further up has rules."""
    original = registry.declaration(Project)
    assert original is not None
    verity_django.unregister(Project)
    try:
        with todo_rules("project__owner"):
            moved_todos(alice, project, 1)
            project = Project.objects.get(pk=project.pk)
            assert registry.get(Project) is None
            with capture_directives() as captured:
                project.owner = bob
                project.save()
                Project.objects.filter(pk=project.pk).update(owner=alice)
    finally:
        verity_django.register(Project, directives=original.directives, audience=original.audience)
    assert WHOLE_TODOS in captured.for_audience(f"user-{alice.pk}")
    assert WHOLE_TODOS in captured.for_audience(f"user-{bob.pk}")
