"""Directives for the bulk paths that send no model signals.

Opt in per manager::

    class Todo(models.Model):
        objects = DirectiveManager()

``update()`` reads at most ``COLLAPSE_THRESHOLD + 1`` rows first (one query)
so that small updates refresh exactly the items and params they touched;
larger ones refresh the affected collections instead of thousands of items.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from django.db import models, transaction
from django.db.models.expressions import Col, Combinable
from django.db.models.lookups import Exact
from django.db.models.sql.where import AND

from verity_django import batching, registry, tracking
from verity_django.conf import conf
from verity_django.rules import MISSING, Routed

ModelT = TypeVar("ModelT", bound=models.Model)


class DirectiveQuerySet(models.QuerySet[ModelT]):
    def update(self, **kwargs: Any) -> int:
        bound = registry.get(self.model)
        if bound is None or not registry._active():
            return super().update(**kwargs)
        limit = conf.COLLAPSE_THRESHOLD
        tracked = bound.tracked
        assignments, expressions = _assignments(self.model, kwargs)
        # Values set by an expression are read before the update, computed by
        # the database, so that the new status or owner is known, not guessed.
        computed = {a: e for a, e in expressions.items() if a in tracked}
        aliases = {_new_value_alias(attname): attname for attname in computed}
        needs_instances = bound.needs_instances
        pk_attname = self.model._meta.pk.attname
        with transaction.atomic(using=self.db, savepoint=False):
            # Ordering is irrelevant to which rows change; sorting costs.
            pre = self.order_by()
            if computed:
                pre = pre.annotate(
                    **{alias: computed[attname] for alias, attname in aliases.items()}
                )
            columns = [*tracked, *aliases, *([pk_attname] if needs_instances else [])]
            rows = list(pre.values_list(*columns)[: limit + 1])
            collapsing = len(rows) > limit
            audiences = None
            if collapsing:
                audiences = _audiences_of(self, bound, assignments, computed)
            pks: list[Any] = []
            if needs_instances:
                pks = (
                    list(self.order_by().values_list(pk_attname, flat=True))
                    if collapsing
                    else [row[-1] for row in rows]
                )
            count = super().update(**kwargs)
            # Callable audiences, results and keys see the rows as they are now.
            instances = _reload(self.model, self.db, pks) if pks else {}
        routed: list[Routed] = []
        if collapsing:
            assert audiences is not None
            for instance in instances.values():
                audiences |= bound.audiences(None, None, instance)
            routed = bound.collapsed(frozenset(audiences))
        else:
            width = len(tracked)
            for row in rows:
                old = dict(zip(tracked, row[:width], strict=True))
                new = {name: assignments.get(name, value) for name, value in old.items()}
                for offset, attname in enumerate(aliases.values()):
                    new[attname] = row[width + offset]
                instance = instances.get(row[-1]) if needs_instances else None
                routed.extend(bound.changes("update", old, new, instance))
        batching.collect(routed, using=self.db)
        return count

    def bulk_create(self, objs: Iterable[ModelT], *args: Any, **kwargs: Any) -> list[ModelT]:
        created = super().bulk_create(objs, *args, **kwargs)
        bound = registry.get(self.model)
        if bound is not None and registry._active():
            routed: list[Routed] = []
            for obj in created:
                values = tracking.current(obj, bound.tracked)
                routed.extend(bound.changes("create", None, values, obj))
                tracking.remember(obj, values)
            batching.collect(routed, using=self.db)
        return created

    def bulk_update(
        self, objs: Iterable[ModelT], fields: Iterable[str], batch_size: int | None = None
    ) -> int:
        objs = list(objs)
        # bulk_update() runs update(); the directives come from objs instead.
        with batching.disabled():
            count = super().bulk_update(objs, fields, batch_size=batch_size)
        bound = registry.get(self.model)
        if bound is not None and registry._active():
            routed: list[Routed] = []
            for obj in objs:
                new = tracking.current(obj, bound.tracked)
                routed.extend(bound.changes("update", tracking.previous(obj), new, obj))
                tracking.remember(obj, new)
            batching.collect(routed, using=self.db)
        return count


class DirectiveManager(models.Manager.from_queryset(DirectiveQuerySet)):  # type: ignore[misc]
    """A manager whose bulk operations emit directives."""


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
    bound: registry.ModelRules,
    assignments: dict[str, Any],
    computed: dict[str, Any],
) -> set[str]:
    """Every audience the rows of ``qs`` belong to, before and after the update."""
    attnames = [attname for attname, _ in bound.audience_fields]
    new = {a: assignments[a] for a in attnames if a in assignments and a not in computed}
    out: set[str] = set(bound.audiences(None, new, None))
    pinned = _pinned(qs, attnames)
    if pinned is not None and not any(a in computed for a in attnames):
        # filter(owner=alice): the audience is in the query; no need to ask.
        return out | bound.audiences(pinned, None, None)
    if not attnames:
        return out
    reads = [a for a in attnames if a in computed]
    distinct = qs.order_by()
    if reads:
        distinct = distinct.annotate(**{_new_value_alias(a): computed[a] for a in reads})
    columns = [*attnames, *map(_new_value_alias, reads)]
    for row in distinct.values_list(*columns).distinct():
        values = dict(zip(attnames, row, strict=False))
        after = dict(zip(reads, row[len(attnames) :], strict=True))
        out |= bound.audiences(values, after, None)
    return out


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


def _reload(model: type[models.Model], using: str, pks: list[Any]) -> dict[Any, Any]:
    manager = model._base_manager.using(using)
    out: dict[Any, Any] = {}
    # Chunks keep each IN list under every backend's parameter limit.
    for start in range(0, len(pks), 500):
        for instance in manager.filter(pk__in=pks[start : start + 500]):
            out[instance.pk] = instance
    return out


__all__ = ["DirectiveManager", "DirectiveQuerySet"]
