"""``ModelRules.route_plain`` (many changes routed at once, at commit) against
an independent oracle: the same changes routed one by one, as a lone save
routes them, into a batch of their own.

Both batches must tell every audience exactly the same directives, in the
pull copy and the push copy alike, whatever the mix of events, values,
audience moves and crowding past ``COLLAPSE_THRESHOLD``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import transaction
from django.test import override_settings
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from tests.testapp.models.todos import Todo
from verity_django import registry, rules
from verity_django.batching import Batch
from verity_django.testing import capture_directives, strip_metadata

THRESHOLD = 3
OWNERS = [None, 1, 2, 3]
STATUSES = ["active", "done"]
PROJECTS = [None, 7, 8]


def _values(pk: int, draw: Any) -> dict[str, Any]:
    return {
        "id": pk,
        "status": draw(st.sampled_from(STATUSES)),
        "project_id": draw(st.sampled_from(PROJECTS)),
        "owner_id": draw(st.sampled_from(OWNERS)),
    }


@st.composite
def plain_changes(draw: Any) -> list[rules.PlainChange]:
    changes: list[rules.PlainChange] = []
    # Few pks against many changes: rows saved again, and runs both under
    # and over the threshold.
    for _ in range(draw(st.integers(2, 14))):
        pk = draw(st.integers(1, 6))
        event = draw(st.sampled_from(["create", "update", "update", "delete"]))
        old = None if event == "create" else _values(pk, draw)
        new = None if event == "delete" else _values(pk, draw)
        if event == "update" and draw(st.booleans()):
            # Most updates leave the fields the rules read as they were.
            assert old is not None
            new = {**old, "status": draw(st.sampled_from(STATUSES))}
        changes.append((event, old, new))
    return changes


def _todo_rules() -> registry.ModelRules:
    found = registry.get(Todo)
    assert found is not None and found.routes_by_values
    return found


def _seen(batch: Batch) -> dict[str, list[str]]:
    """Every audience's directives as the push copy holds them, and the pull
    copy (``"*"``), without metadata, in no particular order."""

    def canonical(items: list[Any]) -> list[str]:
        return sorted(json.dumps(x.to_dict(metadata=False), sort_keys=True) for x in items)

    out = {audience: canonical(items) for audience, items in batch.by_audience().items()}
    out["*"] = canonical(batch.directives())
    return out


def _one_by_one(model_rules: registry.ModelRules, changes: list[rules.PlainChange]) -> Batch:
    batch = Batch()
    for event, old, new in changes:
        batch.add(model_rules.route([model_rules.change(event, old, new)], "default"))
    return batch


def _at_once(model_rules: registry.ModelRules, changes: list[rules.PlainChange]) -> Batch:
    batch = Batch()
    batch.add(model_rules.route_plain(changes, "default"))
    return batch


def _routing_agrees(changes: list[rules.PlainChange]) -> None:
    model_rules = _todo_rules()
    assert _seen(_at_once(model_rules, changes)) == _seen(_one_by_one(model_rules, changes))


@override_settings(VERITY={"COLLAPSE_THRESHOLD": THRESHOLD})
@settings(max_examples=400, deadline=None, database=None)
@given(changes=plain_changes())
def test_routing_at_once_tells_what_routing_one_by_one_tells(
    changes: list[rules.PlainChange],
) -> None:
    _routing_agrees(changes)


def _crowding_by_changes(self: Any, changes: Any, threshold: int) -> bool:
    """A broken crowding test: it counts changes, not rows, so that one row
    saved again and again collapses into its collection."""
    return bool(self.rule.is_self and self.collapse_to) and len(changes) > threshold


def _deciding_by_rule_values_alone(self: Any, crowded: Any) -> Any:
    """A broken shortcut: a change whose rules read the same values as an
    earlier one's is skipped even though its audiences differ."""
    names = sorted({n for i, b in enumerate(self.rules) if i not in crowded for n in b.tracked})
    return registry._key_of(tuple(names))


@pytest.mark.parametrize(
    ("owner", "name", "broken"),
    [
        (rules.BoundItem, "crowds", _crowding_by_changes),
        (registry.ModelRules, "_decisive_key", _deciding_by_rule_values_alone),
    ],
    ids=["items_collapsed_too_early", "changes_skipped_for_other_audiences"],
)
@override_settings(VERITY={"COLLAPSE_THRESHOLD": THRESHOLD})
def test_the_oracle_catches_a_broken_shortcut(
    owner: Any, name: str, broken: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same search as the property's; finding a difference is enough, so
    # it is not shrunk.
    @settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate])
    @given(changes=plain_changes())
    def search(changes: list[rules.PlainChange]) -> None:
        _routing_agrees(changes)

    monkeypatch.setattr(owner, name, broken)
    with pytest.raises(AssertionError):
        search()


@pytest.mark.django_db(transaction=True)
@override_settings(VERITY={"COLLAPSE_THRESHOLD": THRESHOLD})
def test_saves_in_one_transaction_are_routed_when_it_commits(alice: Any, bob: Any) -> None:
    """A loop of saves: its directives wait for the commit, a savepoint
    rolled back drops its own, and crowded items arrive as their collection
    for every owner."""
    todos = [Todo.objects.create(title=f"t{i}", owner=alice if i % 2 else bob) for i in range(6)]
    with capture_directives() as captured:
        with transaction.atomic():
            for todo in todos:
                todo.status = "done"
                todo.save()
            assert captured.directives == []
            try:
                with transaction.atomic():
                    todos[0].project_id = None
                    todos[0].title = "rolled back"
                    todos[0].status = "active"
                    todos[0].save()
                    raise RuntimeError
            except RuntimeError:
                pass
    # The crowded items became their whole collection, which subsumes the
    # params variants of the same name.
    expected = [{"op": "refresh_collection", "name": "todos"}]
    assert captured.audiences == {f"user-{alice.pk}", f"user-{bob.pk}"}
    for audience in captured.audiences:
        assert strip_metadata(captured.for_audience(audience)) == expected
