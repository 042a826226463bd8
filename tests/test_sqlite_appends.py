"""Appends on SQLite outside any transaction go straight to the DB-API
connection (``storage._append_on_sqlite``): the same rows, ids and
all-or-nothing commit as Django's path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import IntegrityError, connection
from django.utils import timezone
from django_eventstream.models import Event as EventRow
from django_eventstream.models import EventCounter

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
