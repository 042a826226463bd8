from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

import verity_django
from tests.testapp.models import Board, Bug, Card, Comment, Project, Todo
from verity_django import registry
from verity_django.audience_specs import FieldAudience, PathAudience, prefix_for
from verity_django.registry import Declaration, bind
from verity_django.rules import RefreshCollection, RefreshItem
from verity_django.testing import capture_directives


def test_meta_rules_are_bound_to_attnames() -> None:
    bound = registry.get(Todo)
    assert bound is not None
    assert set(bound.tracked) == {"id", "status", "project_id", "owner_id"}
    assert bound.audience.specs == (FieldAudience("owner_id", "user-", Todo._meta.label),)
    assert registry.get(Project) is not None


def test_rules_add_nothing_to_migrations(db: Any) -> None:
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
    assert "directives" not in Todo._meta.original_attrs


def test_register_as_call_and_unregister(db: Any) -> None:
    User = get_user_model()
    registry.register(User, directives=[RefreshItem("user"), RefreshCollection("users")])
    try:
        user = User.objects.create_user("carol")
        with capture_directives() as captured:
            user.first_name = "Carol"
            user.save()
        assert captured == [
            {"op": "refresh_item", "name": "user", "id": user.pk},
            {"op": "refresh_collection", "name": "users"},
        ]
        assert captured.audiences == {"global"}
    finally:
        verity_django.unregister(User)
    with capture_directives() as captured:
        user.save()
    assert captured == []


def test_register_as_decorator(db: Any) -> None:
    User = get_user_model()
    decorated = verity_django.register(
        directives=[RefreshCollection("users")], audience=verity_django.Audience("staff")
    )(User)
    try:
        assert decorated is User
        with capture_directives() as captured:
            User.objects.create_user("dave")
        assert captured.for_audience("staff") == [{"op": "refresh_collection", "name": "users"}]
    finally:
        verity_django.unregister(User)


def test_audience_from_owner_field_follows_old_and_new_owner(todo: Todo, bob: Any) -> None:
    alice_audience = f"user-{todo.owner_id}"
    with capture_directives() as captured:
        todo.owner = bob
        todo.save()
    assert captured.audiences == {alice_audience, f"user-{bob.pk}"}


def test_callable_audience(db: Any) -> None:
    User = get_user_model()
    registry.register(
        User, directives=[RefreshCollection("users")], audience=lambda u: [f"team-{u.username}"]
    )
    try:
        with capture_directives() as captured:
            User.objects.create_user("erin")
        assert captured.audiences == {"team-erin"}
    finally:
        verity_django.unregister(User)


def errors_for(**declaration: Any) -> list[checks.CheckMessage]:
    return bind(Todo, Declaration(**declaration)).errors


@pytest.mark.parametrize(
    ("declaration", "error_id", "text"),
    [
        ({"directives": "todo"}, "verity_django.E101", "must be a list"),
        ({"directives": [object()]}, "verity_django.E102", "is not a directive rule"),
        ({"directives": [RefreshItem("")]}, "verity_django.E103", "missing required field 'name'"),
        ({"directives": [RefreshItem("todo", level="a\nb")]}, "verity_django.E103", "'level'"),
        ({"directives": [RefreshItem("todo", on=["save"])]}, "verity_django.E104", "'on' must"),
        ({"directives": [RefreshItem("todo", on="update")]}, "verity_django.E104", "'on' must"),
        (
            {"directives": [RefreshCollection("todos", params=["status"], mode="fuzzy")]},
            "verity_django.E105",
            "mode must be 'exact' or 'contains'",
        ),
        (
            {"directives": [RefreshCollection("todos", params="status")]},
            "verity_django.E106",
            "params",
        ),
        ({"directives": [RefreshItem("todo", result="x")]}, "verity_django.E107", "callable"),
        (
            {"directives": [RefreshCollection("todos", params=["colour"])]},
            "verity_django.E108",
            "'colour', which is not a concrete field",
        ),
        (
            {"directives": [RefreshItem("project", id="project__owner")]},
            "verity_django.E108",
            "not a concrete field",
        ),
        (
            {"directives": [RefreshCollection("todos", params=["tags"])]},
            "verity_django.E108",
            "tags",
        ),
        (
            {"directives": [], "audience": verity_django.Audience("not valid!")},
            "verity_django.E109",
            "directive_audience",
        ),
        ({"directives": [], "audience": 42}, "verity_django.E109", "must be a field name"),
        # A typo is not a constant audience (issue 10, finding 5).
        ({"directives": [], "audience": "writer"}, "verity_django.E111", "'writer' is neither"),
        (
            {"directives": [], "audience": "project__nope"},
            "verity_django.E112",
            "'nope' is not a concrete field",
        ),
        (
            {"directives": [], "audience": "title__owner"},
            "verity_django.E112",
            "'title' is not a foreign key",
        ),
        ({"directives": [], "relations": ["title"]}, "verity_django.E110", "many-to-many"),
    ],
)
def test_bad_rules_are_check_errors_on_the_model(
    declaration: dict[str, Any], error_id: str, text: str
) -> None:
    errors = errors_for(**declaration)
    assert [e.id for e in errors] == [error_id]
    assert text in errors[0].msg
    assert errors[0].obj is Todo


