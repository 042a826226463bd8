from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verity_django import directives as d


def test_refresh_item_json_has_no_null_noise() -> None:
    assert d.refresh_item("todo", 42).to_dict() == {"op": "refresh_item", "name": "todo", "id": 42}


def test_refresh_collection_with_params_and_mode() -> None:
    directive = d.refresh_collection("todos", {"status": "active"}, params_mode="contains")
    assert directive.to_dict() == {
        "op": "refresh_collection",
        "name": "todos",
        "params": {"status": "active"},
        "params_mode": "contains",
    }


def test_exact_mode_is_the_default_and_not_written() -> None:
    assert "params_mode" not in d.refresh_collection("todos", {"a": 1}).to_dict()


def test_metadata_is_written_when_present() -> None:
    directive = d.refresh_item(
        "todo", "abc", level="expanded", idempotency_key="k", timestamp=5, source="c1", seq=3
    )
    assert directive.to_dict() == {
        "op": "refresh_item",
        "name": "todo",
        "id": "abc",
        "level": "expanded",
        "idempotency_key": "k",
        "timestamp": 5,
        "source": "c1",
        "seq": 3,
    }


def test_invalidate_and_force_reload() -> None:
    group = d.invalidate([d.refresh_item("todo", 1), d.refresh_collection("todos")])
    assert group.to_dict() == {
        "op": "invalidate",
        "targets": [
            {"op": "refresh_item", "name": "todo", "id": 1},
            {"op": "refresh_collection", "name": "todos"},
        ],
    }
    assert d.force_reload_page().to_dict() == {"op": "force_reload_page"}
    assert d.force_reload_page(hard=True).to_dict() == {"op": "force_reload_page", "hard": True}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: d.refresh_item("todo", None), "refresh_item: missing required field 'id'"),
        (lambda: d.refresh_item("", 1), "refresh_item: missing required field 'name'"),
        (lambda: d.refresh_item("todo", [1]), "'id' must be a string or a number, got list"),
        (lambda: d.refresh_item("todo", True), "'id' must be a string or a number, got bool"),
        (
            lambda: d.refresh_collection("todos", {"a": 1}, params_mode="fuzzy"),
            "'params_mode' must be 'exact' or 'contains', got 'fuzzy'",
        ),
        (lambda: d.refresh_collection("todos", {"a": object()}), "'params.a' must be JSON data"),
        (lambda: d.invalidate([]), "invalidate: missing required field 'targets'"),
        (
            lambda: d.force_reload_page(source="c1"),
            "force_reload_page: must not carry a 'source'",
        ),
        (lambda: d.refresh_item("todo", 1, seq=0), "'seq' must be a positive integer"),
        (lambda: d.refresh_item("todo", 1, timestamp=-1), "'timestamp' must be a non-negative"),
        (lambda: d.refresh_item("todo", 1, audience="user 1"), "invalid audience 'user 1'"),
        (lambda: d.refresh_item("todo", 1, result=float("nan")), "must be a finite number"),
    ],
)
def test_validation_names_op_field_and_value(build: Any, message: str) -> None:
    with pytest.raises(d.InvalidDirective, match=_escape(message)):
        build()


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_from_dict_round_trips() -> None:
    data = {
        "op": "invalidate",
        "targets": [{"op": "refresh_collection", "name": "todos", "params": {"status": "done"}}],
        "idempotency_key": "deploy-1",
    }
    assert d.Directive.from_dict(data).to_dict() == data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "a directive must be a JSON object, got list"),
        ({"op": "nope"}, "'op' must be one of"),
        ({"op": "refresh_item", "name": "todo", "id": 1, "extra": 1}, "unknown field(s) 'extra'"),
        ({"op": "invalidate", "targets": "x"}, "'targets' must be a list of directives, got str"),
        ({"op": "force_reload_page", "hard": "yes"}, "'hard' must be a boolean, got str"),
        ({"op": "refresh_collection"}, "missing required field 'name'"),
    ],
)
def test_from_dict_rejects_with_a_clear_message(data: Any, message: str) -> None:
    with pytest.raises(d.InvalidDirective, match=_escape(message)):
        d.Directive.from_dict(data)


def test_identity_ignores_metadata_and_result_but_not_id_type() -> None:
    a = d.refresh_item("todo", 1, idempotency_key="a", result={"data": {}})
    b = d.refresh_item("todo", 1, idempotency_key="b")
    assert a.identity == b.identity
    assert a.identity != d.refresh_item("todo", "1").identity
    assert (
        d.refresh_collection("t", {"a": 1, "b": 2}).identity
        == d.refresh_collection("t", {"b": 2, "a": 1}).identity
    )


def test_wire_json_is_compact() -> None:
    assert d.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'


def test_params_identity_tells_json_types_apart() -> None:
    ids = {d.refresh_collection("t", {"a": v}).identity for v in (1, True, 1.0, "1", None)}
    assert len(ids) == 5
    nested = d.refresh_collection("t", {"a": [1, {"b": 2}]})
    assert nested.identity == d.refresh_collection("t", {"a": [1, {"b": 2}]}).identity


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, -1.0, 2.5]),
    st.sampled_from(["", "a", "1", "true"]),
)
_params = st.none() | st.dictionaries(st.sampled_from(["a", "b"]), _scalars, max_size=2)
_collections = st.builds(
    d.refresh_collection,
    st.sampled_from(["x", "y"]),
    _params,
    params_mode=st.sampled_from(["exact", "contains"]),
    result=st.none() | st.dictionaries(st.sampled_from(["ids", "count"]), _scalars, max_size=2),
    idempotency_key=st.none() | st.sampled_from(["k1", "k2"]),
)
_items = st.builds(
    d.refresh_item,
    st.sampled_from(["x", "y"]),
    st.one_of(st.integers(1, 3), st.sampled_from(["1", "2"])),
    level=st.none() | st.sampled_from(["expanded"]),
)
_directives = st.one_of(_collections, _items)


@given(_directives, _directives)
def test_equal_directives_hash_equal(a: d.Directive, b: d.Directive) -> None:
    if a == b:
        assert hash(a) == hash(b)
        assert a.to_dict() == b.to_dict()


@given(_directives)
def test_a_directive_equals_its_own_round_trip(a: d.Directive) -> None:
    again = d.Directive.from_dict(a.to_dict())
    assert again == a
    assert hash(again) == hash(a)


@pytest.mark.parametrize(
    ("left", "right"),
    [({"a": 1}, {"a": True}), ({"a": 1}, {"a": 1.0}), ({"a": 0}, {"a": False})],
)
def test_json_distinct_params_are_distinct_directives(
    left: dict[str, Any], right: dict[str, Any]
) -> None:
    a, b = d.refresh_collection("x", left), d.refresh_collection("x", right)
    assert a != b
    assert len({a, b}) == 2


def test_json_distinct_results_are_distinct_directives() -> None:
    assert d.refresh_item("x", 1, result={"n": 1}) != d.refresh_item("x", 1, result={"n": True})


def test_trusted_builds_what_validation_builds() -> None:
    trusted = d.Directive.trusted(op="refresh_item", name="todo", id=3)
    assert trusted == d.refresh_item("todo", 3)
    assert trusted.to_dict() == {"op": "refresh_item", "name": "todo", "id": 3}
