"""Appends on PostgreSQL outside any transaction go as one simple query
through psycopg 3 (``storage._append_on_postgresql``): the same rows, ids and
all-or-nothing commit as Django's path, with the timeouts for the run only."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, IntegrityError, OperationalError, connection
from django.test import override_settings
from django_eventstream.models import Event as EventRow
from django_eventstream.models import EventCounter

from tests.database_faults import held_elsewhere
from verity_django import storage as storage_module
from verity_django.storage import Append, DatabaseStorage

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.postgresql_only,
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def storage() -> DatabaseStorage:
    assert connection.vendor == "postgresql" and not connection.in_atomic_block
    DatabaseStorage._last_trim = 0.0
    return DatabaseStorage()


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The queries psycopg sends for the appends, one entry per round trip."""
    sent: list[str] = []
    real = psycopg.ClientCursor.execute

    def execute(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        sent.append(str(query))
        return real(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.ClientCursor, "execute", execute)
    return sent


def _setting(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return str(cursor.fetchone()[0])


def test_a_run_of_appends_is_one_round_trip_with_contiguous_ids(
    storage: DatabaseStorage, round_trips: list[str]
) -> None:
    # Counter rows exist from an earlier envelope of each audience.
    storage.append_many(
        "message", [Append("verity.global", '{"seq":', "}"), Append("verity.user-1", "", "")]
    )
    round_trips.clear()
    stored = storage.append_many(
        "message",
        [
            Append("verity.global", '{"seq":', "}"),
            # Two envelopes of this audience were dropped: their seqs are skipped.
            Append("verity.global", '{"seq":', "}", skip=2),
            Append("verity.user-1", '{"seq":', ',"x":"it\'s; --"}'),
        ],
    )
    assert [(e.channel, e.id, e.data) for e in stored] == [  # type: ignore[union-attr]
        ("verity.global", 2, '{"seq":2}'),
        ("verity.global", 5, '{"seq":5}'),
        ("verity.user-1", 2, '{"seq":2,"x":"it\'s; --"}'),
    ]
    assert len(round_trips) == 1
    assert [json.loads(e.data)["seq"] for e in storage.get_events("verity.global", 0)] == [1, 2, 5]
    assert dict(EventCounter.objects.values_list("name", "value")) == {
        "verity.global": 5,
        "verity.user-1": 2,
    }
    assert connection.get_autocommit() and not connection.in_atomic_block


def test_an_audience_without_a_counter_row_yet_gets_one_and_its_seqs_in_order(
    storage: DatabaseStorage,
) -> None:
    storage.append_many("message", [Append("verity.global", "", "")])
    stored = storage.append_many(
        "message",
        [
            Append("verity.team-1", '{"seq":', "}"),
            Append("verity.global", '{"seq":', "}"),
            Append("verity.team-1", '{"seq":', "}", skip=1),
        ],
    )
    assert [(e.channel, e.id) for e in stored] == [  # type: ignore[union-attr]
        ("verity.team-1", 1),
        ("verity.global", 2),
        ("verity.team-1", 3),
    ]
    assert [e.data for e in storage.get_events("verity.team-1", 0)] == ['{"seq":1}', '{"seq":3}']


def test_after_a_new_audience_fails_to_store_its_later_envelopes_take_no_seq(
    storage: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage.append_many("message", [Append("verity.global", "", "")])

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise OperationalError("the counter row could not be created")

    monkeypatch.setattr(storage_module, "_allocate", refuse)
    stored = storage.append_many(
        "message",
        [
            Append("verity.team-1", "", ""),
            Append("verity.global", '{"seq":', "}"),
            Append("verity.team-1", "", ""),
        ],
    )
    assert isinstance(stored[0], OperationalError) and stored[2] is stored[0]
    assert not isinstance(stored[1], Exception) and stored[1].id == 2
    assert not EventRow.objects.filter(channel="verity.team-1").exists()


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
    [event] = storage.append_many("message", [Append("verity.global", '{"seq":', "}")])
    assert not isinstance(event, Exception) and event.id == 2


def test_the_timeouts_hold_for_the_run_only(storage: DatabaseStorage) -> None:
    before = (_setting("lock_timeout"), _setting("statement_timeout"))
    storage.append_many("message", [Append("verity.global", "", "")])
    with override_settings(VERITY={"STORAGE_TIMEOUT": 0.25}):
        storage.append_many("message", [Append("verity.global", "", "")])
    assert (_setting("lock_timeout"), _setting("statement_timeout")) == before


def test_a_counter_row_locked_elsewhere_fails_the_run_within_the_lock_timeout(
    storage: DatabaseStorage,
) -> None:
    storage.append_many("message", [Append("verity.global", "", "")])
    with held_elsewhere(
        "SELECT value FROM django_eventstream_eventcounter WHERE name = %s FOR UPDATE",
        ["verity.global"],
    ):
        with override_settings(VERITY={"STORAGE_TIMEOUT": 0.2}):
            with pytest.raises(DatabaseError) as caught:
                storage.append_many("message", [Append("verity.global", "", "")])
        # Whichever of the two equal timeouts fires first.
        timed_out = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)
        assert isinstance(caught.value.__cause__, timed_out)
    assert EventCounter.objects.get(name="verity.global").value == 1
    [event] = storage.append_many("message", [Append("verity.global", "", "")])
    assert not isinstance(event, Exception) and event.id == 2
