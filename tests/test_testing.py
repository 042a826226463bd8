"""The helpers users import in their own tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.testapp.models import Todo
from tests.waiting import wait_for
from verity_django.testing import (
    CapturedDirectives,
    capture_directives,
    release_database_connections,
    strip_metadata,
)


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


def _other_sessions() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return int(cursor.fetchone()[0])


@pytest.mark.postgresql
@pytest.mark.postgresql_only
@pytest.mark.django_db(transaction=True)
def test_background_threads_let_go_of_the_test_database() -> None:
    import threading

    from django.db import connections
    from django.test import override_settings

    import verity_django
    from verity_django import directives as d
    from verity_django import positions, publishing, readers
    from verity_django.conf import conf

    # Every reader thread, the publisher thread and the positions writer
    # open a connection of their own, as streams and publishing outside a
    # test transaction make them do.
    barrier = threading.Barrier(readers.THREADS, timeout=5)

    def connect() -> None:
        connections["default"].ensure_connection()
        barrier.wait()

    for task in [readers.readers().submit(connect) for _ in range(readers.THREADS)]:
        task.result(timeout=5)
    published = publishing.counters.published
    with override_settings(VERITY={"PUBLISH_INLINE": False}):
        assert not conf.PUBLISH_INLINE
        verity_django.emit(d.refresh_collection("todos"))
        wait_for(lambda: publishing.counters.published > published, timeout=5)
    positions.writer.submit("verity-test", "", "connection-1", False, 60.0)
    assert positions.writer.flush(timeout=5)
    opened = _other_sessions()
    assert opened >= readers.THREADS + 2

    assert release_database_connections(timeout=5)
    wait_for(lambda: _other_sessions() == 0, timeout=5)
