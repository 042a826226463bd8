"""Appends on SQLite outside any transaction go straight to a DB-API
connection (``storage._append_on_sqlite``): the same rows, ids and
all-or-nothing commit as Django's path. To a database file, that connection
is the storage's own, kept between runs, its wait for the write lock bounded
by ``STORAGE_TIMEOUT``; to the in-memory test database, the caller's."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from django.db import IntegrityError, connection
from django.test import override_settings
from django.utils import timezone
from django_eventstream.models import Event as EventRow
from django_eventstream.models import EventCounter

from verity_django import storage as storage_module
from verity_django.storage import Append, DatabaseStorage


@pytest.fixture
def storage() -> DatabaseStorage:
    DatabaseStorage._last_trim = 0.0
    return DatabaseStorage()


@pytest.mark.django_db(transaction=True)
def test_a_run_of_appends_gets_contiguous_ids_and_counters(storage: DatabaseStorage) -> None:
    assert connection.vendor == "sqlite" and not connection.in_atomic_block
    stored = storage.append_many(
        "message",
        [
            Append("verity.global", '{"seq":', "}"),
            # Two envelopes of this audience were dropped: their seqs are skipped.
            Append("verity.global", '{"seq":', "}", skip=2),
            Append("verity.user-1", '{"seq":', "}"),
        ],
    )
    assert [(e.channel, e.id, e.data) for e in stored] == [  # type: ignore[union-attr]
        ("verity.global", 1, '{"seq":1}'),
        ("verity.global", 4, '{"seq":4}'),
        ("verity.user-1", 1, '{"seq":1}'),
    ]
    assert [json.loads(e.data)["seq"] for e in storage.get_events("verity.global", 0)] == [1, 4]
    assert dict(EventCounter.objects.values_list("name", "value")) == {
        "verity.global": 4,
        "verity.user-1": 1,
    }
    # Django's own view of the connection is untouched: autocommit, no transaction.
    assert connection.get_autocommit() and not connection.in_atomic_block
    assert not connection.connection.in_transaction


@pytest.mark.django_db(transaction=True)
def test_a_run_that_fails_midway_stores_nothing(storage: DatabaseStorage) -> None:
    storage.append_many("message", [Append("verity.global", '{"seq":', "}")])
    # A row already holds the id the second append of the run will get.
    EventRow.objects.create(channel="verity.global", type="message", data="x", eid=3)
    with pytest.raises(IntegrityError):
        storage.append_many(
            "message",
            [Append("verity.global", '{"seq":', "}"), Append("verity.global", '{"seq":', "}")],
        )
    assert EventCounter.objects.get(name="verity.global").value == 1
    assert list(
        EventRow.objects.filter(channel="verity.global").order_by("eid").values_list("eid", "data")
    ) == [(1, '{"seq":1}'), (3, "x")]
    assert not connection.connection.in_transaction
    # The connection is usable again, and the next run continues from the counter.
    [event] = storage.append_many("message", [Append("verity.global", '{"seq":', "}")])
    assert not isinstance(event, Exception) and event.id == 2
    assert EventRow.objects.filter(eid=2, created__lte=timezone.now()).exists()


def test_appends_inside_a_transaction_take_djangos_path(db: Any, storage: DatabaseStorage) -> None:
    """A TestCase's transaction holds the rows the append goes next to."""
    assert connection.in_atomic_block
    [event] = storage.append_many("message", [Append("verity.global", '{"seq":', "}")])
    assert not isinstance(event, Exception) and event.id == 1
    assert connection.in_atomic_block


@pytest.fixture
def file_database(tmp_path: Any, django_db_blocker: Any) -> Any:
    """A Django connection to a SQLite file holding django-eventstream's
    tables, the kind of database appends use connections of their own for
    (outside the test databases pytest-django manages)."""
    from django.db.backends.sqlite3.base import DatabaseWrapper

    wrapper = DatabaseWrapper(
        {**connection.settings_dict, "NAME": str(tmp_path / "appends.sqlite3")},
        alias="appends_file",
    )
    with django_db_blocker.unblock():
        with wrapper.schema_editor(atomic=False) as editor:
            editor.create_model(EventCounter)
            editor.create_model(EventRow)
        wrapper.close()
        yield wrapper
        storage_module._appenders.close_all()
        wrapper.close()


def _rows(wrapper: Any) -> list[tuple[str, int, str]]:
    with wrapper.cursor() as cursor:
        cursor.execute(
            f"SELECT channel, eid, data FROM {EventRow._meta.db_table} ORDER BY channel, eid"
        )
        return [tuple(row) for row in cursor.fetchall()]


