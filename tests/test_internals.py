"""The private Django state verity_django.internals relies on still has the
shape it was written for; if Django changes it, this fails with the reason."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from verity_django import internals

pytestmark = pytest.mark.django_db(transaction=True)


def test_private_transaction_state_has_the_expected_shape() -> None:
    with transaction.atomic():
        transaction.on_commit(lambda: None)
        internals.verify(connection)


def test_a_changed_shape_fails_loudly() -> None:
    with transaction.atomic():
        transaction.on_commit(lambda: None)
        saved = list(connection.run_on_commit)
        connection.run_on_commit[:] = [(sids, func) for sids, func, _ in saved]
        try:
            with pytest.raises(internals.UnsupportedDjango, match="savepoint_ids, func, robust"):
                internals.verify(connection)
        finally:
            connection.run_on_commit[:] = saved


def test_an_unscoped_callback_survives_a_savepoint_rollback_and_runs_last() -> None:
    ran: list[str] = []
    with transaction.atomic():
        internals.register_unscoped(connection, lambda: ran.append("flush"))
        try:
            with transaction.atomic():
                transaction.on_commit(lambda: ran.append("dropped"))
                raise RuntimeError
        except RuntimeError:
            pass
        transaction.on_commit(lambda: ran.append("kept"))
        flush = connection.run_on_commit[0][1]
        internals.move_to_end(connection, flush)
        assert internals.is_registered(connection, flush)
        assert connection.run_on_commit[-1][1] is flush
    assert ran == ["kept", "flush"]


def test_commit_is_ahead_only_inside_a_block_that_can_commit() -> None:
    assert not internals.commit_is_ahead(connection)
    with transaction.atomic():
        assert internals.commit_is_ahead(connection)
