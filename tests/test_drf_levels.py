"""Levels declared once: ``?level=`` reads, the conversion graph, and the
``result`` payloads built from the same serializers.

Oracles: the maximal level and each level's satisfied set match plain
reachability over generated conversion graphs; every ``result`` carries, for
each level it names, exactly what ``GET ?level=`` answers right after the
edit, so a client that applies it holds what a refetch would have fetched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from hypothesis import given
from hypothesis import strategies as st
from rest_framework.test import APIClient

import verity_django
from testproject.todos.models import Todo
from testproject.todos.serializers import TODO_LEVELS, TodoDefaultSerializer
from tests.conftest import DIRECTIVE_HEADERS
from verity_django import registry
from verity_django.contrib.rest_framework import levels as levels_module
from verity_django.contrib.rest_framework.levels import (
    EVERY_LEVEL,
    MAXIMAL,
    Levels,
    check_level_results,
    level_result,
)
from verity_django.results import LevelResult, LevelsResult
from verity_django.rules import RefreshItem

pytestmark = pytest.mark.demo

LEVEL_NAMES = [None, "simplified", "expanded"]


@contextmanager
def todo_result(result: Any, audience: Any = "owner") -> Iterator[None]:
    """Todo's own RefreshItem with ``result``, for one test."""
    original = registry.declaration(Todo)
    directives = [
        RefreshItem("todo", result=result)
        if isinstance(rule, RefreshItem) and rule.name == "todo"
        else rule
        for rule in original.directives
    ]
    verity_django.register(
        Todo, directives=directives, audience=audience, relations=original.relations
    )
    try:
        yield
    finally:
        verity_django.register(
            Todo,
            directives=original.directives,
            audience=original.audience,
            relations=original.relations,
        )


def fetched(api: APIClient, todo: Todo, level: str | None) -> Any:
    query = {} if level is None else {"level": level}
    response = api.get(f"/api/todos/{todo.pk}/", query)
    assert response.status_code == 200
    return response.json()


def patch_item_directive(api: APIClient, todo: Todo, body: dict[str, Any]) -> dict[str, Any]:
    response = api.patch(f"/api/todos/{todo.pk}/", body, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code == 200
    [item] = [
        x
        for x in response.json()["directives"]
        if x["op"] == "refresh_item" and x["name"] == "todo"
    ]
    return item  # type: ignore[no-any-return]


# ----------------------------------------------------------------- declaration


def reachable(start: Any, edges: dict[Any, set[Any]]) -> set[Any]:
    """Oracle: breadth-first reachability, written independently of Levels."""
    frontier, seen = [start], {start}
    while frontier:
        frontier = [n for f in frontier for n in edges.get(f, ()) if n not in seen]
        seen.update(frontier)
    return seen


graphs = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.tuples(
        st.just([None, *(f"l{i}" for i in range(1, n))]),
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=12),
    )
)


@given(graphs)
def test_satisfies_and_maximal_match_reachability(graph: tuple[list[Any], list[Any]]) -> None:
    names, pairs = graph
    edges: dict[Any, set[Any]] = {}
    for a, b in pairs:
        edges.setdefault(names[a], set()).add(names[b])
    levels = Levels({n: TodoDefaultSerializer for n in names}, converts=edges)
    for name in names:
        assert levels.satisfies(name) == reachable(name, edges)
    widest = [n for n in names if reachable(n, edges) == set(names)]
    assert levels.maximal == (widest[0] if len(widest) == 1 else None)


def test_the_oracle_catches_a_conversion_that_is_not_transitive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        levels_module, "_closure", lambda start, edges: frozenset({start, *edges[start]})
    )
    edges = {"expanded": {"simplified"}, "simplified": {None}}
    levels = Levels({n: TodoDefaultSerializer for n in LEVEL_NAMES}, converts=edges)
    assert levels.satisfies("expanded") != reachable("expanded", edges)


def test_demo_levels() -> None:
    assert TODO_LEVELS.names == (None, "simplified", "expanded")
    assert TODO_LEVELS.maximal == "expanded"
    assert TODO_LEVELS.satisfies("simplified") == {"simplified", None}


@pytest.mark.parametrize(
    ("serializers", "converts", "message"),
    [
        ({"x": TodoDefaultSerializer}, {}, "default level"),
        ({None: TodoDefaultSerializer, "null": TodoDefaultSerializer}, {}, "not a level name"),
        ({None: TodoDefaultSerializer, "": TodoDefaultSerializer}, {}, "not a level name"),
        ({None: TodoDefaultSerializer}, {None: ["big"]}, "'big', which is not a level"),
    ],
)
def test_bad_declarations(serializers: Any, converts: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message):
        Levels(serializers, converts=converts)


def test_maximal_needs_one_widest_level() -> None:
    levels = Levels({None: TodoDefaultSerializer, "a": TodoDefaultSerializer})
    assert levels.maximal is None
    with pytest.raises(ImproperlyConfigured, match="no maximal level"):
        level_result(levels, MAXIMAL)
    with pytest.raises(ImproperlyConfigured, match="no level 'b'"):
        level_result(levels, "b")


def test_a_bad_dotted_path_is_a_system_check_error() -> None:
    builder = level_result("testproject.todos.serializers.NOPE")
    errors = [e for e in check_level_results() if e.obj is builder]
    assert [e.id for e in errors] == ["verity_django.E201"]
    assert "cannot import" in errors[0].msg
    assert "verity_django.E201" not in {e.id for e in check_level_results() if e.obj is not builder}


# ---------------------------------------------------------------------- reads


