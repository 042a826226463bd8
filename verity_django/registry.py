"""Which models produce directives, and their rules bound at start-up.

Rules come from a model's ``class Meta`` (``directives``,
``directive_audience``, ``directive_relations``) or from :func:`register` for
models you do not own. They are bound to concrete attribute names once, at
start-up. A rule with an error is a system check error on the model, and it
also stops the app from loading (``ImproperlyConfigured`` naming the check
IDs): servers such as uvicorn and gunicorn never run system checks, and a
model whose directives silently vanished would be worse than no start.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar, overload

from django.apps import apps
from django.core import checks
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.db import models

from verity_django import directives as d
from verity_django import receivers, tracking
from verity_django.audience_specs import AudienceList, FieldAudience, Resolved, Side, parse
from verity_django.conf import conf
from verity_django.rules import (
    BOTH,
    EVENTS,
    MISSING,
    NEW,
    OLD,
    RULE_TYPES,
    Bound,
    PlainChange,
    Routed,
)

ModelT = TypeVar("ModelT", bound=type[models.Model])
AudienceSpec = Any


@dataclass(frozen=True)
class Declaration:
    directives: Sequence[Any]
    audience: AudienceSpec = None
    relations: Sequence[str] = ()


@dataclass(frozen=True)
class Change:
    """One row's change: values when loaded (None on create), values now
    (None on delete), and the instance in each state where rules need it."""

    event: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    instance: Any = None
    old_instance: Any = None
    sides: tuple[Side, ...] = field(init=False)

    def __post_init__(self) -> None:
        sides = []
        if self.old is not None:
            loaded = self.instance if self.event == "delete" else self.old_instance
            sides.append(Side(self.old, loaded))
        if self.new is not None:
            sides.append(Side(self.new, self.instance))
        object.__setattr__(self, "sides", tuple(sides))

    def told(self, audiences_of: Resolved) -> dict[int, frozenset[str]]:
        """The audiences of the loaded state, of the state now, and of both."""
        old: frozenset[str] = frozenset()
        new: frozenset[str] = frozenset()
        if self.old is not None:
            old = frozenset(audiences_of(self.sides[0]))
        if self.new is not None:
            new = frozenset(audiences_of(self.sides[-1]))
        return {OLD: old, NEW: new, BOTH: old | new}


@dataclass(eq=False)
class ModelRules:
    """A model's rules, bound to attribute names and ready to evaluate."""

    model: type[models.Model]
    rules: tuple[Bound, ...]
    audience: AudienceList
    relations: tuple[models.ManyToManyField[Any, Any], ...]
    tracked: tuple[str, ...]
    errors: list[checks.CheckMessage] = field(default_factory=list)

    # Cached: asked on every save (bench W4: 17 Python calls per save down to
    # 1), and the rules of a ModelRules never change.
    @cached_property
    def needs_instances(self) -> bool:
        """Whether rows read as plain values are not enough to route a change."""
        return self.audience.needs_instance or any(b.needs_instance for b in self.rules)

    @cached_property
    def needs_old_instances(self) -> bool:
        """Whether the instance as it was loaded decides an audience (a callable)."""
        return self.audience.needs_instance

    def change(
        self,
        event: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        instance: Any = None,
        old_instance: Any = None,
    ) -> Change:
        if old_instance is None and event == "update" and self.needs_old_instances:
            old_instance = tracking.as_loaded(instance) if old is not None else None
        return Change(event, old, new, instance, old_instance)

    @cached_property
    def routes_by_values(self) -> bool:
        """Whether a change's directives follow from its tracked values alone
        (no instance, no query): such changes can be routed when their
        transaction commits, all at once (``route_plain``)."""
        return not self.needs_instances and not self.audience.reads_other_rows

    def route(self, changes: Sequence[Change], using: str) -> list[Routed]:
        """The directives of ``changes`` and who is told: every audience the
        row had or has, resolved for all the changes at once."""
        if len(changes) > 1 and self.routes_by_values:
            return self.route_plain([(c.event, c.old, c.new) for c in changes], using)
        audiences_of = self.audience.resolve([s for c in changes for s in c.sides], using)
        routed: list[Routed] = []
        for change in changes:
            told = change.told(audiences_of)
            views: list[_View] = [(change.event, change.old, change.new, told)]
            if change.event == "update" and told[OLD] != told[NEW]:
                views += _moves(change.old, change.new, told[OLD], told[NEW])
            routed += self._evaluate(views, change.instance, told[NEW], change.event)
        return routed

    def route_plain(self, changes: Sequence[PlainChange], using: str) -> list[Routed]:
        """What :meth:`route` gives for rules that route by values alone,
        merged per directive.

        Many rows of one operation share most of what decides their
        directives (a status, an owner), so each rule is evaluated once per
        distinct state of the fields it reads, and each audience set once
        per distinct state of the audience's fields. A rule whose items
        will collapse anyway (more than ``COLLAPSE_THRESHOLD`` rows) is not
        evaluated row by row: its collections go to every audience the
        items had (bench W4: 200 saves in one transaction). A refused value
        is reported once per distinct state.
        """
        if len(changes) == 1:
            # Nothing to share: the plain evaluation is cheaper (bench W1).
            [(event, old, new)] = changes
            return self.route([self.change(event, old, new)], using)
        audiences_of = self.audience.resolve((), using)
        audience_key = _key_of(self.audience.tracked)
        threshold = conf.COLLAPSE_THRESHOLD
        crowded = {
            index: set[str]()
            for index, bound in enumerate(self.rules)
            if bound.crowds(changes, threshold)
        }
        evaluated: list[dict[Any, list[_Evaluation]]] = [{} for _ in self.rules]
        views_of: dict[Any, list[_PlainView]] = {}
        merged: dict[tuple[Any, ...], tuple[d.Directive, set[str], tuple[str, ...]]] = {}
        applicable = self._applicable_rules
        decisive = self._decisive_key(crowded)
        decided_states: set[Any] = set()
        for event, old, new in changes:
            try:
                decided = (
                    event,
                    _ABSENT if old is None else decisive(old),
                    _ABSENT if new is None else decisive(new),
                )
                if decided in decided_states:
                    continue
                decided_states.add(decided)
            except (KeyError, TypeError):
                pass
            try:
                state = (
                    event,
                    _ABSENT if old is None else audience_key(old),
                    _ABSENT if new is None else audience_key(new),
                )
                views = views_of.get(state)
            except (KeyError, TypeError):
                state, views = None, None
            if views is None:
                views = _plain_views(event, old, new, audiences_of)
                if state is not None:
                    views_of[state] = views
            for view_event, has_old, has_new, to in views:
                view_old = old if has_old else None
                view_new = new if has_new else None
                for index, bound, key in applicable[view_event]:
                    spread = crowded.get(index)
                    if spread is not None:
                        if bound.gives_item(view_event, view_new):
                            spread |= to[BOTH]
                        continue
                    try:
                        seen = (
                            view_event,
                            _ABSENT if view_old is None else key(view_old),
                            _ABSENT if view_new is None else key(view_new),
                        )
                        out = evaluated[index].get(seen)
                    except (KeyError, TypeError):
                        seen, out = None, None
                    if out is None:
                        out = [
                            (x, x.identity, collapse_to, side)
                            for x, collapse_to, side in bound.evaluate(
                                view_event, view_old, view_new
                            )
                        ]
                        if seen is not None:
                            evaluated[index][seen] = out
                    for directive, identity, collapse_to, side in out:
                        audiences = to.get(side, _NOBODY)
                        if not audiences and view_event != event:
                            continue
                        entry = merged.get(identity)
                        if entry is None:
                            merged[identity] = (directive, set(audiences), collapse_to)
                        else:
                            entry[1].update(audiences)
        routed = [Routed(x, frozenset(a), collapse_to) for x, a, collapse_to in merged.values()]
        for index, spread in crowded.items():
            bound = self.rules[index]
            told = frozenset(spread)
            routed += [
                Routed(d.refresh_collection(name), told, crowds=bound.rule.name)
                for name in bound.collapse_names
            ]
        return routed

    def _decisive_key(self, crowded: Container[int]) -> Callable[[Mapping[str, Any]], Any]:
        """The key of the values that decide what a change adds in
        :meth:`route_plain`: those its audiences and its uncrowded rules
        read. A change equal in them to an earlier one adds only audiences
        already added."""
        names = {*self.audience.tracked}
        for index, bound in enumerate(self.rules):
            if index not in crowded:
                names.update(bound.tracked)
        return _key_of(tuple(sorted(names)))

    @cached_property
    def _applicable_rules(
        self,
    ) -> dict[str, tuple[tuple[int, Bound, Callable[[Mapping[str, Any]], Any]], ...]]:
        """Per event, the rules it can fire, each with the key of the values
        its evaluation reads."""
        return {
            event: tuple(
                (index, bound, _key_of(bound.tracked))
                for index, bound in enumerate(self.rules)
                if event in bound.events
            )
            for event in EVENTS
        }

    def moved(
        self,
        values: Mapping[str, Any],
        instance: Any,
        before: frozenset[str],
        after: frozenset[str],
    ) -> list[Routed]:
        """A row whose own values stayed while its audiences changed (its
        board moved to another team): told as if its own field had moved it."""
        if before == after:
            return []
        return self._evaluate(_moves(values, values, before, after), instance, after, None)

    def _evaluate(
        self, views: list[_View], instance: Any, now: frozenset[str], event: str | None
    ) -> list[Routed]:
        routed: list[Routed] = []
        for view_event, old, new, to in views:
            for bound in self.rules:
                for directive, collapse_to, side in bound.evaluate(view_event, old, new, instance):
                    audiences = to.get(side, frozenset())
                    if not audiences and view_event != event:
                        continue
                    # The object's data goes only where the object is now.
                    current = None if directive.result is None else now
                    routed.append(Routed(directive, audiences, collapse_to, current))
        return routed

    def audiences_of(self, sides: Sequence[Side], using: str) -> frozenset[str]:
        audiences_of = self.audience.resolve(sides, using)
        return frozenset(a for side in sides for a in audiences_of(side))

    def collapsed(self, audiences: frozenset[str]) -> list[Routed]:
        """Directives for a change to rows we did not read one by one."""
        names = dict.fromkeys(n for bound in self.rules for n in bound.collapse_names)
        return [Routed(d.refresh_collection(n), audiences) for n in names]


