"""Collections derived from the rules: ``{ids, count}`` filtered by exactly the
params the model's ``RefreshCollection`` rules name, bulk fetch and its cap.

The main oracle: after any edit, every cached collection whose ids changed is
one that a directive of the edit makes the client refetch (by the client's
own matching rules for ``exact`` and ``contains``). Collections and
directives are derived from the same rules, so they cannot drift apart.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import override_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rest_framework import viewsets
from rest_framework.test import APIClient, APIRequestFactory, force_authenticate

from testproject.todos.models import Project, Todo
from tests.conftest import DIRECTIVE_HEADERS
from verity_django.contrib.rest_framework import filters as rule_filters
from verity_django.contrib.rest_framework.filters import ModelFieldParamsFilter
from verity_django.contrib.rest_framework.mixins import CollectionMixin

pytestmark = pytest.mark.demo

DB_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
STATUSES = ["active", "done"]


def ids_of(api: APIClient, query: dict[str, Any]) -> list[Any]:
    response = api.get("/api/todos/", query)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["count"] == len(body["ids"])
    return body["ids"]  # type: ignore[no-any-return]


def refetched_by(directives: list[dict[str, Any]], params: dict[str, Any]) -> bool:
    """Whether the client refetches its cached collection ``todos`` with ``params``."""
    for directive in directives:
        if directive["op"] != "refresh_collection" or directive["name"] != "todos":
            continue
        wanted = directive.get("params") or {}
        if not wanted:
            return True
        if directive.get("params_mode", "exact") == "contains":
            if all(k in params and params[k] == v for k, v in wanted.items()):
                return True
        elif wanted == params:
            return True
    return False


def test_list_is_ids_and_count_in_stable_order(api: APIClient, alice: Any) -> None:
    made = [Todo.objects.create(title=f"t{i}", owner=alice) for i in range(5)]
    response = api.get("/api/todos/")
    assert response.json() == {"ids": [t.pk for t in made], "count": 5}
    # ids are JSON numbers, as refresh_item.id is for an integer primary key.
    assert all(isinstance(i, int) for i in json.loads(response.content)["ids"])


def test_exact_filters_from_rules(api: APIClient, alice: Any, project: Project) -> None:
    a = Todo.objects.create(title="a", owner=alice, project=project)
    b = Todo.objects.create(title="b", owner=alice, status="done", project=project)
    c = Todo.objects.create(title="c", owner=alice, status="done")
    assert ids_of(api, {"status": "done"}) == [b.pk, c.pk]
    assert ids_of(api, {"project": project.pk}) == [a.pk, b.pk]
    assert ids_of(api, {"status": "done", "project": project.pk}) == [b.pk]
    # A project that is gone is an empty collection, not an invalid value.
    assert ids_of(api, {"project": project.pk + 1000}) == []


def test_only_the_users_rows(api: APIClient, alice: Any, bob: Any) -> None:
    mine = Todo.objects.create(title="mine", owner=alice)
    Todo.objects.create(title="theirs", owner=bob)
    assert ids_of(api, {}) == [mine.pk]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"bogus": "1"}, "bogus"),
        ({"status": "done", "owner": "1"}, "owner"),
        ({"status": "nope"}, "status"),
        ({"project": "abc"}, "project"),
        ({"ids": "1,x"}, "ids"),
        ({"ids": "1", "status": "done"}, "status"),
    ],
)
def test_unknown_or_ill_typed_param_is_a_400_naming_it(
    api: APIClient, todo: Todo, query: dict[str, str], param: str
) -> None:
    response = api.get("/api/todos/", query)
    assert response.status_code == 400
    body = response.json()
    assert list(body) == [param], body
    assert all(isinstance(message, str) and message for message in body[param])


def test_unknown_param_lists_the_valid_ones(api: APIClient) -> None:
    body = api.get("/api/todos/", {"colour": "red"}).json()
    assert "level, project, status" in body["colour"][0]


def test_model_field_filter_without_django_filter(alice: Any, project: Project) -> None:
    """The fallback cleans each value with its model field, with the same answers."""

    class View(CollectionMixin, viewsets.GenericViewSet[Todo]):
        queryset = Todo.objects.all()
        filter_backends = [ModelFieldParamsFilter]

    done = Todo.objects.create(title="d", owner=alice, status="done", project=project)
    Todo.objects.create(title="a", owner=alice)
    view = View.as_view({"get": "list"})  # type: ignore[call-arg]
    factory = APIRequestFactory()

    def get(query: dict[str, Any]) -> Any:
        request = factory.get("/", query)
        force_authenticate(request, user=alice)
        response = view(request)
        response.render()
        return response.status_code, json.loads(response.content)

    assert get({"status": "done", "project": project.pk}) == (200, {"ids": [done.pk], "count": 1})
    status, body = get({"status": "nope"})
    assert status == 400 and list(body) == ["status"]
    status, body = get({"project": "abc"})
    assert status == 400 and list(body) == ["project"]
    status, body = get({"bogus": "1"})
    assert status == 400 and list(body) == ["bogus"]


def test_collection_name_must_be_a_rule() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="no RefreshCollection rule named 'nope'"):
        rule_filters.collection_params(Todo, "nope")
    assert rule_filters.collection_params(Todo, None) == {"status": "status", "project": "project"}


# ------------------------------------------------------------------ bulk fetch


def test_bulk_fetch_at_a_level_in_the_order_asked(api: APIClient, alice: Any, bob: Any) -> None:
    a = Todo.objects.create(title="a", owner=alice, description="da")
    b = Todo.objects.create(title="b", owner=alice)
    hidden = Todo.objects.create(title="bob's", owner=bob)
    response = api.get("/api/todos/", {"ids": f"{b.pk},{hidden.pk},{a.pk},{b.pk}"})
    assert response.status_code == 200
    assert response.json() == [
        {"id": b.pk, "title": "b", "status": "active"},
        {"id": a.pk, "title": "a", "status": "active"},
    ]
    expanded = api.get("/api/todos/", {"ids": str(a.pk), "level": "expanded"}).json()
    assert expanded[0]["description"] == "da"
    assert api.get("/api/todos/", {"ids": "1", "level": "huge"}).status_code == 400


def test_bulk_fetch_cap(api: APIClient, alice: Any) -> None:
    cap = CollectionMixin.bulk_max
    ids = ",".join(str(i) for i in range(1, cap + 1))
    assert api.get("/api/todos/", {"ids": ids}).status_code == 200
    response = api.get("/api/todos/", {"ids": f"{ids},{cap + 1}"})
    assert response.status_code == 400
    assert f"at most {cap}" in response.json()["ids"][0]


# ---------------------------------------------------------------------- oracle

edits = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(STATUSES),
        "project": st.sampled_from([0, 1, None]),
    },
)


@DB_SETTINGS
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(STATUSES), st.sampled_from([0, 1, None])), min_size=1, max_size=6
    ),
    which=st.integers(min_value=0),
    change=edits,
)
def test_every_collection_that_changes_is_refetched(
    alice: Any, rows: list[tuple[str, int | None]], which: int, change: dict[str, Any]
) -> None:
    Todo.objects.all().delete()
    Project.objects.all().delete()
    projects = [Project.objects.create(name=f"p{i}", owner=alice) for i in range(2)]
    todos = [
        Todo.objects.create(
            title="t", owner=alice, status=s, project=None if p is None else projects[p]
        )
        for s, p in rows
    ]
    api = APIClient()
    api.force_login(alice)
    cached = [{}]
    cached += [{"status": s} for s in STATUSES]
    cached += [{"project": p.pk} for p in projects]
    cached += [{"status": s, "project": p.pk} for s in STATUSES for p in projects]
    before = [ids_of(api, params) for params in cached]
    # Oracle for the filter itself: plain Python over the rows.
    for params, ids in zip(cached, before, strict=True):
        expected = [
            t.pk
            for t in todos
            if all((t.status if k == "status" else t.project_id) == v for k, v in params.items())
        ]
        assert ids == expected, params
    target = todos[which % len(todos)]
    body = {
        k: (None if v is None else projects[v].pk) if k == "project" else v
        for k, v in change.items()
    }
    response = api.patch(f"/api/todos/{target.pk}/", body, format="json", **DIRECTIVE_HEADERS)
    assert response.status_code == 200
    directives = response.json()["directives"]
    for params, old in zip(cached, before, strict=True):
        if ids_of(api, params) != old:
            assert refetched_by(directives, params), (params, directives)


@override_settings(VERITY={"ALWAYS_INCLUDE_IN_RESPONSES": True})
def test_the_oracle_catches_a_filter_that_drifts_from_the_rules(
    alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A collection filtered by a field no rule names changes unseen."""
    projects = [Project.objects.create(name=f"p{i}", owner=alice) for i in range(2)]
    todo = Todo.objects.create(title="t", owner=alice, project=projects[0])
    params = {"title": "t"}
    monkeypatch.setattr(
        rule_filters,
        "collection_params",
        lambda model, name: {"status": "status", "project": "project", "title": "title"},
    )
    rule_filters.rule_filterset.cache_clear()
    try:
        api = APIClient()
        api.force_login(alice)
        old = ids_of(api, params)
        response = api.patch(f"/api/todos/{todo.pk}/", {"title": "u"}, format="json")
        assert ids_of(api, params) != old
        assert not refetched_by(response.json()["directives"], params)
    finally:
        rule_filters.rule_filterset.cache_clear()


def test_users_see_their_own_collection(db: Any) -> None:
    carol = get_user_model().objects.create_user("carol")
    api = APIClient()
    api.force_login(carol)
    assert api.get("/api/todos/").json() == {"ids": [], "count": 0}