def test_appends_to_a_file_use_a_connection_of_their_own_kept_between_runs(
    file_database: Any,
) -> None:
    first = storage_module._append_on_sqlite(
        file_database, "message", [Append("verity.global", '{"seq":', "}")]
    )
    # Django's own connection for the alias was never opened.
    assert file_database.connection is None
    [kept] = [raw for idle in storage_module._appenders.idle.values() for raw in idle]
    second = storage_module._append_on_sqlite(
        file_database,
        "message",
        [Append("verity.global", '{"seq":', "}", skip=1), Append("verity.team-1", "{", "}")],
    )
    assert [(e.channel, e.id) for e in first + second] == [  # type: ignore[union-attr]
        ("verity.global", 1),
        ("verity.global", 3),
        ("verity.team-1", 1),
    ]
    assert [raw for idle in storage_module._appenders.idle.values() for raw in idle] == [kept]
    assert not kept.in_transaction
    assert _rows(file_database) == [
        ("verity.global", 1, '{"seq":1}'),
        ("verity.global", 3, '{"seq":3}'),
        ("verity.team-1", 1, "{1}"),
    ]


def test_a_write_lock_held_elsewhere_fails_the_run_within_the_storage_timeout(
    file_database: Any,
) -> None:
    import sqlite3

    from django.db import OperationalError

    storage_module._append_on_sqlite(
        file_database, "message", [Append("verity.global", '{"seq":', "}")]
    )
    # Another process's writer, holding the lock until the append has given
    # up, or for 5 s at most: an append that waited for the connection's own
    # 20 s would then get the lock and succeed.
    locked, gave_up = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        other = sqlite3.connect(file_database.settings_dict["NAME"], isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        gave_up.wait(5)
        other.execute("ROLLBACK")
        other.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert locked.wait(10)
        with override_settings(VERITY={"STORAGE_TIMEOUT": 0.2}):
            with pytest.raises(OperationalError, match="locked"):
                storage_module._append_on_sqlite(
                    file_database, "message", [Append("verity.global", '{"seq":', "}")]
                )
    finally:
        gave_up.set()
        holder.join()
    # The failed connection was dropped; the next run opens another and goes on.
    [event] = storage_module._append_on_sqlite(
        file_database, "message", [Append("verity.global", '{"seq":', "}")]
    )
    assert not isinstance(event, Exception) and event.id == 2
    assert _rows(file_database) == [
        ("verity.global", 1, '{"seq":1}'),
        ("verity.global", 2, '{"seq":2}'),
    ]


def test_a_run_to_a_file_that_fails_midway_stores_nothing(file_database: Any) -> None:
    storage_module._append_on_sqlite(
        file_database, "message", [Append("verity.global", '{"seq":', "}")]
    )
    with file_database.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EventRow._meta.db_table} (channel, type, data, eid, created) "
            "VALUES ('verity.global', 'message', 'x', 3, '2026-01-01 00:00:00')"
        )
    file_database.close()
    with pytest.raises(IntegrityError):
        storage_module._append_on_sqlite(
            file_database,
            "message",
            [Append("verity.global", '{"seq":', "}"), Append("verity.global", '{"seq":', "}")],
        )
    assert _rows(file_database) == [("verity.global", 1, '{"seq":1}'), ("verity.global", 3, "x")]
    with file_database.cursor() as cursor:
        cursor.execute(f"SELECT value FROM {EventCounter._meta.db_table}")
        assert cursor.fetchall() == [(1,)]


def test_concurrent_appends_to_a_file_get_contiguous_ids_each_in_its_own_data(
    file_database: Any,
) -> None:
    """Threads appending at once, on connections of their own, as requests
    do: per channel the ids are 1..n with none twice, every row's data holds
    its own id, and each thread's envelopes got increasing ids."""
    threads, per_thread = 4, 60
    got: dict[int, list[tuple[str, int]]] = {}
    errors: list[BaseException] = []

    def append(number: int) -> None:
        mine: list[tuple[str, int]] = []
        try:
            for i in range(per_thread):
                channel = f"verity.c{i % 3}"
                run = [Append(channel, '{"seq":', "}")]
                if i % 10 == 0:
                    run.append(Append("verity.global", '{"seq":', "}"))
                for event in storage_module._append_on_sqlite(file_database, "message", run):
                    assert not isinstance(event, Exception)
                    mine.append((event.channel, int(event.id)))
        except BaseException as exc:
            errors.append(exc)
        got[number] = mine

    workers = [threading.Thread(target=append, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors
    rows = _rows(file_database)
    by_channel: dict[str, list[int]] = {}
    for channel, eid, data in rows:
        assert json.loads(data) == {"seq": eid}
        by_channel.setdefault(channel, []).append(eid)
    assert {c: len(ids) for c, ids in by_channel.items()} == {
        "verity.c0": threads * 20,
        "verity.c1": threads * 20,
        "verity.c2": threads * 20,
        "verity.global": threads * 6,
    }
    for ids in by_channel.values():
        assert ids == list(range(1, len(ids) + 1))
    for mine in got.values():
        for channel in by_channel:
            seqs = [seq for c, seq in mine if c == channel]
            assert seqs == sorted(seqs)
    with file_database.cursor() as cursor:
        cursor.execute(f"SELECT name, value FROM {EventCounter._meta.db_table}")
        assert dict(cursor.fetchall()) == {c: len(ids) for c, ids in by_channel.items()}
