"""The signal receivers that turn model changes into directives.

Each receiver is connected per sender with a ``dispatch_uid``, for the models
that have rules (and their proxies and multi-table children), so models
without rules pay nothing. ``raw=True`` saves (fixture loading) emit
nothing. Some changes send no signal of their own and are covered here too:

- ``on_delete=SET_NULL``/``SET_DEFAULT``/``SET(...)``: Django's collector
  updates the referring rows with one ``UPDATE``; a ``pre_delete`` receiver
  on the referenced model reads their tracked values first (one query per
  relation) and emits them as updates, collected into the deleting
  transaction so that they roll back with it;
- deleting the target of a declared m2m (a label) deletes its links with no
  ``m2m_changed``: the same receiver updates the rows it was linked to;
- a save through a multi-table parent (a ``Card`` that is also a ``Bug``)
  writes the child's row too: the child's own rules run, with the child
  row read in one query;
- ``refresh_from_db()``: see :func:`_resnapshot_on_refresh_from_db`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections, models
from django.db.models.signals import m2m_changed, post_delete, post_init, post_save, pre_delete

from verity_django import batching, tracking
from verity_django.conf import conf
from verity_django.rules import MISSING, Routed

if TYPE_CHECKING:
    from verity_django.registry import Dependents, ModelRules, RulesOf

_connected: list[tuple[Any, Any, str]] = []
_CLEARING = "_verity_clearing"


def active() -> bool:
    return conf.ENABLED and not batching.is_disabled()


def install(
    applicable: Iterable[RulesOf],
    registered: Iterable[ModelRules],
    models_: Sequence[type[models.Model]],
) -> None:
    """Connect the receivers for the current rules, replacing earlier ones."""
    for signal, sender, uid in _connected:
        signal.disconnect(sender=sender, dispatch_uid=uid)
    _connected.clear()
    for of in applicable:
        model = of.model
        _connect(post_init, functools.partial(_on_post_init, of), model, "post_init")
        _connect(post_save, functools.partial(_on_post_save, of), model, "post_save")
        _connect(post_delete, functools.partial(_on_post_delete, of), model, "post_delete")
        _resnapshot_on_refresh_from_db(model)
    # A relation declared on a multi-table parent is the children's too.
    children = {of.model: tuple(rules for _, rules in of.children) for of in applicable}
    for rules in registered:
        for rel in rules.relations:
            handler = functools.partial(_on_m2m_changed, rules, children.get(rules.model, ()), rel)
            _connect(m2m_changed, handler, rel.remote_field.through, f"m2m.{rel.name}")
    # Each model's own rows only: its proxies and children would repeat them.
    upstream = {
        of.model: own
        for of in applicable
        if (own := tuple(dep for dep in of.dependents if dep.model is of.model))
    }
    for referenced, effects in _deletion_effects(registered, models_, children, upstream).items():
        handler = functools.partial(_on_pre_delete, tuple(effects))
        _connect(pre_delete, handler, referenced, "pre_delete")


def _connect(signal: Any, handler: Any, sender: Any, name: str) -> None:
    uid = f"verity_django.{name}.{sender._meta.label_lower}"
    signal.connect(handler, sender=sender, weak=False, dispatch_uid=uid)
    _connected.append((signal, sender, uid))


def _on_post_init(of: RulesOf, sender: Any, instance: models.Model, **kwargs: Any) -> None:
    if conf.ENABLED:
        tracking.snapshot(instance, of.tracked)


def _on_post_save(
    of: RulesOf,
    sender: Any,
    instance: models.Model,
    created: bool,
    raw: bool = False,
    using: str | None = None,
    update_fields: Iterable[str] | None = None,
    **kwargs: Any,
) -> None:
    if not conf.ENABLED:
        return
    # With update_fields only those fields were written; the others keep
    # the values the database still holds.
    new = tracking.written(instance, of.tracked, None if created else update_fields)
    db = using or DEFAULT_DB_ALIAS
    connection = connections[db]
    if raw or batching.is_disabled():
        tracking.remember(instance, new, connection)
        return
    event = "create" if created else "update"
    old = None if created else tracking.previous(instance)
    routed: list[Routed] = []
    plain: list[ModelRules] = []
    for rules in of.rules:
        if rules.routes_by_values:
            plain.append(rules)
            continue
        now = tracking.with_values(instance, new) if rules.needs_instances else instance
        routed.extend(rules.route([rules.change(event, old, new, now)], db))
    if not created:
        for child, rules in of.children:
            routed.extend(through_parent(child, rules, [(instance.pk, old)], db))
        for dependents in of.dependents:
            routed.extend(dependents.route([(old, new)], db))
    # Remembered first: on commit the snapshot's marker then runs before the
    # batch's callbacks, so a snapshot read from one of those counts as
    # committed.
    tracking.remember(instance, new, connection)
    for rules in plain:
        batching.collect_plain(rules, (event, old, new), connection)
    if routed:
        batching.collect(routed, using=db)


def through_parent(
    child: type[models.Model],
    rules: ModelRules,
    saved: Sequence[tuple[Any, Mapping[str, Any] | None]],
    using: str,
) -> list[Routed]:
    """The child's rules for writes of its parent's rows (``(pk, old values)``
    each): the rows that are also the child's are read in one query per 500,
    and the others are not the child's concern."""
    olds = dict(saved)
    pks = list(olds)
    manager = child._base_manager.using(using)
    changes = []
    for start in range(0, len(pks), 500):
        for row in manager.filter(pk__in=pks[start : start + 500]):
            now = tracking.current(row, rules.tracked)
            old = olds.get(row.pk) or {}
            before = {**now, **{k: v for k, v in old.items() if k in now}}
            loaded = tracking.with_values(row, before) if rules.needs_old_instances else None
            changes.append(rules.change("update", before, now, row, loaded))
    return rules.route(changes, using)


