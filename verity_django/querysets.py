"""Directives for the bulk paths that send no model signals.

Opt in per manager::

    class Todo(models.Model):
        objects = DirectiveManager()

``update()`` reads at most ``COLLAPSE_THRESHOLD + 1`` rows first (one query)
so that small updates refresh exactly the items and params they touched;
larger ones refresh the affected collections instead of thousands of items.
Either way every audience of the rows, before and after, is told: a related
path costs one query per operation, a callable audience reads every row
before and after (see the README for what that costs). An ``update()`` or
``bulk_update()`` of rows further up others' path audiences (boards moving
to another team) tells the rows below them too (``registry.Dependents``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from django.db import connections, models, transaction
from django.db.models.expressions import Col, Combinable
from django.db.models.lookups import Exact
from django.db.models.sql.where import AND

from verity_django import batching, receivers, registry, tracking
from verity_django.audience_specs import Side
from verity_django.conf import conf
from verity_django.rules import MISSING, Routed

ModelT = TypeVar("ModelT", bound=models.Model)


class DirectiveQuerySet(models.QuerySet[ModelT]):
    def update(self, **kwargs: Any) -> int:
        of = registry.rules_for(self.model)
        if of is None or not receivers.active():
            return super().update(**kwargs)
        assignments, expressions = _assignments(self.model, kwargs)
        with transaction.atomic(using=self.db, savepoint=False):
            plans = [_Update(self, rules, assignments, expressions) for rules in of.rules]
            for child, rules in of.children:
                # The rows of this update that are also rows of the child.
                rows = child._base_manager.using(self.db).filter(
                    pk__in=self.order_by().values("pk")
                )
                plans.append(_Update(rows, rules, assignments, expressions))
            moves = _Moves(self, of.dependents, assignments, expressions)
            count = super().update(**kwargs)
            routed = [r for plan in plans for r in plan.routed()] + moves.routed()
        batching.collect(routed, using=self.db)
        return count

    def bulk_create(self, objs: Iterable[ModelT], *args: Any, **kwargs: Any) -> list[ModelT]:
        created = super().bulk_create(objs, *args, **kwargs)
        of = registry.rules_for(self.model)
        if of is not None and receivers.active():
            routed: list[Routed] = []
            values = [tracking.current(obj, of.tracked) for obj in created]
            for rules in of.rules:
                changes = [
                    rules.change("create", None, new, obj)
                    for obj, new in zip(created, values, strict=True)
                ]
                routed.extend(rules.route(changes, self.db))
            connection = connections[self.db]
            for obj, new in zip(created, values, strict=True):
                tracking.remember(obj, new, connection)
            batching.collect(routed, using=self.db)
        return created

    def bulk_update(
        self, objs: Iterable[ModelT], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        objs = list(objs)
        fields = list(fields)
        # bulk_update() runs update(); the directives come from objs instead.
        with batching.disabled():
            count = super().bulk_update(objs, fields, batch_size=batch_size)
        of = registry.rules_for(self.model)
        if of is not None and receivers.active():
            routed: list[Routed] = []
            # Only ``fields`` were written; the others keep their loaded values.
            written = [tracking.written(obj, of.tracked, fields) for obj in objs]
            for rules in of.rules:
                changes = [
                    rules.change(
                        "update",
                        tracking.previous(obj),
                        new,
                        tracking.with_values(obj, new) if rules.needs_instances else obj,
                    )
                    for obj, new in zip(objs, written, strict=True)
                ]
                routed.extend(rules.route(changes, self.db))
            olds = [tracking.previous(obj) for obj in objs]
            for child, rules in of.children:
                saved = [(obj.pk, old) for obj, old in zip(objs, olds, strict=True)]
                routed.extend(receivers.through_parent(child, rules, saved, self.db))
            moved = list(zip(olds, written, strict=True))
            for dependents in of.dependents:
                routed.extend(dependents.route(moved, self.db))
            connection = connections[self.db]
            for obj, new in zip(objs, written, strict=True):
                tracking.remember(obj, new, connection)
            batching.collect(routed, using=self.db)
        return count


class DirectiveManager(models.Manager.from_queryset(DirectiveQuerySet)):  # type: ignore[misc]
    """A manager whose bulk operations emit directives."""


class _Update:
    """One set of rules' view of an ``update()``: what it reads before the
    ``UPDATE`` (constructed) and after it (:meth:`routed`)."""

    def __init__(
        self,
        qs: models.QuerySet[Any],
        rules: registry.ModelRules,
        assignments: dict[str, Any],
        expressions: dict[str, Any],
    ) -> None:
        self.qs = qs
        self.rules = rules
        self.assignments = assignments
        tracked = rules.tracked
        # Values set by an expression are read before the update, computed by
        # the database, so that the new status or owner is known, not guessed.
        self.computed = {a: e for a, e in expressions.items() if a in tracked}
        self.aliases = {_new_value_alias(attname): attname for attname in self.computed}
        pk_attname = qs.model._meta.pk.attname
        # Ordering is irrelevant to which rows change; sorting costs.
        pre = qs.order_by()
        if self.computed:
            pre = pre.annotate(
                **{alias: self.computed[attname] for alias, attname in self.aliases.items()}
            )
        rows = pre.values_list(*tracked, *self.aliases, pk_attname)
        limit = conf.COLLAPSE_THRESHOLD
        # A callable audience is asked about every row as it was: all rows
        # are read (one query), not only the first few.
        self.rows = list(rows if rules.needs_old_instances else rows[: limit + 1])
        self.collapsing = len(self.rows) > limit
        self.audiences: frozenset[str] = frozenset()
        if self.collapsing and not rules.audience.needs_instance:
            self.audiences = _audiences_of(qs, rules, assignments, self.computed)
        # A collapsed update carries no result or key: instances are needed
        # only for the rows read one by one, or to ask a callable audience.
        self.pks: list[Any] = []
        if rules.needs_instances and (not self.collapsing or rules.needs_old_instances):
            self.pks = [row[-1] for row in self.rows]

    def routed(self) -> list[Routed]:
        """Called after the ``UPDATE``, inside its transaction."""
        rules, db = self.rules, self.qs.db
        # Callable audiences, results and keys see the rows as they are now.
        instances = _reload(self.qs.model, db, self.pks) if self.pks else {}
        if self.collapsing and not rules.audience.needs_instance:
            return rules.collapsed(self.audiences)
        changes = []
        for row in self.rows:
            old, new = _old_and_new(row, rules.tracked, self.assignments, self.aliases)
            old_instance = _loaded(self.qs.model, db, old) if rules.needs_old_instances else None
            changes.append(rules.change("update", old, new, instances.get(row[-1]), old_instance))
        if self.collapsing:
            return rules.collapsed(rules.audiences_of([s for c in changes for s in c.sides], db))
        return rules.route(changes, db)


class _Moves:
    """An ``update()``'s effect on the rows below the updated ones in path
    audiences (the cards on boards moved to another team): every updated
    row's deciding fields are read before the ``UPDATE`` (one query, none
    when the update sets none of them)."""

    def __init__(
        self,
        qs: models.QuerySet[Any],
        dependents: Iterable[registry.Dependents],
        assignments: dict[str, Any],
        expressions: dict[str, Any],
    ) -> None:
        self.db = qs.db
        self.dependents = [d for d in dependents if any(a in assignments for a in d.tracked[1:])]
        self.tracked = tuple(dict.fromkeys(a for d in self.dependents for a in d.tracked))
        self.assignments = assignments
        computed = {a: e for a, e in expressions.items() if a in self.tracked}
        self.aliases = {_new_value_alias(attname): attname for attname in computed}
        self.rows: list[Any] = []
        if self.dependents:
            pre = qs.order_by().annotate(
                **{alias: computed[attname] for alias, attname in self.aliases.items()}
            )
            self.rows = list(pre.values_list(*self.tracked, *self.aliases))

    def routed(self) -> list[Routed]:
        """Called after the ``UPDATE``, inside its transaction."""
        changes = [_old_and_new(r, self.tracked, self.assignments, self.aliases) for r in self.rows]
        return [r for dependents in self.dependents for r in dependents.route(changes, self.db)]


def _old_and_new(
    row: Any, tracked: tuple[str, ...], assignments: dict[str, Any], aliases: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A row's values before and after an ``update()``, from the values read
    before it (``tracked``, then the new values computed for ``aliases``)."""
    width = len(tracked)
    old = dict(zip(tracked, row[:width], strict=True))
    new = {name: assignments.get(name, value) for name, value in old.items()}
    for offset, attname in enumerate(aliases.values()):
        new[attname] = row[width + offset]
    return old, new


