"""The sequenced database storage (Redis storage runs in tests/live)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone
from django_eventstream.models import Event as EventRow
from django_eventstream.storage import EventDoesNotExist

from tests.database_faults import refuse_deletes
from verity_django.storage import DatabaseStorage

pytestmark = pytest.mark.postgresql


@pytest.fixture
def storage() -> DatabaseStorage:
    DatabaseStorage._last_trim = 0.0
    return DatabaseStorage()


def test_ids_are_contiguous_per_channel_and_written_into_the_data(
    db: Any, storage: DatabaseStorage
) -> None:
    for _ in range(3):
        storage.append_sequenced("verity.a", "message", '{"seq":', "}")
    storage.append_sequenced("verity.b", "message", '{"seq":', "}")
    assert [json.loads(e.data)["seq"] for e in storage.get_events("verity.a", 0)] == [1, 2, 3]
    assert [e.id for e in storage.get_events("verity.a", 1)] == [2, 3]
    assert storage.get_current_ids(["verity.a", "verity.b", "verity.c"]) == {
        "verity.a": 3,
        "verity.b": 1,
        "verity.c": 0,
    }


def test_current_ids_of_more_channels_than_one_statement_takes(
    db: Any, storage: DatabaseStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import connection

    names = [f"verity.c{i}" for i in range(5)]
    for count, name in enumerate(names):
        for _ in range(count):
            storage.append_sequenced(name, "message", "", "")
    monkeypatch.setattr(connection.features, "max_query_params", 2)
    assert storage.get_current_ids([*names, "verity.none"]) == {
        **{name: count for count, name in enumerate(names)},
        "verity.none": 0,
    }
    assert storage.get_current_ids([]) == {}


def test_plain_send_event_still_works(db: Any, storage: DatabaseStorage) -> None:
    event = storage.append_event("other", "message", {"hello": 1})
    assert event.id == 1
    assert storage.get_events("other", 0)[0].data == '{"hello": 1}'


def test_asking_beyond_the_current_id_resets(db: Any, storage: DatabaseStorage) -> None:
    storage.append_sequenced("verity.a", "message", "", "")
    with pytest.raises(EventDoesNotExist) as caught:
        storage.get_events("verity.a", 7)
    assert caught.value.current_id == 1


@override_settings(VERITY={"EVENT_RETENTION": 60})
def test_old_events_are_trimmed_and_a_stale_reader_is_told(
    db: Any, storage: DatabaseStorage
) -> None:
    storage.append_sequenced("verity.a", "message", "", "")
    EventRow.objects.update(created=timezone.now() - datetime.timedelta(hours=1))
    DatabaseStorage._last_trim = 0.0
    storage.append_sequenced("verity.a", "message", "", "")
    assert list(EventRow.objects.values_list("eid", flat=True)) == [2]
    with pytest.raises(EventDoesNotExist):
        storage.get_events("verity.a", 0)
    assert [e.id for e in storage.get_events("verity.a", 1)] == [2]


@override_settings(VERITY={"EVENT_RETENTION": 60})
def test_a_trim_that_fails_leaves_the_append_stored_once(
    db: Any, storage: DatabaseStorage, caplog: pytest.LogCaptureFixture
) -> None:
    # A failed trim once surfaced as a failed append (a reader held SQLite's
    # table lock), and a failed append is stored again by the publisher.
    storage.append_sequenced("verity.a", "message", "", "")
    EventRow.objects.update(created=timezone.now() - datetime.timedelta(hours=1))
    refuse_deletes(EventRow._meta.db_table)
    DatabaseStorage._last_trim = 0.0
    event = storage.append_sequenced("verity.a", "message", "", "")
    assert event.id == 2
    assert list(EventRow.objects.order_by("eid").values_list("eid", flat=True)) == [1, 2]
    assert "trimming stored envelopes failed" in caplog.text
