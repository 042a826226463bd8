"""On PostgreSQL, what verity_django's own threads run against the database
gives up within ``STORAGE_TIMEOUT`` when it meets a lock held elsewhere (a
migration, ``VACUUM FULL``), instead of waiting for as long as the lock lasts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import psycopg
import pytest
from django.db import DatabaseError
from django.test import override_settings

from tests.database_faults import held_elsewhere
from verity_django import positions, readers
from verity_django.storage import Append, DatabaseStorage

pytestmark = [
    pytest.mark.postgresql,
    pytest.mark.postgresql_only,
    pytest.mark.django_db(transaction=True),
]
TIMED_OUT = (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled)


def table_locked(table: str) -> AbstractContextManager[None]:
    return held_elsewhere(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")


def test_a_storage_read_that_meets_a_table_lock_fails_within_the_storage_timeout() -> None:
    """The reader threads serve every stream's storage reads: one held by a
    lock for as long as it lasted stalled them all."""
    storage = DatabaseStorage()
    storage.append_many("message", [Append("verity.global", "", "")])
    with table_locked("django_eventstream_eventcounter"):
        with override_settings(VERITY={"STORAGE_TIMEOUT": 0.2}):
            readers.release_reader_connections(5)  # the next read connects afresh
            reading = readers.readers().submit(
                readers.on_reader, storage.get_current_ids, ["verity.global"]
            )
            # Far longer than the timeout, far shorter than the lock is held.
            with pytest.raises(DatabaseError) as caught:
                reading.result(timeout=15)
        assert isinstance(caught.value.__cause__, TIMED_OUT)
    readers.release_reader_connections(5)
    assert storage.get_current_ids(["verity.global"]) == {"verity.global": 1}


def test_saving_replay_positions_that_meets_a_table_lock_fails_within_the_storage_timeout() -> None:
    """The positions writer's thread saves for every stream of the process."""
    store = positions._DatabasePositions()
    save = positions.Save("k", "record", "c", True, 60.0)
    with table_locked("verity_django_replayposition"):
        with override_settings(VERITY={"STORAGE_TIMEOUT": 0.2}):
            with pytest.raises(DatabaseError) as caught:
                # Not a reader thread, whose connections carry timeouts of their own.
                with ThreadPoolExecutor(1, thread_name_prefix="positions-test") as pool:
                    pool.submit(store.save_many, [save]).result(timeout=15)
        assert isinstance(caught.value.__cause__, TIMED_OUT)
    assert store.save_many([save]) == 1
