"""Every change reaches every audience that can see it: a completeness oracle.

A hypothesis state machine drives the team task board of ``tests.testapp``
through Django's change paths, one per step: create, ``save()``,
``save(update_fields)``, ``delete()``, ``QuerySet.update()`` (with ``F()`` and
``Case``), ``QuerySet.delete()``, ``bulk_create``, ``bulk_update``, m2m changes
from either side, cascades (CASCADE, SET_NULL, SET_DEFAULT), saves of
instances that went stale or were refreshed, and all of these inside
``atomic()`` blocks whose savepoints roll back.

After each step the oracle reads every table of the board with raw SQL (no
verity_django code at all) and derives, from its own statement of who may see
which row (:func:`view`, written from the models' meaning, not from their
rules), what went stale in each audience's client:

- an item the audience could see before and after, whose data changed;
- a collection query the audience can make, whose members (the rows it may
  see that match) gained or lost one.

What was delivered to that audience (``capture_directives().for_audience()``,
which is what push publishes to it) must cover each: a ``refresh_item`` of the
id or a whole-collection refresh for an item; for a query, a
``refresh_collection`` of its name with no params, with exactly its params, or
in contains mode with a subset of them. And no audience may be told an id it
could not see before or after the step (or, inside a transaction, after one
of its savepoints: each change is told as it is made): over-delivery across
audiences is a leak.

Collections answer ``{"ids": [...]}`` (the protocol's shape), so a member whose
data changed but stays is an item change, not a collection change.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.signals import pre_delete
from django.test import override_settings
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import verity_django
from tests.testapp.models import Board, Bug, Card, Column, Comment, Label, LabelProxy, Team
from verity_django.testing import capture_directives

User = get_user_model()

OPERATORS = "team-ops"
EVERYBODY = "global"

# --------------------------------------------------------------------------
# The oracle's world: rows read with SQL, and who may see them
# --------------------------------------------------------------------------

TABLES = {
    "user": ("auth_user", "id", "id, username"),
    "team": ("testapp_team", "id", "*"),
    "board": ("testapp_board", "id", "*"),
    "column": ("testapp_column", "id", "*"),
    "label": ("testapp_label", "id", "*"),
    "card": ("testapp_card", "id", "*"),
    "bug": ("testapp_bug", "card_ptr_id", "*"),
    "comment": ("testapp_comment", "id", "*"),
    "card_label": ("testapp_card_labels", "id", "*"),
}

Rows = dict[str, dict[Any, dict[str, Any]]]


def snapshot() -> Rows:
    rows: Rows = {}
    with connection.cursor() as cursor:
        for kind, (table, pk, columns) in TABLES.items():
            cursor.execute(f"SELECT {columns} FROM {table}")
            names = [c[0] for c in cursor.description]
            found = (dict(zip(names, values, strict=True)) for values in cursor.fetchall())
            rows[kind] = {row[pk]: row for row in found}
    return rows


# Each collection's queries: the filters a client of the board can combine.
CARD_FILTERS = ("board", "status", "assignee")
COLLECTION_OF = {
    "team": "teams",
    "board": "boards",
    "column": "columns",
    "label": "labels",
    "card": "cards",
    "bug": "bugs",
    "comment": "comments",
}
# What kind of row an id names, in a directive's item name or params key.
ROW_OF_ITEM = {name: ("card" if name == "bug" else name) for name in COLLECTION_OF}
ROW_OF_PARAM = {"team": "team", "board": "board", "assignee": "user", "card": "card"}

Params = tuple[tuple[str, Any], ...]
Query = tuple[str, Params]
Key = tuple[str, Any]  # (item name, id)


@dataclass
class View:
    """What each audience can see in one snapshot."""

    data: dict[Key, Any] = field(default_factory=dict)
    readers: dict[Key, frozenset[str]] = field(default_factory=dict)
    queries: dict[Key, frozenset[Query]] = field(default_factory=dict)
    known: defaultdict[str, set[tuple[str, Any]]] = field(default_factory=lambda: defaultdict(set))

    def add(
        self,
        key: Key,
        data: Any,
        readers: Iterable[str],
        queries: Iterable[Query],
        refers_to: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.data[key] = data
        self.readers[key] = frozenset(readers)
        self.queries[key] = frozenset(queries)
        seen = {(ROW_OF_ITEM[key[0]], key[1]), *((k, v) for k, v in refers_to if v is not None)}
        for audience in self.readers[key]:
            self.known[audience] |= seen


def _params(**params: Any) -> Params:
    return tuple(sorted(params.items()))


def view(rows: Rows) -> View:
    """Who may see each row, and which queries it answers: the board's semantics.

    A team is seen by the operators and its own members; a board, its cards and
    their comments by the team owning the board; a card also by its assignee
    and by its board's lead; a comment also by its author; labels and columns
    by everybody.
    """
    out = View()
    labels_of: defaultdict[Any, set[Any]] = defaultdict(set)
    for link in rows["card_label"].values():
        labels_of[link["card_id"]].add(link["label_id"])
    cards_on: defaultdict[Any, set[Any]] = defaultdict(set)
    for card in rows["card"].values():
        cards_on[card["board_id"]].add(card["id"])
    team_of_board = {pk: board["team_id"] for pk, board in rows["board"].items()}

    def card_readers(card: dict[str, Any]) -> set[str]:
        board = rows["board"][card["board_id"]]
        readers = {f"team-{board['team_id']}"}
        for user in (card["assignee_id"], board["lead_id"]):
            if user is not None:
                readers.add(f"user-{user}")
        return readers

    def card_refs(card: dict[str, Any]) -> list[tuple[str, Any]]:
        refs = [("board", card["board_id"]), ("user", card["assignee_id"])]
        refs += [("column", card["column_id"])]
        return refs + [("label", label) for label in labels_of[card["id"]]]

    for pk, team in rows["team"].items():
        out.add(("team", pk), team, {OPERATORS, f"team-{pk}"}, [("teams", ())])
    for pk, board in rows["board"].items():
        out.add(
            ("board", pk),
            (board, frozenset(cards_on[pk])),
            {f"team-{board['team_id']}"},
            [("boards", _params(team=board["team_id"]))],
            [("team", board["team_id"])],
        )
    for kind in ("column", "label"):
        for pk, row in rows[kind].items():
            out.add((kind, pk), row, {EVERYBODY}, [(COLLECTION_OF[kind], ())])
    for pk, card in rows["card"].items():
        filters = {"board": card["board_id"], "status": card["status"]}
        if card["assignee_id"] is not None:
            filters["assignee"] = card["assignee_id"]
        queries = [
            ("cards", _params(**{name: filters[name] for name in names}))
            for size in range(1, len(CARD_FILTERS) + 1)
            for names in itertools.combinations(CARD_FILTERS, size)
            if set(names) <= set(filters)
        ]
        data = (card, frozenset(labels_of[pk]))
        out.add(("card", pk), data, card_readers(card), queries, card_refs(card))
        bug = rows["bug"].get(pk)
        if bug is not None:
            out.add(
                ("bug", pk),
                (*data, bug),
                card_readers(card),
                [("bugs", ()), ("bugs", _params(severity=bug["severity"]))],
                card_refs(card),
            )
    for pk, comment in rows["comment"].items():
        card = rows["card"][comment["card_id"]]
        out.add(
            ("comment", pk),
            comment,
            {f"team-{team_of_board[card['board_id']]}", f"user-{comment['author_id']}"},
            [("comments", _params(card=comment["card_id"]))],
            [("card", comment["card_id"]), ("user", comment["author_id"])],
        )
    return out


# --------------------------------------------------------------------------
# What must be told, and whether it was
# --------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Stale:
    """Something an audience's client holds that the step made stale."""

    audience: str
    name: str  # an item name, or a collection name
    id: Any = None  # the item, for an item
    params: Params | None = None  # the query, for a collection
    member: Any = None  # the row that entered or left the query

    def __str__(self) -> str:
        if self.params is None:
            return f"{self.audience}: refresh_item {self.name} {self.id!r}"
        return (
            f"{self.audience}: refresh_collection {self.name} "
            f"{json.dumps(dict(self.params))} (member {self.member!r} entered or left)"
        )


