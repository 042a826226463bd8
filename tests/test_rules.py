"""The pure function from (rule, old values, new values, event) to directives."""

from __future__ import annotations

from typing import Any

from verity_django.rules import (
    MISSING,
    BoundCollection,
    BoundItem,
    RefreshCollection,
    RefreshItem,
    evaluate,
)


def bound(rule: Any, **attnames: str) -> Any:
    """The rule bound as a model would bind it, with attribute names given."""
    if isinstance(rule, RefreshItem):
        return BoundItem(rule, "tests.Model", attnames.get(rule.id, rule.id), (), rule.events())
    params = tuple((p, attnames.get(f, f)) for p, f in rule.param_fields().items())
    return BoundCollection(rule, "tests.Model", params, rule.events())


def run(rule: Any, event: str, old: Any, new: Any, **attnames: str) -> list[dict[str, Any]]:
    return [x.to_dict() for x, _ in evaluate(bound(rule, **attnames), event, old, new)]


def test_own_item_refreshes_on_update_only() -> None:
    rule = RefreshItem("todo")
    values = {"id": 7}
    assert run(rule, "create", None, values, pk="id") == []
    assert run(rule, "update", values, values, pk="id") == [
        {"op": "refresh_item", "name": "todo", "id": 7}
    ]
    assert run(rule, "delete", values, None, pk="id") == []


def test_delete_never_refreshes_the_deleted_item_even_if_asked() -> None:
    rule = RefreshItem("todo", on=["delete"])
    assert run(rule, "delete", {"id": 7}, None, pk="id") == []


def test_related_item_refreshes_old_and_new_ids_on_every_event() -> None:
    rule = RefreshItem("project", id="project_id")
    assert run(rule, "create", None, {"project_id": 1}) == [
        {"op": "refresh_item", "name": "project", "id": 1}
    ]
    moved = run(rule, "update", {"project_id": 1}, {"project_id": 2})
    assert [x["id"] for x in moved] == [1, 2]
    assert [x["id"] for x in run(rule, "update", {"project_id": 1}, {"project_id": 1})] == [1]
    assert [x["id"] for x in run(rule, "delete", {"project_id": 3}, None)] == [3]
    assert run(rule, "update", {"project_id": None}, {"project_id": None}) == []


def test_status_change_refreshes_both_old_and_new_collection() -> None:
    rule = RefreshCollection("todos", params=["status"], mode="contains")
    out = run(rule, "update", {"status": "active"}, {"status": "done"})
    assert out == [
        {
            "op": "refresh_collection",
            "name": "todos",
            "params": {"status": "active"},
            "params_mode": "contains",
        },
        {
            "op": "refresh_collection",
            "name": "todos",
            "params": {"status": "done"},
            "params_mode": "contains",
        },
    ]


def test_unchanged_params_give_one_directive() -> None:
    rule = RefreshCollection("todos", params={"state": "status"})
    out = run(rule, "update", {"status": "a"}, {"status": "a"})
    assert out == [{"op": "refresh_collection", "name": "todos", "params": {"state": "a"}}]


def test_unknown_old_value_falls_back_to_whole_collection() -> None:
    rule = RefreshCollection("todos", params=["status"])
    out = run(rule, "update", {"status": MISSING}, {"status": "done"})
    assert out == [{"op": "refresh_collection", "name": "todos"}]


def test_on_limits_events() -> None:
    rule = RefreshCollection("todos", on=["create"])
    assert run(rule, "update", {}, {}) == []
    assert run(rule, "create", None, {}) == [{"op": "refresh_collection", "name": "todos"}]


def test_result_and_level_and_key_builders() -> None:
    class Instance:
        pk = 5

    rule = RefreshItem(
        "todo",
        level="expanded",
        result=lambda obj: {"id": obj.pk},
        result_level="expanded",
        idempotency_key=lambda obj, event: f"todo-{obj.pk}-{event}",
    )
    [(directive, _)] = evaluate(
        bound(rule, pk="id"), "update", {"id": 5}, {"id": 5}, instance=Instance()
    )
    out = directive.to_dict()
    assert out["level"] == "expanded"
    assert out["idempotency_key"] == "todo-5-update"
    assert out["result"]["level"] == "expanded"
    assert out["result"]["data"] == {"id": 5}
    assert isinstance(out["result"]["ts"], int)


def test_choices_members_become_plain_json_values() -> None:
    from tests.testapp.models import Todo
    from verity_django.rules import to_json_value

    value = to_json_value(Todo.Status.DONE)
    assert type(value) is str
    assert value == "done"
    assert to_json_value(True) is True


def test_values_json_cannot_carry_are_refused_where_the_directive_is_made(caplog: Any) -> None:
    """Issue 11: NaN, infinity and lone surrogates never reach an envelope."""
    from verity_django import rules

    rule = RefreshCollection("readings", params=["value"])
    for value in (float("nan"), float("inf"), float("-inf"), "\ud800"):
        before = rules.counters.refused_values
        out = run(rule, "update", {"value": 1.5}, {"value": value})
        assert out == [{"op": "refresh_collection", "name": "readings"}]
        assert rules.counters.refused_values == before + 1
    assert "'value'" in caplog.text
    assert "nan" in caplog.text


def test_an_item_id_that_cannot_be_sent_refreshes_its_collections() -> None:
    rule = RefreshItem("sensor", id="sensor_id", collection="sensors")
    item = BoundItem(rule, "tests.Model", "sensor_id", ("sensors",), rule.events())
    out = [x.to_dict() for x, _ in evaluate(item, "create", None, {"sensor_id": float("inf")})]
    assert out == [{"op": "refresh_collection", "name": "sensors"}]