def _assignments(
    model: type[models.Model], kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """New attribute values of an ``update()`` (MISSING where an expression
    computes them), and those expressions, by attribute name."""
    out: dict[str, Any] = {}
    expressions: dict[str, Any] = {}
    for name, value in kwargs.items():
        field = model._meta.get_field(name)
        attname = field.get_attname()  # type: ignore[union-attr]
        if isinstance(value, Combinable) or hasattr(value, "resolve_expression"):
            out[attname] = MISSING
            expressions[attname] = value
        elif isinstance(value, models.Model):
            out[attname] = value.pk
        else:
            out[attname] = field.to_python(value) if not field.is_relation else value  # type: ignore[union-attr]
    return out, expressions


def _new_value_alias(attname: str) -> str:
    return f"verity_new_{attname}"


def _audiences_of(
    qs: models.QuerySet[Any],
    rules: registry.ModelRules,
    assignments: dict[str, Any],
    computed: dict[str, Any],
) -> frozenset[str]:
    """Every audience the rows of ``qs`` belong to, before and after the
    update, from the distinct values of the fields that decide them."""
    attnames = list(rules.audience.tracked)
    set_now = {a: assignments[a] for a in attnames if a in assignments and a not in computed}
    sides = [Side(set_now)] if set_now else []
    pinned = _pinned(qs, attnames)
    if pinned is not None and not any(a in computed for a in attnames):
        # filter(owner=alice): the audience is in the query; no need to ask.
        return rules.audiences_of([*sides, Side(pinned)], qs.db)
    if not attnames:
        return rules.audiences_of([Side({})], qs.db)
    reads = [a for a in attnames if a in computed]
    distinct = qs.order_by()
    if reads:
        distinct = distinct.annotate(**{_new_value_alias(a): computed[a] for a in reads})
    columns = [*attnames, *map(_new_value_alias, reads)]
    for row in distinct.values_list(*columns).distinct():
        sides.append(Side(dict(zip(attnames, row, strict=False))))
        if reads:
            sides.append(Side(dict(zip(reads, row[len(attnames) :], strict=True))))
    return rules.audiences_of(sides, qs.db)


def _pinned(qs: models.QuerySet[Any], attnames: list[str]) -> dict[str, Any] | None:
    """The values the query's WHERE fixes with ``=`` for all of ``attnames``."""
    where = qs.query.where
    if not attnames or where.negated or where.connector != AND:
        return None
    table = qs.model._meta.db_table
    pinned: dict[str, Any] = {}
    for child in where.children:
        if (
            isinstance(child, Exact)
            and isinstance(child.lhs, Col)
            and child.lhs.alias == table
            and child.lhs.target.attname in attnames
            and not hasattr(child.rhs, "resolve_expression")
        ):
            pinned.setdefault(child.lhs.target.attname, child.rhs)
    return pinned if len(pinned) == len(attnames) else None


def _loaded(model: type[models.Model], using: str, values: dict[str, Any]) -> Any:
    """An instance holding ``values``, as the row was before the update."""
    names = [f.attname for f in model._meta.concrete_fields if f.attname in values]
    return model.from_db(using, names, [values[name] for name in names])


def _reload(model: type[models.Model], using: str, pks: list[Any]) -> dict[Any, Any]:
    manager = model._base_manager.using(using)
    out: dict[Any, Any] = {}
    # Chunks keep each IN list under every backend's parameter limit.
    for start in range(0, len(pks), 500):
        for instance in manager.filter(pk__in=pks[start : start + 500]):
            out[instance.pk] = instance
    return out


__all__ = ["DirectiveManager", "DirectiveQuerySet"]