def stale(before: View, after: View) -> set[Stale]:
    out: set[Stale] = set()
    for key in before.data.keys() | after.data.keys():
        old, new = before.data.get(key), after.data.get(key)
        old_readers = before.readers.get(key, frozenset())
        new_readers = after.readers.get(key, frozenset())
        # A row can move to other readers with none of its own data changed:
        # the cards of a board that moved to another team.
        if old == new and old_readers == new_readers:
            continue
        name, pk = key
        for audience in old_readers | new_readers:
            saw, sees = audience in old_readers, audience in new_readers
            if saw and sees and old != new:
                out.add(Stale(audience, name, id=pk))
            was_in = before.queries.get(key, frozenset()) if saw else frozenset()
            is_in = after.queries.get(key, frozenset()) if sees else frozenset()
            for collection, params in was_in ^ is_in:
                out.add(Stale(audience, collection, params=params, member=pk))
    return out


def _flat(directives: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for directive in directives:
        if directive.get("op") == "invalidate":
            yield from _flat(directive.get("targets", []))
        else:
            yield directive


def _same(a: Any, b: Any) -> bool:
    # 3 and "3" are different cache keys on the client; so are 1 and True.
    return type(a) is type(b) and a == b


def covers(directive: dict[str, Any], need: Stale) -> bool:
    op = directive.get("op")
    if op == "force_reload_page":
        return True
    if need.params is None:
        if op == "refresh_item":
            return directive["name"] == need.name and _same(directive["id"], need.id)
        return (
            op == "refresh_collection"
            and directive["name"] == COLLECTION_OF[need.name]
            and not directive.get("params")
        )
    if op != "refresh_collection" or directive["name"] != need.name:
        return False
    given = directive.get("params") or {}
    if not given:
        return True
    wanted = dict(need.params)
    if directive.get("params_mode", "exact") == "contains":
        return all(k in wanted and _same(wanted[k], v) for k, v in given.items())
    return given.keys() == wanted.keys() and all(_same(wanted[k], v) for k, v in given.items())


def named_rows(directive: dict[str, Any]) -> set[tuple[str, Any]] | None:
    """The rows a directive names by id; None for a name the board does not have."""
    op = directive.get("op")
    if op == "refresh_item":
        kind = ROW_OF_ITEM.get(directive["name"])
        return None if kind is None else {(kind, directive["id"])}
    if op == "refresh_collection":
        if directive["name"] not in COLLECTION_OF.values():
            return None
        params = directive.get("params") or {}
        return {
            (ROW_OF_PARAM[k], v) for k, v in params.items() if k in ROW_OF_PARAM and v is not None
        }
    return set()


def diff(before: Rows, after: Rows) -> list[str]:
    lines = []
    for kind, (table, _, _) in TABLES.items():
        old, new = before[kind], after[kind]
        for pk in sorted(old.keys() | new.keys(), key=repr):
            if pk not in new:
                lines.append(f"  - {table} {pk}: {old[pk]}")
            elif pk not in old:
                lines.append(f"  + {table} {pk}: {new[pk]}")
            elif old[pk] != new[pk]:
                changes = ", ".join(
                    f"{col} {old[pk][col]!r} -> {new[pk][col]!r}"
                    for col in new[pk]
                    if old[pk][col] != new[pk][col]
                )
                lines.append(f"  ~ {table} {pk}: {changes}")
    return lines or ["  (no row changed)"]


def check(
    step: str,
    history: list[str],
    before: Rows,
    after: Rows,
    captured: Any,
    between: Iterable[Rows] = (),
) -> None:
    """``between``: the states a transaction went through (after each of its
    savepoints), whose readers were told of each change as it was made."""
    old, new = view(before), view(after)
    passed = [view(rows) for rows in between]
    needs = stale(old, new)
    audiences = captured.audiences | {n.audience for n in needs}
    delivered = {a: list(_flat(captured.for_audience(a))) for a in sorted(audiences)}
    missed = [n for n in sorted(needs) if not any(covers(d, n) for d in delivered[n.audience])]
    leaked = []
    for audience, directives in delivered.items():
        could_see = old.known[audience] | new.known[audience]
        for state in passed:
            could_see |= state.known[audience]
        for directive in directives:
            named = named_rows(directive)
            if named is None or not named <= could_see:
                unseen = "a name the board does not have" if named is None else named - could_see
                leaked.append(f"{audience}: {json.dumps(directive)} names {unseen}")
    if not missed and not leaked:
        return
    lines = [f"step: {step}", "", "earlier steps:"]
    lines += [f"  {i}. {s}" for i, s in enumerate(history, 1)] or ["  (none)"]
    if missed:
        lines += ["", "missed (audience: the directive that would cover it):"]
        lines += [f"  {n}" for n in missed]
    if leaked:
        lines += ["", "leaked (told ids of rows the audience could not see):"]
        lines += [f"  {x}" for x in leaked]
    lines += ["", "rows changed:", *diff(before, after), "", "delivered:"]
    for audience, directives in delivered.items():
        lines.append(f"  {audience}: {json.dumps(directives)}")
    raise AssertionError("\n".join(lines))


# --------------------------------------------------------------------------
# The state machine: one change path per step
# --------------------------------------------------------------------------


class RolledBack(Exception):
    """Raised inside a savepoint so that atomic() rolls it back."""


STATUSES = [c.value for c in Card.Status]

names = st.text("abcdefgh", min_size=1, max_size=6)


class BoardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rows: Rows = {}
        self.history: list[str] = []
        # Instances loaded in earlier steps, saved again by later ones, also
        # after saves of theirs rolled back (Django does not undo the
        # instance). An instance whose row another path changed holds values
        # the row no longer has, which verity cannot know of (README, Known
        # limits): the machine drops it, as real code must load it again.
        self.held: dict[Any, Card] = {}
        # The row (card, bug) as each held instance last read or wrote it.
        self.held_rows: dict[Any, Any] = {}
        # Instances the action running now wrote through.
        self.written: list[Card] = []
        # The rows after each savepoint of the transaction running now.
        self.between: list[Rows] = []
        self.serial = itertools.count()
        self.example: Any = None

    # -- helpers -----------------------------------------------------------

    def ids(self, kind: str) -> list[Any]:
        return sorted(self.rows[kind])

    def pick(self, data: st.DataObject, kind: str, label: str) -> Any:
        ids = self.ids(kind)
        return data.draw(st.sampled_from(ids), label=label) if ids else None

    def pick_some(self, data: st.DataObject, kind: str, label: str, max_size: int = 3) -> list[Any]:
        ids = self.ids(kind)
        if not ids:
            return []
        return data.draw(
            st.lists(st.sampled_from(ids), max_size=max_size, unique=True), label=label
        )

    def assignee(self, data: st.DataObject) -> Any:
        return data.draw(st.sampled_from([None, *self.ids("user")]), label="assignee")

    def card(self, data: st.DataObject, label: str = "card") -> tuple[Card, str] | None:
        """A card instance: one held from an earlier step, or loaded now."""
        pk = self.pick(data, "card", label)
        if pk is None:
            return None
        held = self.held.get(pk)
        if held is not None and data.draw(st.booleans(), label="use the held instance"):
            self.repair(held)
            return held, f"held {type(held).__name__} {pk}"
        model = Bug if pk in self.rows["bug"] and data.draw(st.booleans(), label="as bug") else Card
        instance = model.objects.get(pk=pk)
        if data.draw(st.booleans(), label="hold it"):
            self.keep(instance, self.row_of(pk))
        return instance, f"{model.__name__} {pk}"

    def row_of(self, pk: Any) -> Any:
        card = self.rows["card"].get(pk)
        return None if card is None else (card, self.rows["bug"].get(pk))

    def keep(self, instance: Card, row: Any) -> None:
        self.held[instance.pk] = instance
        self.held_rows[instance.pk] = row

    def wrote(self, *instances: Card) -> None:
        self.written.extend(instances)

    def settle_held(self, rolled_back: bool = False) -> None:
        """After an action: what the held instances it wrote through now
        read, unless it rolled back; and drop those whose row changed by
        another path."""
        if not rolled_back:
            for instance in self.written:
                if self.held.get(instance.pk) is instance:
                    self.held_rows[instance.pk] = self.row_of(instance.pk)
        self.written.clear()
        # delete() sets the instance's pk to None.
        self.held = {
            pk: c
            for pk, c in self.held.items()
            if c.pk == pk and self.row_of(pk) == self.held_rows.get(pk)
        }
        self.held_rows = {pk: self.held_rows[pk] for pk in self.held}

    def repair(self, card: Card) -> None:
        # A held instance may point at rows deleted since; real code would
        # have to re-point it too before saving.
        if card.board_id not in self.rows["board"]:
            card.board_id = self.ids("board")[0]
        if card.assignee_id is not None and card.assignee_id not in self.rows["user"]:
            card.assignee_id = None
        if card.column_id not in self.rows["column"]:
            card.column_id = self.ids("column")[0]

    def card_edits(self, data: st.DataObject) -> dict[str, Any]:
        choices: dict[str, st.SearchStrategy[Any]] = {
            "title": names,
            "status": st.sampled_from(STATUSES),
            "priority": st.integers(0, 3),
            "board_id": st.sampled_from(self.ids("board")),
            "assignee_id": st.sampled_from([None, *self.ids("user")]),
            "column_id": st.sampled_from(self.ids("column")),
        }
        fields = data.draw(
            st.lists(st.sampled_from(sorted(choices)), min_size=1, max_size=3, unique=True),
            label="fields",
        )
        return {f: data.draw(choices[f], label=f) for f in fields}

    def card_filter(self, data: st.DataObject) -> tuple[Q, str]:
        kind = data.draw(st.sampled_from(["board", "status", "assignee", "pks", "all"]))
        if kind == "board":
            board = self.pick(data, "board", "board")
            return Q(board_id=board), f"board={board}"
        if kind == "status":
            status = data.draw(st.sampled_from(STATUSES), label="status")
            return Q(status=status), f"status={status!r}"
        if kind == "assignee":
            user = self.assignee(data)
            return Q(assignee_id=user), f"assignee={user}"
        if kind == "pks":
            pks = self.pick_some(data, "card", "pks")
            return Q(pk__in=pks), f"pk__in={pks}"
        return Q(), "all"

    @contextmanager
    def step(self, description: Callable[[], str]) -> Iterator[None]:
        before = self.rows
        with capture_directives() as captured:
            yield
        self.rows = snapshot()
        text = description()
        check(text, self.history, before, self.rows, captured, self.between)
        self.between = []
        self.history.append(text)
        self.settle_held()

    def run(self, action: Callable[..., str | None], data: st.DataObject) -> None:
        said: list[str | None] = []
        with self.step(lambda: said[0] or f"{action.__name__}: nothing to do"):
            said.append(action(self, data))

    # -- set-up ------------------------------------------------------------

    @initialize()
    def seed(self) -> None:
        # Each example runs in a block that rolls back, marked as the test
        # case's own blocks are, so that verity treats it as the test
        # transaction it is (steps inside it commit) rather than as code
        # under test.
        self.example = transaction.atomic()
        self.example.__enter__()
        self.example._from_testcase = True
        with verity_django.disabled():
            users = [User.objects.create(username=f"oracle-{i}") for i in range(3)]
            teams = [Team.objects.create(name=f"t{i}") for i in range(2)]
            boards = [
                Board.objects.create(team=t, name=f"b{i}", lead=users[i] if i < 2 else None)
                for i, t in enumerate(teams * 2)
            ]
            Column.objects.create(name="backlog")
            doing = Column.objects.create(name="doing")
            labels = [Label.objects.create(name=n) for n in ("red", "blue")]
            for i, board in enumerate(boards):
                card = Card.objects.create(
                    board=board, title=f"c{i}", assignee=users[i % 3], column=doing
                )
                card.labels.add(labels[i % 2])
            Bug.objects.create(board=boards[0], title="bug", severity=2)
            Comment.objects.create(card=card, author=users[0], body="hi")
        self.rows = snapshot()

    def teardown(self) -> None:
        if self.example is not None:
            self.example.__exit__(RolledBack, RolledBack(), None)

    # -- actions: each draws its arguments, changes something, says what ----

    def do_create_user(self, data: st.DataObject) -> str:
        user = User.objects.create(username=f"oracle-u{next(self.serial)}")
        return f"create user {user.pk}"

    def do_delete_user(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "user", "user")
        if pk is None:
            return None
        if data.draw(st.booleans(), label="queryset"):
            User.objects.filter(pk=pk).delete()
            return f"User.objects.filter(pk={pk}).delete() (SET_NULL assignee, lead; CASCADE)"
        User.objects.get(pk=pk).delete()
        return f"user {pk}.delete() (SET_NULL assignee, lead; CASCADE comments)"

    def do_create_team(self, data: st.DataObject) -> str:
        team = Team(name=data.draw(names, label="name"))
        team.save()
        return f"create team {team.pk}"

    def do_edit_team(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "team", "team")
        if pk is None:
            return None
        name = data.draw(names, label="name")
        if data.draw(st.booleans(), label="queryset"):
            Team.objects.filter(pk=pk).update(name=name)
            return f"Team.objects.filter(pk={pk}).update(name={name!r})"
        team = Team.objects.get(pk=pk)
        team.name = name
        team.save()
        return f"team {pk}.save() with name={name!r}"

    def do_delete_team(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "team", "team")
        if pk is None or len(self.rows["team"]) < 2:
            return None
        Team.objects.get(pk=pk).delete()
        return f"team {pk}.delete() (CASCADE boards, cards, bugs, comments)"

    def do_create_board(self, data: st.DataObject) -> str | None:
        team = self.pick(data, "team", "team")
        if team is None:
            return None
        board = Board.objects.create(team_id=team, name=data.draw(names, label="name"))
        return f"create board {board.pk} of team {team}"

    def do_edit_board(self, data: st.DataObject) -> str | None:
        """Move boards to another team or lead: the cards (and their
        comments) on them move with them, none of their own rows changing."""
        pks = self.pick_some(data, "board", "boards")
        if not pks:
            return None
        edits = {"team_id": self.pick(data, "team", "team"), "lead_id": self.assignee(data)}
        edits = {f: v for f, v in edits.items() if data.draw(st.booleans(), label=f"set {f}")} or {
            "team_id": edits["team_id"]
        }
        how = data.draw(st.sampled_from(["save", "update", "bulk_update"]), label="how")
        if how == "update":
            Board.objects.filter(pk__in=pks).update(**edits, name=F("name"))
            return f"Board.objects.filter(pk__in={pks}).update(**{edits})"
        boards = list(Board.objects.filter(pk__in=pks))
        for board in boards:
            for name, value in edits.items():
                setattr(board, name, value)
        if how == "bulk_update":
            Board.objects.bulk_update(boards, [f.removesuffix("_id") for f in edits])
            return f"Board.objects.bulk_update(boards {pks}, {edits})"
        for board in boards:
            board.save()
        return f"boards {pks}.save() with {edits}"

    def do_delete_board(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "board", "board")
        if pk is None or len(self.rows["board"]) < 2:
            return None
        if data.draw(st.booleans(), label="queryset"):
            Board.objects.filter(pk=pk).delete()
            return f"Board.objects.filter(pk={pk}).delete() (CASCADE cards, bugs, comments)"
        Board.objects.get(pk=pk).delete()
        return f"board {pk}.delete() (CASCADE cards, bugs, comments)"

    def do_create_column(self, data: st.DataObject) -> str:
        column = Column.objects.create(name=data.draw(names, label="name"))
        return f"create column {column.pk}"

    def do_delete_column(self, data: st.DataObject) -> str | None:
        # The backlog is where SET_DEFAULT sends cards, so it stays.
        pks = [pk for pk, c in self.rows["column"].items() if c["name"] != "backlog"]
        if not pks:
            return None
        pk = data.draw(st.sampled_from(sorted(pks)), label="column")
        Column.objects.get(pk=pk).delete()
        return f"column {pk}.delete() (SET_DEFAULT on cards)"

    def label_model(self, data: st.DataObject) -> type[Label]:
        return data.draw(st.sampled_from([Label, LabelProxy]), label="label class")

    def do_create_label(self, data: st.DataObject) -> str:
        model = self.label_model(data)
        label = model.objects.create(name=data.draw(names, label="name"))
        return f"create {model.__name__} {label.pk}"

    def do_edit_label(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "label", "label")
        if pk is None:
            return None
        model = self.label_model(data)
        label = model.objects.get(pk=pk)
        label.name = data.draw(names, label="name")
        label.save()
        return f"{model.__name__} {pk}.save() with name={label.name!r}"

    def do_delete_label(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "label", "label")
        if pk is None:
            return None
        model = self.label_model(data)
        model.objects.get(pk=pk).delete()
        return f"{model.__name__} {pk}.delete() (its cards lose it)"

    def do_create_card(self, data: st.DataObject) -> str | None:
        board = self.pick(data, "board", "board")
        if board is None:
            return None
        fields: dict[str, Any] = {
            "board_id": board,
            "title": data.draw(names, label="title"),
            "status": data.draw(st.sampled_from(STATUSES), label="status"),
            "assignee_id": self.assignee(data),
        }
        if data.draw(st.booleans(), label="explicit column"):
            fields["column_id"] = self.pick(data, "column", "column")
        model: type[Card] = data.draw(st.sampled_from([Card, Bug]), label="class")
        if model is Bug:
            fields["severity"] = data.draw(st.integers(1, 3), label="severity")
        if data.draw(st.booleans(), label="via save()"):
            card = model(**fields)
            card.save()
            # A row it created, or none if the creation rolls back.
            self.keep(card, None)
            self.wrote(card)
            return f"{model.__name__}(**{fields}).save() -> {card.pk}"
        card = model.objects.create(**fields)
        return f"{model.__name__}.objects.create(**{fields}) -> {card.pk}"

    def do_save_card(self, data: st.DataObject) -> str | None:
        found = self.card(data)
        if found is None:
            return None
        card, which = found
        edits = self.card_edits(data)
        if isinstance(card, Bug) and data.draw(st.booleans(), label="severity"):
            edits["severity"] = data.draw(st.integers(1, 3), label="severity value")
        for name, value in edits.items():
            setattr(card, name, value)
        card.save()
        self.wrote(card)
        return f"{which}.save() with {edits}"

    def do_save_update_fields(self, data: st.DataObject) -> str | None:
        found = self.card(data)
        if found is None:
            return None
        card, which = found
        edits = self.card_edits(data)
        for name, value in edits.items():
            setattr(card, name, value)
        saved = data.draw(
            st.lists(st.sampled_from(sorted(edits)), min_size=1, unique=True), label="saved"
        )
        card.save(update_fields=[f.removesuffix("_id") for f in saved])
        self.wrote(card)
        return f"{which}: set {edits}, save(update_fields={saved})"

    def do_refresh_then_save(self, data: st.DataObject) -> str | None:
        found = self.card(data)
        if found is None:
            return None
        card, which = found
        card.refresh_from_db()
        edits = self.card_edits(data)
        for name, value in edits.items():
            setattr(card, name, value)
        card.save()
        self.wrote(card)
        return f"{which}.refresh_from_db(), then save() with {edits}"

    def do_delete_card(self, data: st.DataObject) -> str | None:
        found = self.card(data)
        if found is None:
            return None
        card, which = found
        card.delete()
        return f"{which}.delete()"

    def do_update(self, data: st.DataObject) -> str | None:
        if not self.rows["card"]:
            return None
        where, said = self.card_filter(data)
        values = {
            "status": st.sampled_from(STATUSES),
            "priority": st.sampled_from(
                [
                    F("priority") + 1,
                    Case(When(status="done", then=Value(3)), default=Value(0)),
                    Value(2),
                ]
            ),
            "board_id": st.sampled_from(self.ids("board")),
            "assignee_id": st.sampled_from([None, *self.ids("user")]),
            "column_id": st.sampled_from(self.ids("column")),
            "title": st.sampled_from(
                [Case(When(priority__gte=2, then=Value("hot")), default=F("title"))]
            ),
        }
        model: type[Card] = data.draw(st.sampled_from([Card, Bug]), label="class")
        if model is Bug:
            values["severity"] = st.sampled_from([F("severity") + 1, Value(1)])
        fields = data.draw(
            st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True),
            label="fields",
        )
        assignments = {f: data.draw(values[f], label=f) for f in fields}
        model.objects.filter(where).update(**assignments)
        return f"{model.__name__}.objects.filter({said}).update(**{assignments})"

    def do_queryset_delete(self, data: st.DataObject) -> str | None:
        if not self.rows["card"]:
            return None
        where, said = self.card_filter(data)
        model: type[Card] = data.draw(st.sampled_from([Card, Bug]), label="class")
        model.objects.filter(where).delete()
        return f"{model.__name__}.objects.filter({said}).delete()"

    def do_bulk_create(self, data: st.DataObject) -> str | None:
        if not self.rows["board"]:
            return None
        cards = [
            Card(
                board_id=self.pick(data, "board", "board"),
                title=data.draw(names, label="title"),
                status=data.draw(st.sampled_from(STATUSES), label="status"),
                assignee_id=self.assignee(data),
            )
            for _ in range(data.draw(st.integers(1, 3), label="count"))
        ]
        made = Card.objects.bulk_create(cards)
        return f"Card.objects.bulk_create() -> {[c.pk for c in made]}"

    def do_bulk_update(self, data: st.DataObject) -> str | None:
        cards = []
        for _ in range(data.draw(st.integers(1, 3), label="count")):
            found = self.card(data)
            if found is not None and found[0].pk not in {c.pk for c in cards}:
                cards.append(found[0])
        if not cards:
            return None
        edits = self.card_edits(data)
        for card in cards:
            for name, value in edits.items():
                setattr(card, name, value)
        saved = data.draw(
            st.lists(st.sampled_from(sorted(edits)), min_size=1, unique=True), label="saved"
        )
        Card.objects.bulk_update(cards, [f.removesuffix("_id") for f in saved])
        self.wrote(*cards)
        return f"cards {[c.pk for c in cards]}: set {edits}, bulk_update(fields={saved})"

    def do_card_labels(self, data: st.DataObject) -> str | None:
        found = self.card(data)
        if found is None:
            return None
        card, which = found
        labels = self.pick_some(data, "label", "labels")
        how = data.draw(st.sampled_from(["add", "remove", "set", "clear"]), label="how")
        if how == "clear":
            card.labels.clear()
        elif how == "set":
            card.labels.set(labels)
        else:
            getattr(card.labels, how)(*labels)
        return f"{which}.labels.{how}({'' if how == 'clear' else labels})"

    def do_label_cards(self, data: st.DataObject) -> str | None:
        pk = self.pick(data, "label", "label")
        if pk is None:
            return None
        model = self.label_model(data)
        label = model.objects.get(pk=pk)
        cards = self.pick_some(data, "card", "cards")
        how = data.draw(st.sampled_from(["add", "remove", "set", "clear"]), label="how")
        if how == "clear":
            label.cards.clear()
        elif how == "set":
            label.cards.set(cards)
        else:
            getattr(label.cards, how)(*cards)
        return f"{model.__name__} {pk}.cards.{how}({'' if how == 'clear' else cards})"

    def do_comment(self, data: st.DataObject) -> str | None:
        how = data.draw(st.sampled_from(["create", "edit", "update", "delete"]), label="how")
        if how == "create":
            card, author = self.pick(data, "card", "card"), self.pick(data, "user", "author")
            if card is None or author is None:
                return None
            comment = Comment.objects.create(card_id=card, author_id=author, body="x")
            return f"create comment {comment.pk} on card {card} by user {author}"
        pk = self.pick(data, "comment", "comment")
        if pk is None:
            return None
        if how == "update":
            Comment.objects.filter(pk=pk).update(body=F("body"))
            return f"Comment.objects.filter(pk={pk}).update(body=F('body'))"
        comment = Comment.objects.get(pk=pk)
        if how == "delete":
            comment.delete()
            return f"comment {pk}.delete()"
        comment.body = data.draw(names, label="body")
        comment.save()
        return f"comment {pk}.save() with body={comment.body!r}"

    ACTIONS = (
        do_create_user,
        do_delete_user,
        do_create_team,
        do_edit_team,
        do_delete_team,
        do_create_board,
        do_edit_board,
        do_delete_board,
        do_create_column,
        do_delete_column,
        do_create_label,
        do_edit_label,
        do_delete_label,
        do_create_card,
        do_save_card,
        do_save_update_fields,
        do_refresh_then_save,
        do_delete_card,
        do_update,
        do_queryset_delete,
        do_bulk_create,
        do_bulk_update,
        do_card_labels,
        do_label_cards,
        do_comment,
    )

    # -- rules -------------------------------------------------------------

    @rule(data=st.data(), action=st.sampled_from(ACTIONS))
    def change(self, data: st.DataObject, action: Callable[..., str | None]) -> None:
        self.run(action, data)

    @rule(data=st.data())
    def in_atomic_block(self, data: st.DataObject) -> None:
        """Several changes in one transaction; some savepoints roll back, or all."""
        actions = data.draw(st.lists(st.sampled_from(self.ACTIONS), min_size=1, max_size=3))
        undo_all = data.draw(st.booleans(), label="roll the whole block back")
        said: list[str] = []
        held_before = {pk: (c, self.held_rows[pk]) for pk, c in self.held.items()}
        with self.step(lambda: f"atomic({'rolled back' if undo_all else 'committed'}): {said}"):
            try:
                with transaction.atomic():
                    for action in actions:
                        undo = data.draw(st.booleans(), label="roll this savepoint back")
                        try:
                            with transaction.atomic():
                                text = action(self, data) or "nothing"
                                said.append(f"{text}{' (rolled back)' if undo else ''}")
                                if undo:
                                    raise RolledBack
                        except RolledBack:
                            pass
                        # Later actions pick from the rows as they are now.
                        self.rows = snapshot()
                        self.between.append(self.rows)
                        self.settle_held(rolled_back=undo)
                    if undo_all:
                        raise RolledBack
            except RolledBack:
                # What the instances held before the block wrote in it is
                # undone; those loaded in it read rows that were rolled back.
                self.held = {
                    pk: c for pk, c in self.held.items() if held_before.get(pk, (None,))[0] is c
                }
                self.held_rows = {pk: held_before[pk][1] for pk in self.held}

    @rule(data=st.data())
    def hold(self, data: st.DataObject) -> None:
        """Load a card and keep it, so that a later step saves it stale."""
        pk = self.pick(data, "card", "card")
        if pk is not None:
            with self.step(lambda: f"load card {pk} and keep it"):
                model = Bug if pk in self.rows["bug"] else Card
                self.keep(model.objects.get(pk=pk), self.row_of(pk))

    @invariant()
    def snapshot_is_consistent(self) -> None:
        # A broken foreign key would make the oracle's view of readers wrong.
        if self.rows:
            boards = self.rows["board"]
            assert all(c["board_id"] in boards for c in self.rows["card"].values())


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------

HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def run(examples: int, steps: int, *, shrink: bool = False) -> None:
    """Shrinking a failure of this machine can take many minutes, so only the
    long run does it; a failure without it still names its step, what was
    missed and the rows that changed."""
    run_state_machine_as_test(
        BoardMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=HEALTH,
            phases=list(Phase) if shrink else [Phase.explicit, Phase.generate],
            print_blob=False,
        ),
    )


# With a fixed seed (derandomize) these two make about 2,300 steps (hypothesis
# ends some examples before their 30th step), in about a minute and a half here.
@pytest.mark.django_db
def test_every_change_reaches_every_audience_that_can_see_it() -> None:
    run(examples=60, steps=30)


@pytest.mark.django_db
@override_settings(VERITY={"COLLAPSE_THRESHOLD": 2})
def test_every_change_reaches_every_audience_when_changes_collapse() -> None:
    run(examples=30, steps=30)


@pytest.mark.long_oracle
@pytest.mark.django_db
def test_completeness_long() -> None:
    examples = os.environ.get("VERITY_ORACLE_EXAMPLES")
    if not examples:
        pytest.skip("set VERITY_ORACLE_EXAMPLES to run the long oracle")
    run(examples=int(examples), steps=60, shrink=True)


# --------------------------------------------------------------------------
# The oracle can fail
# --------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_oracle_catches_changes_told_only_to_the_new_audience(monkeypatch: Any) -> None:
    """Break old-audience routing on purpose: every directive goes only where
    the row is now. A card that moves to another team leaves the old team's
    lists stale, and the oracle must say so."""
    from verity_django import registry

    told = registry.Change.told

    def new_audience_only(self: Any, audiences_of: Any) -> dict[Any, frozenset[str]]:
        now = frozenset(audiences_of(self.sides[-1]))
        return {side: now for side in told(self, audiences_of)}

    monkeypatch.setattr(registry.Change, "told", new_audience_only)
    # The new audience is told the old state's params (a leak) and the old
    # audience nothing (a miss): whichever the run meets first.
    with pytest.raises(AssertionError, match=r"missed \(audience|leaked \(told") as failure:
        run(examples=60, steps=30)
    assert "rows changed:" in str(failure.value)