def test_retrieve_at_each_level(api: APIClient, todo: Todo) -> None:
    assert set(fetched(api, todo, None)) == {"id", "title", "status"}
    assert set(fetched(api, todo, "simplified")) == {"id", "title", "status", "project"}
    assert set(fetched(api, todo, "expanded")) == {
        "id",
        "title",
        "status",
        "project",
        "description",
        "created_at",
        "updated_at",
    }


def test_default_level_spellings_and_views_without_levels(api: APIClient, todo: Todo) -> None:
    for spelling in ("", "null", "default"):
        assert fetched(api, todo, spelling) == fetched(api, todo, None)
    response = api.get(f"/api/projects/{todo.project_id}/", {"level": "expanded"})
    assert response.status_code == 400
    assert response.json() == {"level": ["This endpoint has no levels."]}
    assert api.get(f"/api/projects/{todo.project_id}/").status_code == 200


def test_unknown_level_is_a_400_listing_the_valid_ones(api: APIClient, todo: Todo) -> None:
    response = api.get(f"/api/todos/{todo.pk}/", {"level": "full"})
    assert response.status_code == 400
    assert response.json() == {
        "level": [
            "Unknown level 'full'. Use one of: simplified, expanded, or no level for the default."
        ]
    }


# --------------------------------------------------------------------- results


@pytest.mark.parametrize("pick", [MAXIMAL, EVERY_LEVEL, *LEVEL_NAMES])
def test_result_holds_what_a_refetch_would_fetch(api: APIClient, todo: Todo, pick: Any) -> None:
    with todo_result(TODO_LEVELS.result(pick)):
        item = patch_item_directive(api, todo, {"status": "done", "description": "now"})
    result = item["result"]
    if pick is EVERY_LEVEL:
        given_levels = {None if k == "null" else k: v for k, v in result["levels"].items()}
        assert set(given_levels) == set(LEVEL_NAMES)
    else:
        level = "expanded" if pick is MAXIMAL else pick
        assert ("level" in result) == (level is not None)
        given_levels = {result.get("level"): {"data": result["data"], "ts": result["ts"]}}
    for level, entry in given_levels.items():
        assert entry["data"] == fetched(api, todo, level)
        assert isinstance(entry["ts"], int)
    covered = set().union(*(TODO_LEVELS.satisfies(level) for level in given_levels))
    if pick in (MAXIMAL, EVERY_LEVEL):
        assert covered == set(LEVEL_NAMES)  # nothing left for the client to refetch


def test_demo_rule_sends_the_maximal_level(api: APIClient, todo: Todo) -> None:
    from testproject.todos.models import TODO_RESULT

    with todo_result(TODO_RESULT):
        item = patch_item_directive(api, todo, {"title": "renamed"})
    assert item["result"]["level"] == "expanded"
    assert item["result"]["data"] == fetched(api, todo, "expanded")


def test_payload_shapes() -> None:
    assert LevelResult(None, {"a": 1}, ts=5).as_json() == {"data": {"a": 1}, "ts": 5}
    assert LevelResult("x", {}, ts=5).as_json() == {"level": "x", "data": {}, "ts": 5}
    assert LevelsResult({None: {"a": 1}, "x": {"a": 2}}, ts=7).as_json() == {
        "levels": {"null": {"data": {"a": 1}, "ts": 7}, "x": {"data": {"a": 2}, "ts": 7}}
    }


def test_plain_data_is_still_wrapped(api: APIClient, todo: Todo) -> None:
    with todo_result(lambda t: {"id": t.pk}):
        item = patch_item_directive(api, todo, {"title": "x"})
    assert set(item["result"]) == {"data", "ts"}
    with todo_result(lambda t: None):
        item = patch_item_directive(api, todo, {"title": "y"})
    assert "result" not in item


@pytest.mark.parametrize("pick", [MAXIMAL, EVERY_LEVEL])
def test_result_over_the_size_cap_is_dropped_and_logged(
    api: APIClient, todo: Todo, pick: Any, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"description": "x" * 600}
    with todo_result(TODO_LEVELS.result(pick)):
        size = len(json.dumps(patch_item_directive(api, todo, body)["result"]))
        with (
            override_settings(VERITY={"RESULT_MAX_BYTES": size // 2}),
            caplog.at_level(logging.WARNING, "verity_django"),
        ):
            item = patch_item_directive(api, todo, {"description": "y" * 600})
    assert "result" not in item
    assert "RESULT_MAX_BYTES" in caplog.text


# ------------------------------------------------------------------- audiences


def envelopes_by_channel() -> dict[str, list[dict[str, Any]]]:
    from django_eventstream.models import EventCounter

    from verity_django.storage import configured as storage

    out: dict[str, list[dict[str, Any]]] = {}
    for channel in EventCounter.objects.values_list("name", flat=True):
        out[channel] = [json.loads(e.data) for e in storage().get_events(channel, 0, 10_000)]
    return out


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("pick", [MAXIMAL, EVERY_LEVEL])
def test_no_level_result_to_an_audience_the_todo_left(alice: Any, bob: Any, pick: Any) -> None:
    todo = Todo.objects.get(pk=Todo.objects.create(title="hand-over", owner=bob).pk)
    with todo_result(TODO_LEVELS.result(pick)):
        todo.owner = alice
        todo.description = "alice-only-secret"
        todo.save()
    envelopes = envelopes_by_channel()
    bob_items = [
        x
        for e in envelopes[f"verity.user-{bob.pk}"]
        for x in e["directives"]
        if x.get("id") == todo.pk
    ]
    assert bob_items, "bob is told the item changed"
    assert all("result" not in x for x in bob_items)
    everywhere = {c for c, es in envelopes.items() if "alice-only-secret" in json.dumps(es)}
    assert everywhere == {f"verity.user-{alice.pk}"}
