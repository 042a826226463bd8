"""Transactions: what rolls back publishes nothing and consumes no seq.

In-process (pytest-django, real commits with ``transaction=True``), on the
demo's models: on SQLite in the first pass of ``scripts/test``, and on a real
PostgreSQL in its second (the tests marked ``postgresql``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt


class Boom(Exception):
    pass


def _rename(pk: int, tag: str) -> None:
    from testproject.todos.models import Project

    project = Project.objects.get(pk=pk)
    project.name = f"{tag} {pk}"
    project.save()


def _raise_in_atomic(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        _rename(a, "tx")
        raise Boom


@transaction.atomic
def _atomic_function(a: int, b: int, c: int) -> None:
    _rename(a, "tx")
    _rename(b, "tx")
    raise Boom


def _inner_ok_outer_fails(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        with transaction.atomic():
            _rename(a, "tx")
        _rename(b, "tx")
        raise Boom


def _savepoint_block_fails(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        _rename(a, "tx")
        with contextlib.suppress(Boom), transaction.atomic():
            _rename(b, "tx")
            raise Boom
        _rename(c, "tx")


def _three_levels_middle_kept(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        _rename(a, "tx")
        with transaction.atomic():
            _rename(b, "tx")
            with contextlib.suppress(Boom), transaction.atomic():
                _rename(c, "tx")
                raise Boom


def _set_rollback(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        _rename(a, "tx")
        transaction.set_rollback(True)


def _committed_then_raise(a: int, b: int, c: int) -> None:
    # Autocommit: the row is committed, so the change is real and must be told.
    _rename(a, "tx")
    raise Boom


@dataclass(frozen=True)
class Scenario:
    run: Callable[[int, int, int], None]
    raises: bool
    committed: tuple[int, ...]  # indexes into (a, b, c) whose rename commits


SCENARIOS: dict[str, Scenario] = {
    "raise-in-atomic": Scenario(_raise_in_atomic, True, ()),
    "atomic-function": Scenario(_atomic_function, True, ()),
    "inner-ok-outer-fails": Scenario(_inner_ok_outer_fails, True, ()),
    "set-rollback": Scenario(_set_rollback, False, ()),
    "savepoint-block-fails": Scenario(_savepoint_block_fails, False, (0, 2)),
    "three-levels-middle-kept": Scenario(_three_levels_middle_kept, False, (0, 1)),
    "committed-then-raise": Scenario(_committed_then_raise, True, (0,)),
}


@csrf_exempt
def fault_view(request: HttpRequest, kind: str) -> HttpResponse:
    a, b, c = (int(request.GET[k]) for k in "abc")
    SCENARIOS[kind].run(a, b, c)
    return JsonResponse({"ok": True})


urlpatterns = [path("fault/<str:kind>/", fault_view)]


def _global_envelopes() -> list[dict[str, Any]]:
    from verity_django.audiences import channel_for
    from verity_django.storage import configured

    return [json.loads(e.data) for e in configured().get_events(channel_for("global"), 0, 10_000)]


@pytest.fixture
def three_projects(django_user_model: Any) -> tuple[int, int, int]:
    from testproject.todos.models import Project
    from verity_django import disabled

    owner = django_user_model.objects.create_user("tx-owner", password="x")
    with disabled():
        made = [Project.objects.create(name=f"p{i}", owner=owner) for i in range(3)]
    return made[0].pk, made[1].pk, made[2].pk


def _check_outcome(
    scenario: Scenario, ids: tuple[int, int, int], before: int
) -> list[dict[str, Any]]:
    """Exactly one envelope naming the committed renames, or none; returns it."""
    from testproject.todos.models import Project

    names = dict(Project.objects.filter(pk__in=ids).values_list("pk", "name"))
    committed = {ids[i] for i in scenario.committed}
    assert {pk for pk, name in names.items() if name.startswith("tx ")} == committed
    envelopes = _global_envelopes()
    new = envelopes[before:]
    if not committed:
        assert new == []
        return []
    [envelope] = new
    assert envelope["seq"] == before + 1
    items = {x["id"] for x in envelope["directives"] if x["op"] == "refresh_item"}
    assert items == committed
    return list(envelope["directives"])


@pytest.mark.postgresql
def test_tx_database_is_the_expected_one() -> None:
    from django.db import connection

    assert connection.vendor == os.environ.get("VERITY_TEST_EXPECT_VENDOR", connection.vendor)


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_tx_outside_requests(name: str, three_projects: tuple[int, int, int]) -> None:
    scenario = SCENARIOS[name]
    before = len(_global_envelopes())
    if scenario.raises:
        with pytest.raises(Boom):
            scenario.run(*three_projects)
    else:
        scenario.run(*three_projects)
    _check_outcome(scenario, three_projects, before)


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
@pytest.mark.urls(__name__)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_tx_in_views(name: str, three_projects: tuple[int, int, int]) -> None:
    from django.test import Client

    scenario = SCENARIOS[name]
    before = len(_global_envelopes())
    a, b, c = three_projects
    response = Client(raise_request_exception=False).post(
        f"/fault/{name}/?a={a}&b={b}&c={c}",
        HTTP_X_VERITY_DIRECTIVE_REQUEST="send me directives",
        HTTP_X_CLIENT_ID="tx-tab",
    )
    assert response.status_code == (500 if scenario.raises else 200)
    pushed = _check_outcome(scenario, three_projects, before)
    if not scenario.raises:
        # The pull copy is the push copy: same directives, same keys; only
        # the pull copy names its client.
        pulled = response.json()["directives"]
        assert all(x.get("source") == "tx-tab" for x in pulled)
        assert [{k: v for k, v in x.items() if k != "source"} for x in pulled] == pushed


@pytest.mark.postgresql
@pytest.mark.django_db(transaction=True)
def test_tx_failures_consume_no_seq(three_projects: tuple[int, int, int]) -> None:
    """Every scenario in a row; the seqs of what committed are 1, 2, 3... with no hole."""
    from testproject.todos.models import Project
    from verity_django import disabled

    committed_runs = 0
    for scenario in SCENARIOS.values():
        with contextlib.suppress(Boom):
            scenario.run(*three_projects)
        committed_runs += bool(scenario.committed)
        with disabled():
            Project.objects.filter(pk__in=three_projects).update(name="reset")
    _rename(three_projects[0], "last")
    seqs = [e["seq"] for e in _global_envelopes()]
    assert seqs == list(range(1, committed_runs + 2))


def _manual_savepoint_rollback(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        _rename(a, "tx")
        sid = transaction.savepoint()
        _rename(b, "tx")
        transaction.savepoint_rollback(sid)
        _rename(c, "tx")


def _manual_savepoint_rollback_only(a: int, b: int, c: int) -> None:
    with transaction.atomic():
        sid = transaction.savepoint()
        _rename(b, "tx")
        transaction.savepoint_rollback(sid)


MANUAL_SAVEPOINTS: dict[str, Scenario] = {
    "mixed": Scenario(_manual_savepoint_rollback, False, (0, 2)),
    "only": Scenario(_manual_savepoint_rollback_only, False, ()),
}


# Not marked postgresql: this is about Django's bookkeeping, not the database.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("name", list(MANUAL_SAVEPOINTS))
@pytest.mark.xfail(
    reason="known limit: Django ties on_commit callbacks to atomic() savepoints only, so a "
    "change undone with transaction.savepoint_rollback() is still published",
    strict=True,
)
def test_tx_manual_savepoint_rollback_is_forgotten(
    name: str, three_projects: tuple[int, int, int]
) -> None:
    """``transaction.savepoint()`` / ``savepoint_rollback()``, the manual API.

    Django tags on_commit callbacks only with the savepoints of atomic()
    blocks, so callbacks registered after a manual savepoint survive its
    rollback, and verity publishes the rolled-back change (with ``only``: an
    envelope, and a seq, for a transaction that changed nothing).
    """
    scenario = MANUAL_SAVEPOINTS[name]
    before = len(_global_envelopes())
    scenario.run(*three_projects)
    _check_outcome(scenario, three_projects, before)