@pytest.mark.django_db
def test_the_oracle_catches_rows_below_a_move_told_nothing(monkeypatch: Any) -> None:
    """Break path dependents on purpose: a board moved to another team tells
    nobody about the cards on it (nor a card moved to another board about
    its comments). Their old team's lists keep them, and the oracle must
    say so."""
    from verity_django import registry

    monkeypatch.setattr(registry.Dependents, "route", lambda self, *args: [])
    with pytest.raises(AssertionError, match=r"missed \(audience") as failure:
        run(examples=60, steps=30)
    # None of the rows told about changed: a board (or a card's board) did.
    moved = r"~ testapp_(board \d+: .*(team|lead)_id|card \d+: .*board_id)"
    assert re.search(moved, str(failure.value))


# --------------------------------------------------------------------------
# Single changes: paths the machine once found wanting, and known gaps
# --------------------------------------------------------------------------


def one_step(description: str, action: Callable[[], Any]) -> None:
    """One change checked by the oracle, outside the state machine."""
    before = snapshot()
    with capture_directives() as captured:
        action()
    check(description, [], before, snapshot(), captured)


@pytest.fixture
def card_with_label(db: Any) -> tuple[Card, Label]:
    with verity_django.disabled():
        board = Board.objects.create(team=Team.objects.create(name="t"), name="b")
        user = User.objects.create(username="oracle-gap")
        card = Card.objects.create(board=board, title="c", assignee=user)
        label = Label.objects.create(name="red")
        card.labels.add(label)
    return card, label


