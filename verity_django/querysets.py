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
from django.db.models.expressions import Combinable

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
        with transaction.atomic(using=self.db, savepoint=False):
            rows = list(self.values_list(*tracked)[: limit + 1])
            audiences = None
            if len(rows) > limit and bound.audience_fields:
                audiences = _audiences_of(self, bound)
            count = super().update(**kwargs)
        routed: list[Routed] = []
        if len(rows) > limit:
            routed = bound.collapsed(audiences)
        else:
            assignments = _assignments(self.model, kwargs)
            for row in rows:
                old = dict(zip(tracked, row, strict=True))
                new = {name: assignments.get(name, value) for name, value in old.items()}
                routed.extend(bound.changes("update", old, new))
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


def _assignments(model: type[models.Model], kwargs: dict[str, Any]) -> dict[str, Any]:
    """New attribute values of an ``update()``; expressions are unknown."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        field = model._meta.get_field(name)
        attname = field.get_attname()  # type: ignore[union-attr]
        if isinstance(value, Combinable) or hasattr(value, "resolve_expression"):
            out[attname] = MISSING
        elif isinstance(value, models.Model):
            out[attname] = value.pk
        else:
            out[attname] = field.to_python(value) if not field.is_relation else value  # type: ignore[union-attr]
    return out


def _audiences_of(qs: models.QuerySet[Any], bound: registry.ModelRules) -> frozenset[str]:
    attnames = [attname for attname, _ in bound.audience_fields]
    values: set[tuple[Any, ...]] = set(qs.order_by().values_list(*attnames).distinct())
    rows = [dict(zip(attnames, v, strict=True)) for v in values]
    out: set[str] = set(bound.audience_constants)
    for row in rows:
        out |= bound.audiences(row, None, None)
    return frozenset(out)


__all__ = ["DirectiveManager", "DirectiveQuerySet"]