def _on_post_delete(
    of: RulesOf, sender: Any, instance: models.Model, using: str | None = None, **kwargs: Any
) -> None:
    if not active():
        return
    # What the database held, not unsaved edits made before delete().
    old = tracking.previous(instance) or tracking.current(instance, of.tracked)
    db = using or DEFAULT_DB_ALIAS
    routed: list[Routed] = []
    for rules in of.rules:
        if rules.routes_by_values:
            batching.collect_plain(rules, ("delete", old, None), connections[db])
        else:
            routed.extend(rules.route([rules.change("delete", old, None, instance)], db))
    batching.collect(routed, using=db)


def _on_m2m_changed(
    rules: ModelRules,
    children: tuple[ModelRules, ...],
    rel: models.ManyToManyField[Any, Any],
    sender: Any,
    instance: models.Model,
    action: str,
    reverse: bool,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    """A relation change counts as an update of the rows on the side that
    declares it: ``card.labels.add(label)`` of that card, and
    ``label.cards.add(card)`` of those cards, read in one query."""
    if not active():
        return
    db = using or DEFAULT_DB_ALIAS
    if reverse and action == "pre_clear":
        instance.__dict__[f"{_CLEARING}.{rel.name}"] = _linked(rel, instance, db)
        return
    if action not in ("post_add", "post_remove", "post_clear"):
        return
    if not reverse:
        values = tracking.previous(instance) or tracking.current(instance, rules.tracked)
        change = rules.change("update", values, values, instance, instance)
        routed = rules.route([change], db)
        for child in children:
            routed.extend(_relinked(child, db, {instance.pk}))
        batching.collect(routed, using=using)
        return
    if action == "post_clear":
        pk_set = instance.__dict__.pop(f"{_CLEARING}.{rel.name}", None)
    if pk_set is None:
        # Cleared while verity was off for pre_clear: which rows is unknown.
        pk_set = set()
    pks = pk_set
    batching.collect([r for x in (rules, *children) for r in _relinked(x, db, pks)], using=using)


def _relinked(rules: ModelRules, using: str, pks: Iterable[Any]) -> list[Routed]:
    """An update of the rows with ``pks``, whose links changed."""
    changes = [
        rules.change("update", values, values, row, row) for values, row in _rows(rules, using, pks)
    ]
    return rules.route(changes, using)


def _linked(rel: models.ManyToManyField[Any, Any], target: models.Model, using: str) -> set[Any]:
    """The pks of the declaring side's rows linked to ``target``."""
    through: Any = rel.remote_field.through
    source = through._meta.get_field(rel.m2m_field_name()).attname
    reverse = through._meta.get_field(rel.m2m_reverse_field_name()).name
    linked = through._base_manager.using(using).filter(**{reverse: target})
    return set(linked.values_list(source, flat=True))


def _rows(rules: ModelRules, using: str, pks: Iterable[Any]) -> list[tuple[dict[str, Any], Any]]:
    """Tracked values of the rows with ``pks`` (and the rows themselves where
    rules need instances), in one query per 500 rows."""
    manager = rules.model._base_manager.using(using)
    pks = list(pks)
    out: list[tuple[dict[str, Any], Any]] = []
    for start in range(0, len(pks), 500):
        rows = manager.filter(pk__in=pks[start : start + 500])
        if rules.needs_instances:
            out.extend((tracking.current(row, rules.tracked), row) for row in rows)
        else:
            out.extend(
                (dict(zip(rules.tracked, values, strict=True)), None)
                for values in rows.values_list(*rules.tracked)
            )
    return out


@dataclass(frozen=True)
class _SetsForeignKey:
    """Deleting the referenced row sets ``fk`` of the rows pointing at it."""

    fk: Any
    rules: ModelRules
    replacement: Any

    def routed(self, deleted: models.Model, using: str) -> list[Routed]:
        referred = getattr(deleted, self.fk.target_field.attname, None)
        if referred is None:
            return []
        rules, attname = self.rules, self.fk.attname
        new_value = _replacement_value(self.replacement, self.fk)
        rows = rules.model._base_manager.using(using).order_by().filter(**{attname: referred})
        changes = []
        if rules.needs_instances:
            for row in rows:
                old = tracking.current(row, rules.tracked)
                new = {**old, attname: new_value}
                changes.append(
                    rules.change("update", old, new, tracking.with_values(row, new), row)
                )
        else:
            for values in rows.values_list(*rules.tracked):
                old = dict(zip(rules.tracked, values, strict=True))
                changes.append(rules.change("update", old, {**old, attname: new_value}))
        return rules.route(changes, using)


@dataclass(frozen=True)
class _Unlinks:
    """Deleting the target of a declared m2m deletes its links with no
    ``m2m_changed``: the rows it was linked to are updated."""

    rel: Any
    rules: tuple[ModelRules, ...]

    def routed(self, deleted: models.Model, using: str) -> list[Routed]:
        linked = _linked(self.rel, deleted, using)
        return [r for rules in self.rules for r in _relinked(rules, using, linked)]


@dataclass(frozen=True)
class _SetsUpstreamKey:
    """Deleting the referenced row sets ``fk`` of rows further up others'
    path audiences (a board's team): the rows below them move."""

    fk: Any
    dependents: tuple[Dependents, ...]
    replacement: Any

    def routed(self, deleted: models.Model, using: str) -> list[Routed]:
        referred = getattr(deleted, self.fk.target_field.attname, None)
        if referred is None:
            return []
        attname, model = self.fk.attname, self.dependents[0].model
        tracked = tuple(dict.fromkeys(a for dep in self.dependents for a in dep.tracked))
        new_value = _replacement_value(self.replacement, self.fk)
        rows = model._base_manager.using(using).order_by().filter(**{attname: referred})
        changes = []
        for values in rows.values_list(*tracked):
            old = dict(zip(tracked, values, strict=True))
            changes.append((old, {**old, attname: new_value}))
        return [
            r
            for dep in self.dependents
            for r in dep.route(changes, using, _also_set(dep.rules.model, deleted))
        ]


def _also_set(model: type[models.Model], deleted: models.Model) -> Any:
    """What deleting ``deleted`` sets in a row of ``model``: its own keys to
    the deleted row with a setting ``on_delete``."""
    keys = []
    fk: Any
    for fk in model._meta.concrete_fields:
        if not (fk.is_relation and fk.many_to_one):
            continue
        if fk.related_model._meta.concrete_model is not deleted._meta.concrete_model:
            continue
        replacement = _replacement(fk)
        if replacement is not MISSING:
            referred = getattr(deleted, fk.target_field.attname, None)
            keys.append((fk.attname, referred, _replacement_value(replacement, fk)))
    if not keys:
        return None

    def also(values: dict[str, Any]) -> dict[str, Any]:
        changed = {a: new for a, referred, new in keys if values.get(a, MISSING) == referred}
        return {**values, **changed} if changed else values

    return also


_Effect = _SetsForeignKey | _Unlinks | _SetsUpstreamKey


def _on_pre_delete(
    effects: tuple[_Effect, ...],
    sender: Any,
    instance: models.Model,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    """Collected into the deleting transaction, so they roll back with it."""
    if not active():
        return
    db = using or DEFAULT_DB_ALIAS
    batching.collect([r for effect in effects for r in effect.routed(instance, db)], using=using)


def _deletion_effects(
    registered: Iterable[ModelRules],
    models_: Sequence[type[models.Model]],
    children: Mapping[type[models.Model], tuple[ModelRules, ...]],
    upstream: Mapping[type[models.Model], tuple[Dependents, ...]],
) -> dict[type[models.Model], list[_Effect]]:
    """For each model whose delete changes rows of registered models without
    a signal: foreign keys with a setting ``on_delete`` (of registered models,
    and of models further up a path audience), and declared m2m."""
    out: dict[type[models.Model], list[_Effect]] = {}

    def on_delete_of(referenced: Any, effect: _Effect) -> None:
        # A proxy's delete is sent with the proxy as sender.
        for model in models_:
            if model._meta.concrete_model is referenced._meta.concrete_model:
                out.setdefault(model, []).append(effect)

    for rules in registered:
        for fk in rules.model._meta.concrete_fields:
            if fk.is_relation and fk.many_to_one:
                replacement = _replacement(fk)
                if replacement is not MISSING:
                    on_delete_of(fk.related_model, _SetsForeignKey(fk, rules, replacement))
        for rel in rules.relations:
            told = (rules, *children.get(rules.model, ()))
            on_delete_of(rel.related_model, _Unlinks(rel, told))
    for model, dependents in upstream.items():
        for fk in model._meta.concrete_fields:
            reading = tuple(dep for dep in dependents if fk.attname in dep.tracked[1:])
            if reading and fk.is_relation and fk.many_to_one:
                replacement = _replacement(fk)
                if replacement is not MISSING:
                    on_delete_of(fk.related_model, _SetsUpstreamKey(fk, reading, replacement))
    return out


def _replacement(fk: Any) -> Any:
    """What ``on_delete`` sets the foreign key to, or MISSING if it sets nothing."""
    on_delete = fk.remote_field.on_delete
    if on_delete is models.SET_NULL:
        return None
    if on_delete is models.SET_DEFAULT:
        return _Default
    deconstruct = getattr(on_delete, "deconstruct", None)
    if deconstruct is not None:
        path, args, _ = deconstruct()
        if path == "django.db.models.SET" and args:
            return args[0]
    return MISSING


class _Default:
    pass


def _replacement_value(replacement: Any, fk: Any) -> Any:
    if replacement is _Default:
        value = fk.get_default()
    elif callable(replacement):
        value = replacement()
    else:
        value = replacement
    return getattr(value, "pk", value)


def _resnapshot_on_refresh_from_db(model: type[models.Model]) -> None:
    """Take a new snapshot when ``refresh_from_db()`` reads the row again.

    Django has no public hook for it: the instance it reads (and sends
    ``post_init`` for) is a temporary one whose values are copied over. So
    this wraps the model's ``refresh_from_db`` once; the wrapper only
    updates the snapshot of an instance that has one. This is the one place
    that touches a model class.
    """
    original = model.refresh_from_db
    if getattr(original, "_verity_wraps", None) is not None:
        return

    @functools.wraps(original)
    def refresh_from_db(
        self: models.Model, using: str | None = None, fields: Any = None, **kwargs: Any
    ) -> None:
        original(self, using=using, fields=fields, **kwargs)
        tracking.refreshed(self, fields)

    refresh_from_db._verity_wraps = original  # type: ignore[attr-defined]
    model.refresh_from_db = refresh_from_db  # type: ignore[method-assign, assignment]