def test_deleting_a_label_tells_its_cards(card_with_label: tuple[Card, Label]) -> None:
    _, label = card_with_label
    one_step("label.delete()", label.delete)


def test_a_change_through_the_parent_class_tells_the_child(
    card_with_label: tuple[Card, Label],
) -> None:
    card, _ = card_with_label
    with verity_django.disabled():
        bug = Bug.objects.create(board=card.board, title="b", severity=2)
    parent = Card.objects.get(pk=bug.pk)
    parent.status = "done"
    one_step("Card(pk of a bug).save() with status='done'", parent.save)


@pytest.mark.django_db
def test_deleting_an_assignee_is_told(card_with_label: tuple[Card, Label]) -> None:
    card, _ = card_with_label
    one_step("user.delete() (SET_NULL assignee)", card.assignee.delete)  # type: ignore[union-attr]


def test_deleting_a_user_who_is_assignee_and_lead_is_told(db: Any) -> None:
    """Both keys are nulled by one deletion: neither may count on the other
    to keep the user a reader (found by the long run)."""
    with verity_django.disabled():
        user = User.objects.create(username="both")
        board = Board.objects.create(team=Team.objects.create(name="t"), name="b", lead=user)
        Bug.objects.create(board=board, title="c", assignee=user, severity=2)
    one_step("user.delete() (SET_NULL assignee and lead)", user.delete)