_View = tuple[str, Mapping[str, Any] | None, Mapping[str, Any] | None, Mapping[int, frozenset[str]]]
# (event, whether the old values count, whether the new ones do, who is told).
_PlainView = tuple[str, bool, bool, Mapping[int, frozenset[str]]]
_Evaluation = tuple[d.Directive, tuple[Any, ...], tuple[str, ...], int]
_NOBODY: frozenset[str] = frozenset()
_ABSENT = object()


def _key_of(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    """The values of ``names`` in a row's values, as one hashable key."""
    if not names:
        return lambda values: ()
    return operator.itemgetter(*names)


def _plain_views(
    event: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    audiences_of: Resolved,
) -> list[_PlainView]:
    """The views :meth:`ModelRules.route` evaluates a change in, by which of
    its values each reads."""
    before = _NOBODY if old is None else frozenset(audiences_of(Side(old)))
    after = _NOBODY if new is None else frozenset(audiences_of(Side(new)))
    views: list[_PlainView] = [(event, True, True, {OLD: before, NEW: after, BOTH: before | after})]
    if event == "update" and before != after:
        entered, left = _moved_audiences(before, after)
        views += [("create", False, True, entered), ("delete", True, False, left)]
    return views


def _moves(
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    before: frozenset[str],
    after: frozenset[str],
) -> list[_View]:
    entered, left = _moved_audiences(before, after)
    return [("create", None, new, entered), ("delete", old, None, left)]


def _moved_audiences(
    before: frozenset[str], after: frozenset[str]
) -> tuple[dict[int, frozenset[str]], dict[int, frozenset[str]]]:
    """Who is told of a row that moved: to an audience the row entered, the
    change is a create; to one it left, a delete (their lists gained or
    lost it)."""
    entered, left = after - before, before - after
    return {NEW: entered, BOTH: entered}, {OLD: left, BOTH: left}


@dataclass(frozen=True)
class Dependents:
    """The rows of ``rules.model`` whose path audiences read ``model``'s
    fields through ``via``: Card's ``"board__team"`` reads Board's team
    through ``"board"``. A change of those fields moves the rows below to
    other audiences although none of their own values changed."""

    model: type[models.Model]
    via: str
    rules: ModelRules
    # The rules' audience specs (by position) that ``model``'s rows decide,
    # each as it reads from ``model`` (``"team"``).
    reads: tuple[tuple[int, FieldAudience], ...]
    # ``model``'s pk, then the fields that decide.
    tracked: tuple[str, ...]

    def route(
        self,
        changes: Iterable[tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]],
        using: str,
        also: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> list[Routed]:
        """The directives for the rows below the changed rows ``(old, new)``
        of ``model``: one query for them, one per path read from ``model``.
        ``also`` gives the values the same operation leaves in a row below
        (a deletion that nulls the board's lead also nulls the card's
        assignee when both are the deleted user)."""
        pk, decides = self.tracked[0], self.tracked[1:]
        # Keyed as the database gives the pks the rows below are reached through.
        key = self.model._meta.pk.to_python
        moved: dict[Any, tuple[Side, Side]] = {}
        for old, new in changes:
            if old is None or new is None:
                continue
            if any(old.get(a, MISSING) != new.get(a, MISSING) for a in decides):
                moved[key(new[pk])] = (Side(old), Side(new))
        if not moved:
            return []
        sides = [side for pair in moved.values() for side in pair]
        reads = [spec.resolve(sides, using) for _, spec in self.reads]

        def read(side: Side) -> frozenset[str]:
            return frozenset(a for of in reads for a in of(side))

        rows = self._rows(list(moved), using)
        rules = self.rules
        if len(rows) > conf.COLLAPSE_THRESHOLD:
            return rules.collapsed(frozenset(a for side in sides for a in read(side)))
        read_here = {index for index, _ in self.reads}
        row_sides = [
            Side(values if also is None else also(values), instance) for values, instance, _ in rows
        ]
        kept = [
            spec.resolve(row_sides, using)
            for index, spec in enumerate(rules.audience.specs)
            if index not in read_here
        ]
        routed: list[Routed] = []
        for side, (_, _, through) in zip(row_sides, rows, strict=True):
            was, now = moved[through]
            stays = frozenset(a for of in kept for a in of(side))
            routed += rules.moved(side.values, side.instance, stays | read(was), stays | read(now))
        return routed

    def _rows(self, pks: list[Any], using: str) -> list[tuple[dict[str, Any], Any, Any]]:
        """Tracked values of the rows below ``pks`` (and the rows where rules
        need instances), with the pk each is reached through; one more than
        ``COLLAPSE_THRESHOLD`` at most."""
        rules = self.rules
        via = f"{self.via}__pk"
        manager = rules.model._base_manager.using(using).order_by()
        limit = conf.COLLAPSE_THRESHOLD + 1
        out: list[tuple[dict[str, Any], Any, Any]] = []
        for start in range(0, len(pks), _CHUNK):
            rows = manager.filter(**{f"{via}__in": pks[start : start + _CHUNK]})
            if rules.needs_instances:
                for row in rows.annotate(**{_THROUGH: models.F(via)})[: limit - len(out)]:
                    through = row.__dict__.pop(_THROUGH)
                    out.append((tracking.current(row, rules.tracked), row, through))
            else:
                for values in rows.values_list(*rules.tracked, via)[: limit - len(out)]:
                    out.append((dict(zip(rules.tracked, values, strict=False)), None, values[-1]))
            if len(out) >= limit:
                break
        return out


# Keeps each IN list under every backend's parameter limit.
_CHUNK = 500
_THROUGH = "verity_through_pk"


def dependents_of(
    registered: Iterable[ModelRules],
) -> dict[type[models.Model], list[Dependents]]:
    """For each model further up a path audience, the rows below it."""
    out: dict[type[models.Model], list[Dependents]] = {}
    for rules in registered:
        grouped: dict[tuple[type[models.Model], str], list[tuple[int, FieldAudience]]] = {}
        for index, spec in enumerate(rules.audience.specs):
            for up in spec.upstream(rules.model):
                grouped.setdefault((up.model, up.via), []).append((index, up.spec))
        for (model, via), reads in grouped.items():
            pk = model._meta.pk.attname
            tracked = dict.fromkeys([pk, *(a for _, spec in reads for a in spec.tracked)])
            out.setdefault(model, []).append(
                Dependents(model, via, rules, tuple(reads), tuple(tracked))
            )
    return out


@dataclass(frozen=True)
class RulesOf:
    """Every set of rules a model's rows are subject to: its own, those of
    the model a proxy stands for, and those of multi-table parents, whose
    rows a child's save writes too."""

    model: type[models.Model]
    rules: tuple[ModelRules, ...]
    tracked: tuple[str, ...]
    # Multi-table children with rules of their own: a change made through
    # this class to a row that is also a child's changes the child's row too.
    children: tuple[tuple[type[models.Model], ModelRules], ...] = ()
    # Rows of other models whose path audiences read this model's rows.
    dependents: tuple[Dependents, ...] = ()


_declared: dict[type[models.Model], Declaration] = {}
_registry: dict[type[models.Model], ModelRules] = {}
_applicable: dict[type[models.Model], RulesOf] = {}
_ready = False


def get(model: type[models.Model]) -> ModelRules | None:
    return _registry.get(model)


def declaration(model: type[models.Model]) -> Declaration | None:
    """What was declared for ``model`` (its Meta or ``register()``), as given."""
    return _declared.get(model)


def rules_for(model: type[models.Model]) -> RulesOf | None:
    return _applicable.get(model)


def registered_models() -> list[type[models.Model]]:
    return list(_registry)


@overload
def register(
    model: ModelT,
    *,
    directives: Sequence[Any],
    audience: AudienceSpec = None,
    relations: Sequence[str] = (),
) -> ModelT: ...


@overload
def register(
    model: None = None,
    *,
    directives: Sequence[Any],
    audience: AudienceSpec = None,
    relations: Sequence[str] = (),
) -> Callable[[ModelT], ModelT]: ...


def register(
    model: ModelT | None = None,
    *,
    directives: Sequence[Any],
    audience: AudienceSpec = None,
    relations: Sequence[str] = (),
) -> ModelT | Callable[[ModelT], ModelT]:
    """Declare rules for a model, as a call or as a class decorator."""

    def decorate(target: ModelT) -> ModelT:
        declaration = Declaration(directives, audience, tuple(relations))
        if _ready:
            bound = bind(target, declaration)
            _raise_for(bound.errors)
            _declared[target] = declaration
            _registry[target] = bound
            _connect()
        else:
            _declared[target] = declaration
        return target

    if model is None:
        return decorate
    return decorate(model)


def unregister(model: type[models.Model]) -> None:
    _declared.pop(model, None)
    if _registry.pop(model, None) is not None:
        _connect()


def load_meta_rules() -> None:
    """Bind every model's rules; called once from ``AppConfig.ready()``."""
    global _ready
    for model in apps.get_models():
        meta = model._meta
        declared = getattr(meta, "directives", None)
        # Rules are runtime behaviour, not schema: keep them out of migrations.
        for name in ("directives", "directive_audience", "directive_relations"):
            meta.original_attrs.pop(name, None)
        if declared is not None and model not in _declared:
            _declared[model] = Declaration(
                declared,
                getattr(meta, "directive_audience", None),
                tuple(getattr(meta, "directive_relations", ()) or ()),
            )
    bound = {model: bind(model, declaration) for model, declaration in _declared.items()}
    _raise_for([e for rules in bound.values() for e in rules.errors])
    _registry.update(bound)
    _connect()
    _ready = True


def check_rules(**kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for model, declaration in _declared.items():
        errors.extend(bind(model, declaration).errors)
    return errors


def _raise_for(errors: Sequence[checks.CheckMessage]) -> None:
    if errors:
        lines = "\n".join(
            f"  {e.id} {e.obj._meta.label}: {e.msg}" + (f" HINT: {e.hint}" if e.hint else "")
            for e in errors
        )
        raise ImproperlyConfigured(
            f"verity_django: directive rules have errors, so their models would "
            f"emit nothing:\n{lines}"
        )


def bind(model: type[models.Model], declaration: Declaration) -> ModelRules:
    errors: list[checks.CheckMessage] = []
    raw = declaration.directives
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence | set | frozenset):
        errors.append(
            checks.Error(
                "Meta.directives must be a list of RefreshItem/RefreshCollection, "
                f"got {type(raw).__name__}.",
                obj=model,
                id="verity_django.E101",
            )
        )
        raw = ()
    rules = [r for r in raw if isinstance(r, RULE_TYPES)]
    errors.extend(
        checks.Error(
            f"{r!r} is not a directive rule.",
            hint="Use verity_django.RefreshItem or verity_django.RefreshCollection.",
            obj=model,
            id="verity_django.E102",
        )
        for r in raw
        if not isinstance(r, RULE_TYPES)
    )
    collections = [name for rule in rules for name in rule.collections()]
    bound_rules: list[Bound] = []
    for rule in rules:
        rule_errors = rule.check(model)
        errors.extend(rule_errors)
        if not rule_errors:
            bound_rules.append(rule.bind(model, collections))
    audience, audience_errors = parse(model, declaration.audience)
    errors.extend(audience_errors)
    relations = _relations(model, declaration.relations, errors)
    pk = [model._meta.pk.attname] if model._meta.pk else []
    tracked = [*pk, *(a for b in bound_rules for a in b.tracked), *audience.tracked]
    return ModelRules(
        model=model,
        rules=tuple(bound_rules),
        audience=audience,
        relations=tuple(relations),
        tracked=tuple(dict.fromkeys(tracked)),
        errors=errors,
    )


def _relations(
    model: type[models.Model], names: Iterable[str], errors: list[checks.CheckMessage]
) -> list[models.ManyToManyField[Any, Any]]:
    relations: list[models.ManyToManyField[Any, Any]] = []
    for name in names:
        try:
            rel = model._meta.get_field(name)
        except FieldDoesNotExist:
            rel = None
        if not isinstance(rel, models.ManyToManyField):
            errors.append(
                checks.Error(
                    f"directive_relations names {name!r}, which is not a many-to-many field "
                    f"of {model._meta.label}.",
                    obj=model,
                    id="verity_django.E110",
                )
            )
            continue
        relations.append(rel)
    return relations


def _connect() -> None:
    _applicable.clear()
    candidates = dict.fromkeys([*apps.get_models(), *_registry])
    upstream = dependents_of(_registry.values())
    for model in candidates:
        chain = tuple(dict.fromkeys(_chain(model)))
        children = tuple(
            (child, rules)
            for child, rules in _registry.items()
            if not child._meta.proxy and model in child._meta.get_parent_list()
        )
        # A proxy writes its concrete model's rows, a child its parents' too.
        writes = [model._meta.concrete_model or model, *model._meta.get_parent_list()]
        dependents = tuple(dep for written in writes for dep in upstream.get(written, ()))
        if chain or children or dependents:
            own = {f.attname for f in model._meta.concrete_fields}
            tracked = [a for rules in chain for a in rules.tracked]
            # The children's old values of the fields they share with us.
            tracked += [a for _, rules in children for a in rules.tracked if a in own]
            tracked += [a for dep in dependents for a in dep.tracked]
            _applicable[model] = RulesOf(
                model, chain, tuple(dict.fromkeys(tracked)), children, dependents
            )
    receivers.install(_applicable.values(), _registry.values(), list(candidates))


def _chain(model: type[models.Model]) -> list[ModelRules]:
    own = _registry.get(model)
    out = [own] if own is not None else []
    meta = model._meta
    if meta.proxy and meta.proxy_for_model is not None:
        out.extend(_chain(meta.proxy_for_model))
    else:
        for parent in meta.parents:
            out.extend(_chain(parent))
    return out
