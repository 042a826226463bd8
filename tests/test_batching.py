"""Batches: dedup, collapse, and delivery only after commit."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings

import verity_django
from tests.testapp.models import Project, Todo
from verity_django import directives as d
from verity_django.batching import Batch
from verity_django.rules import Routed
from verity_django.testing import capture_directives

transactional = pytest.mark.django_db(transaction=True)


def routed(directive: d.Directive, *audiences: str, collapse: tuple[str, ...] = ()) -> Routed:
    return Routed(directive, frozenset(audiences or ("global",)), collapse)


def test_identical_directives_are_sent_once_with_the_first_key() -> None:
    batch = Batch()
    batch.add([routed(d.refresh_item("todo", 1, idempotency_key="first"))])
    batch.add([routed(d.refresh_item("todo", 1, idempotency_key="second"))])
    [only] = batch.directives()
    assert only.idempotency_key == "first"


def test_newer_result_wins_under_the_first_key() -> None:
    batch = Batch()
    batch.add([routed(d.refresh_item("todo", 1, idempotency_key="k", result={"data": 1}))])
    batch.add([routed(d.refresh_item("todo", 1, idempotency_key="k2", result={"data": 2}))])
    [only] = batch.directives()
    assert (only.idempotency_key, only.result) == ("k", {"data": 2})


def test_whole_collection_subsumes_params_versions_per_audience() -> None:
    batch = Batch()
    batch.add(
        [
            routed(d.refresh_collection("todos", {"status": "a"}), "user-1", "user-2"),
            routed(d.refresh_collection("todos"), "user-1"),
            routed(d.refresh_collection("projects", {"x": 1}), "user-1"),
        ]
    )
    assert [x.to_dict(metadata=False) for x in batch.directives()] == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_collection", "name": "projects", "params": {"x": 1}},
    ]
    by_audience = {
        a: [x.to_dict(metadata=False) for x in xs] for a, xs in batch.by_audience().items()
    }
    assert by_audience["user-1"] == [
        {"op": "refresh_collection", "name": "todos"},
        {"op": "refresh_collection", "name": "projects", "params": {"x": 1}},
    ]
    assert by_audience["user-2"] == [
        {"op": "refresh_collection", "name": "todos", "params": {"status": "a"}}
    ]


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 3})
def test_many_items_of_one_name_collapse_into_their_collection() -> None:
    batch = Batch()
    batch.add(routed(d.refresh_item("todo", i), collapse=("todos",)) for i in range(4))
    batch.add([routed(d.refresh_item("project", 1))])
    assert [x.to_dict(metadata=False) for x in batch.directives()] == [
        {"op": "refresh_item", "name": "project", "id": 1},
        {"op": "refresh_collection", "name": "todos"},
    ]


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 3})
def test_pull_and_push_copies_of_a_collapsed_batch_share_their_keys() -> None:
    batch = Batch(source="client-1")
    batch.add(routed(d.refresh_item("todo", i), "user-1", collapse=("todos",)) for i in range(4))
    batch.add([routed(d.refresh_item("project", 1), "user-1")])
    pulled = {x.name: x.to_dict() for x in batch.directives()}
    batch.add([routed(d.refresh_item("todo", 9), "user-1", collapse=("todos",))])
    pushed = {x.name: x.to_dict() for x in batch.by_audience()["user-1"]}
    assert pulled == pushed
    assert sorted(pushed) == ["project", "todos"]
    assert all(x["source"] == "client-1" for x in pushed.values())


@override_settings(VERITY={"COLLAPSE_THRESHOLD": 3})
def test_items_at_the_threshold_stay_items() -> None:
    batch = Batch()
    batch.add(routed(d.refresh_item("todo", i), collapse=("todos",)) for i in range(3))
    assert [x.op for x in batch.directives()] == ["refresh_item"] * 3


def test_many_saves_of_one_row_make_one_refresh_item(todo: Todo) -> None:
    with capture_directives() as captured, verity_django.batch():
        for title in ("a", "b", "c"):
            todo.title = title
            todo.save()
    assert len(captured.batches) == 1
    assert captured.bare.count({"op": "refresh_item", "name": "todo", "id": todo.pk}) == 1


def test_every_directive_has_key_timestamp_and_batch_source(todo: Todo) -> None:
    with capture_directives() as captured, verity_django.batch(source="client-9"):
        todo.save()
    for item in captured.directives:
        assert len(item["idempotency_key"]) == 32
        assert item["timestamp"] > 1_700_000_000_000
        assert item["source"] == "client-9"


def test_disabled_block_emits_nothing(todo: Todo) -> None:
    with capture_directives() as captured, verity_django.disabled():
        todo.save()
        Todo.objects.filter(pk=todo.pk).update(title="x")
    assert captured == []


def test_fixture_loads_emit_nothing(todo: Todo, tmp_path: Any) -> None:
    from django.core.management import call_command

    fixture = tmp_path / "todos.json"
    with fixture.open("w") as out:
        call_command("dumpdata", "testapp.todo", stdout=out)
    with capture_directives() as captured:
        call_command("loaddata", str(fixture), verbosity=0)
    assert captured == []


def test_emit_hand_written_directive(db: Any) -> None:
    with capture_directives() as captured:
        verity_django.emit(d.refresh_collection("reports"), audience="team-a")
    assert captured.for_audience("team-a") == [{"op": "refresh_collection", "name": "reports"}]


def test_emit_rejects_bad_input(db: Any) -> None:
    from verity_django.audiences import InvalidAudience

    with pytest.raises(InvalidAudience):
        verity_django.emit(d.refresh_collection("r"), audience="team a")
    with pytest.raises(TypeError, match="emit\\(\\) takes a Directive"):
        verity_django.emit({"op": "refresh_collection"})  # type: ignore[arg-type]


@transactional
def test_rolled_back_transaction_delivers_nothing(alice: Any) -> None:
    with capture_directives() as captured:
        with pytest.raises(RuntimeError), transaction.atomic():
            Project.objects.create(name="doomed", owner=alice)
            raise RuntimeError
    assert captured == []


@transactional
def test_delivery_waits_for_the_outermost_commit_and_makes_one_batch(alice: Any) -> None:
    with capture_directives() as captured:
        with transaction.atomic():
            Project.objects.create(name="a", owner=alice)
            with transaction.atomic():
                Project.objects.create(name="b", owner=alice)
            assert captured.batches == []
        assert len(captured.batches) == 1
    assert captured == [{"op": "refresh_collection", "name": "projects"}]


@transactional
def test_savepoint_rollback_drops_only_what_it_added(alice: Any, project: Project) -> None:
    with capture_directives() as captured, transaction.atomic():
        try:
            with transaction.atomic():
                project.name = "renamed"
                project.save()
                raise RuntimeError
        except RuntimeError:
            pass
        Todo.objects.create(title="kept", owner=alice)
    assert captured == [{"op": "refresh_collection", "name": "todos"}]


@transactional
def test_first_change_in_a_rolled_back_savepoint_still_flushes_the_rest(alice: Any) -> None:
    with capture_directives() as captured, transaction.atomic():
        try:
            with transaction.atomic():
                Project.objects.create(name="gone", owner=alice)
                raise RuntimeError
        except RuntimeError:
            pass
        Todo.objects.create(title="kept", owner=alice)
    assert len(captured.batches) == 1
    assert captured == [{"op": "refresh_collection", "name": "todos"}]


@transactional
def test_autocommit_delivers_at_once(alice: Any) -> None:
    with capture_directives() as captured:
        Project.objects.create(name="a", owner=alice)
        assert len(captured.batches) == 1
        Project.objects.create(name="b", owner=alice)
        assert len(captured.batches) == 2


@transactional
def test_explicit_batch_spans_transactions(alice: Any) -> None:
    with capture_directives() as captured:
        with verity_django.batch():
            with transaction.atomic():
                Project.objects.create(name="a", owner=alice)
            Todo.objects.create(title="t", owner=alice)
            assert captured.batches == []
    assert len(captured.batches) == 1
    assert {x["name"] for x in captured} == {"projects", "todos"}


@transactional
def test_change_committed_after_its_batch_closed_is_still_delivered(alice: Any) -> None:
    with capture_directives() as captured, transaction.atomic():
        with verity_django.batch():
            Project.objects.create(name="a", owner=alice)
        assert captured.batches == []
    assert captured == [{"op": "refresh_collection", "name": "projects"}]


def test_disabled_works_as_a_decorator(todo: Todo) -> None:
    @verity_django.disabled()
    def migrate_data() -> None:
        todo.save()

    with capture_directives() as captured:
        migrate_data()
    assert captured == []


@transactional
def test_changes_at_one_savepoint_level_share_one_commit_callback(alice: Any) -> None:
    from django.db import connection

    with capture_directives() as captured, transaction.atomic():
        for i in range(50):
            Todo.objects.create(title=f"t{i}", owner=alice)
        # One callback marking the savepoint level for the saves' snapshots,
        # one for the directives of all 50 saves, then the batch's flush.
        assert len(connection.run_on_commit) == 3
    assert len(captured.batches) == 1
    assert captured == [{"op": "refresh_collection", "name": "todos"}]