@pytest.mark.django_db
def test_the_oracle_catches_a_dropped_set_null_receiver(
    card_with_label: tuple[Card, Label], monkeypatch: Any
) -> None:
    """The same deletion with no pre_delete signal for users, so nothing can
    read the cards that SET_NULL is about to change."""
    send = pre_delete.send

    def no_user_signal(sender: Any, **kwargs: Any) -> Any:
        return [] if sender is User else send(sender, **kwargs)

    monkeypatch.setattr(pre_delete, "send", no_user_signal)
    card, _ = card_with_label
    with pytest.raises(AssertionError, match=r"missed \(audience") as failure:
        one_step("user.delete() (SET_NULL assignee)", card.assignee.delete)  # type: ignore[union-attr]
    assert "assignee_id" in str(failure.value)


def test_a_row_moving_to_another_audience_tells_its_unfiltered_lists(
    card_with_label: tuple[Card, Label],
) -> None:
    card, _ = card_with_label
    with verity_django.disabled():
        bug = Bug.objects.create(board=card.board, title="b", assignee=card.assignee)
        other = User.objects.create(username="oracle-other")
    one_step(
        "Bug.objects.filter(pk=bug).update(assignee=other)",
        lambda: Bug.objects.filter(pk=bug.pk).update(assignee=other),
    )