def test_rule_checks_run_with_the_system_checks() -> None:
    registry._declared[Todo], original = (
        Declaration([RefreshCollection("todos", params=["colour"])]),
        registry._declared[Todo],
    )
    try:
        found = [e.id for e in checks.run_checks()]
    finally:
        registry._declared[Todo] = original
    assert "verity_django.E108" in found


def test_valid_project_passes_all_checks() -> None:
    assert [e for e in checks.run_checks() if e.id.startswith("verity_django")] == []


def test_a_typo_in_the_audience_hints_at_the_explicit_constant() -> None:
    [error] = errors_for(directives=[], audience="writer")
    assert error.hint is not None
    assert "verity_django.Audience('writer')" in error.hint


def test_explicit_constants_global_and_related_paths_bind() -> None:
    assert errors_for(directives=[], audience=[verity_django.Audience("team-ops"), "global"]) == []
    bound = bind(Todo, Declaration([], audience="project__owner"))
    [path] = bound.audience.specs
    assert isinstance(path, PathAudience)
    assert (path.attname, path.prefix) == ("project_id", "user-")
    assert "project_id" in bound.tracked


def test_rules_with_errors_stop_the_app_from_loading() -> None:
    """uvicorn and gunicorn never run system checks (issue 10, finding 4)."""
    broken = Declaration([RefreshCollection("todos", params=["colour"])])
    original = registry._declared[Todo]
    registry._declared[Todo] = broken
    try:
        with pytest.raises(ImproperlyConfigured, match=r"verity_django\.E108 testapp\.Todo"):
            registry.load_meta_rules()
    finally:
        registry._declared[Todo] = original
    # The rules in force are untouched.
    assert registry.get(Todo) is not None
    assert "status" in [p for b in registry.get(Todo).rules for p, _ in getattr(b, "params", ())]


def test_registering_rules_with_errors_raises_and_keeps_the_old_rules(todo: Todo) -> None:
    before = registry.get(Todo)
    with pytest.raises(ImproperlyConfigured, match=r"verity_django\.E111"):
        verity_django.register(Todo, directives=[RefreshItem("todo")], audience="writer")
    assert registry.get(Todo) is before
    with capture_directives() as captured:
        todo.save()
    assert captured.audiences == {f"user-{todo.owner_id}"}


def test_models_named_user_outside_auth_get_their_app_label_in_front() -> None:
    """Issue 12, item 6: only the user model's audiences are ``user-<pk>``."""
    User = get_user_model()
    assert prefix_for(User) == "user-"
    assert prefix_for(Project) == "project-"

    class Meta:
        label = "crm.User"
        model_name = "user"
        app_label = "crm"

    class CrmUser:
        _meta = Meta

    assert prefix_for(CrmUser) == "crm.user-"


def test_each_model_further_up_a_path_knows_the_rows_below_it() -> None:
    comment = registry.get(Comment)
    assert comment is not None
    path = next(s for s in comment.audience.specs if isinstance(s, PathAudience))
    up = path.upstream(Comment)
    assert [(u.model, u.via) for u in up] == [(Card, "card"), (Board, "card__board")]
    # From the card the rest of the path is a path; from the board, a field.
    assert isinstance(up[0].spec, PathAudience) and up[0].spec.path == "board__team"
    assert up[1].spec == FieldAudience("team_id", "team-", Comment._meta.label)
    board = registry.rules_for(Board)
    assert board is not None
    below = {(d.rules.model, d.via): d.tracked for d in board.dependents}
    assert below == {
        (Card, "board"): ("id", "team_id", "lead_id"),
        (Bug, "board"): ("id", "team_id", "lead_id"),
        (Comment, "card__board"): ("id", "team_id"),
    }
    # A save through a child writes its parent's row: a Bug tells the card's comments.
    bug = registry.rules_for(Bug)
    assert bug is not None
    assert [(d.rules.model, d.via) for d in bug.dependents] == [(Comment, "card")]