def test_a_held_instance_saved_after_a_rollback_is_told_by_the_rows_state(
    card_with_label: tuple[Card, Label],
) -> None:
    card, _ = card_with_label
    with verity_django.disabled():
        elsewhere = Board.objects.create(team=Team.objects.create(name="u"), name="e")
    card = Card.objects.get(pk=card.pk)
    with contextlib.suppress(RolledBack), transaction.atomic():
        card.board = elsewhere
        card.save(update_fields=["board"])
        raise RolledBack
    card.priority = 3
    one_step(
        "card.save(update_fields=['priority']) after a rolled-back move",
        lambda: card.save(update_fields=["priority"]),
    )


def test_the_oracle_catches_a_rolled_back_save_remembered(
    card_with_label: tuple[Card, Label], monkeypatch: Any
) -> None:
    """Remember every save as if it committed: the rolled-back move is taken
    as the row's board, and the oracle must see the wrong team told."""
    from verity_django import tracking

    remember = tracking.remember
    monkeypatch.setattr(
        tracking, "remember", lambda instance, values, connection=None: remember(instance, values)
    )
    with pytest.raises(AssertionError, match=r"missed \(audience|leaked \(told"):
        test_a_held_instance_saved_after_a_rollback_is_told_by_the_rows_state(card_with_label)


def test_the_reverse_m2m_side_tells_a_multi_table_child(
    card_with_label: tuple[Card, Label],
) -> None:
    card, label = card_with_label
    with verity_django.disabled():
        bug = Bug.objects.create(board=card.board, title="b", severity=2)
    one_step("label.cards.add(bug)", lambda: label.cards.add(bug))


def test_bulk_update_through_the_parent_tells_a_multi_table_child(
    card_with_label: tuple[Card, Label],
) -> None:
    card, _ = card_with_label
    with verity_django.disabled():
        bug = Bug.objects.create(board=card.board, title="b", severity=2)
    parent = Card.objects.get(pk=bug.pk)
    parent.priority = 3
    one_step(
        "Card.objects.bulk_update([bug], ['priority'])",
        lambda: Card.objects.bulk_update([parent], ["priority"]),
    )
