"""Which models produce directives, and the signal receivers that run them.

Rules come from a model's ``class Meta`` (``directives``,
``directive_audience``, ``directive_relations``) or from :func:`register` for
models you do not own. They are bound to concrete attribute names once, at
start-up; anything wrong becomes a system check error on the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from django.apps import apps
from django.conf import settings
from django.core import checks
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.models.signals import m2m_changed, post_delete, post_init, post_save

from verity_django import batching, tracking
from verity_django import directives as d
from verity_django.audiences import GLOBAL, InvalidAudience, validate_audience
from verity_django.conf import conf
from verity_django.rules import (
    EVENTS,
    MISSING,
    BoundRule,
    RefreshCollection,
    RefreshItem,
    Routed,
    evaluate,
    to_json_value,
)

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=type[models.Model])
AudienceSpec = str | Callable[[Any], Any] | Sequence[str | Callable[[Any], Any]] | None


@dataclass(frozen=True)
class Declaration:
    directives: Sequence[Any]
    audience: AudienceSpec = None
    relations: Sequence[str] = ()


@dataclass
class ModelRules:
    """A model's rules, bound to attribute names and ready to evaluate."""

    model: type[models.Model]
    rules: tuple[BoundRule, ...]
    tracked: tuple[str, ...]
    audience_fields: tuple[tuple[str, str], ...]
    audience_constants: frozenset[str]
    audience_callables: tuple[Callable[[Any], Any], ...]
    relations: tuple[models.ManyToManyField[Any, Any], ...]
    errors: list[checks.CheckMessage] = field(default_factory=list)

    @property
    def needs_instances(self) -> bool:
        """Whether rows read as plain values are not enough to route a change."""
        return bool(self.audience_callables) or any(
            b.rule.idempotency_key is not None
            or (isinstance(b.rule, RefreshItem) and b.rule.result is not None)
            for b in self.rules
        )

    def changes(
        self,
        event: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        instance: Any = None,
    ) -> list[Routed]:
        audiences = self.audiences(old, new, instance)
        routed: list[Routed] = []
        current: frozenset[str] | None = None
        for bound in self.rules:
            for directive, collapse_to in evaluate(bound, event, old, new, instance=instance):
                if directive.result is None:
                    routed.append(Routed(directive, audiences, collapse_to))
                    continue
                if current is None:
                    # The object's data goes only where the object is now.
                    current = self.audiences(None, new, instance)
                routed.append(Routed(directive, audiences, collapse_to, current))
        return routed

    def audiences(
        self, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, instance: Any
    ) -> frozenset[str]:
        out = set(self.audience_constants)
        for attname, prefix in self.audience_fields:
            for values in (old, new):
                value = MISSING if values is None else values.get(attname, MISSING)
                if value is MISSING or value is None:
                    continue
                out.add(f"{prefix}{value}" if prefix else str(value))
        if instance is not None:
            for func in self.audience_callables:
                produced = func(instance)
                out.update([produced] if isinstance(produced, str) else produced)
        valid = set()
        for audience in out:
            try:
                valid.add(validate_audience(audience))
            except InvalidAudience as exc:
                logger.error("%s: dropped audience: %s", self.model._meta.label, exc)
        return frozenset(valid)

    def collapsed(self, audiences: frozenset[str] | None = None) -> list[Routed]:
        """Directives for a change to rows we did not read one by one."""
        names: list[str] = []
        for bound in self.rules:
            if isinstance(bound.rule, RefreshCollection):
                names.append(bound.rule.name)
            else:
                names.extend(bound.collapse_to)
        if audiences is None:
            audiences = frozenset(self.audience_constants)

        return [Routed(d.refresh_collection(n), audiences) for n in dict.fromkeys(names)]


_declared: dict[type[models.Model], Declaration] = {}
_registry: dict[type[models.Model], ModelRules] = {}
_ready = False


def get(model: type[models.Model]) -> ModelRules | None:
    return _registry.get(model)


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
        _declared[target] = Declaration(directives, audience, tuple(relations))
        if _ready:
            _bind_and_connect(target, _declared[target])
        return target

    if model is None:
        return decorate
    return decorate(model)


def unregister(model: type[models.Model]) -> None:
    _declared.pop(model, None)
    bound = _registry.pop(model, None)
    if bound is not None:
        _disconnect(bound)


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
    for model, declaration in _declared.items():
        _bind_and_connect(model, declaration)
    _ready = True


def check_rules(**kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for model, declaration in _declared.items():
        errors.extend(bind(model, declaration).errors)
    return errors


def bind(model: type[models.Model], declaration: Declaration) -> ModelRules:
    errors: list[checks.CheckMessage] = []

    def error(msg: str, id: str, hint: str | None = None) -> None:
        errors.append(checks.Error(msg, hint=hint, obj=model, id=id))

    raw = declaration.directives
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence | set | frozenset):
        error(
            "Meta.directives must be a list of RefreshItem/RefreshCollection, "
            f"got {type(raw).__name__}.",
            "verity_django.E101",
        )
        raw = ()
    rules = [r for r in raw if isinstance(r, RefreshItem | RefreshCollection)]
    for r in raw:
        if not isinstance(r, RefreshItem | RefreshCollection):
            error(
                f"{r!r} is not a directive rule.",
                "verity_django.E102",
                hint="Use verity_django.RefreshItem or verity_django.RefreshCollection.",
            )
    collection_names = [r.name for r in rules if isinstance(r, RefreshCollection)]
    bound_rules: list[BoundRule] = []
    tracked: dict[str, None] = {model._meta.pk.attname: None} if model._meta.pk else {}
    for rule in rules:
        ok = True
        for attr in ("name", "level"):
            value = getattr(rule, attr, None)
            if attr == "level" and value is None:
                continue
            try:
                d.Directive.from_dict({"op": "refresh_item", "name": "x", "id": 1, attr: value})
            except d.InvalidDirective as exc:
                error(f"{rule!r}: {attr!r} is not valid: {exc}.", "verity_django.E103")
                ok = False
        bad_events = set(rule.on or ()) - EVENTS
        if rule.on is not None and (isinstance(rule.on, str) or bad_events):
            error(
                f"{rule!r}: 'on' must be a collection of 'create', 'update', 'delete'.",
                "verity_django.E104",
            )
            ok = False
        if isinstance(rule, RefreshCollection):
            if rule.mode not in ("exact", "contains"):
                error(
                    f"{rule!r}: mode must be 'exact' or 'contains', got {rule.mode!r}.",
                    "verity_django.E105",
                )
                ok = False
            if rule.params is not None and (
                isinstance(rule.params, str)
                or not isinstance(rule.params, Sequence | Mapping)
                or not all(isinstance(v, str) for v in rule.param_fields().values())
            ):
                error(
                    f"{rule!r}: params must be a list of field names or a dict of "
                    "param name to field name.",
                    "verity_django.E106",
                )
                continue
        if isinstance(rule, RefreshItem):
            for attr in ("result", "idempotency_key"):
                value = getattr(rule, attr)
                if value is not None and not callable(value):
                    error(f"{rule!r}: '{attr}' must be a callable.", "verity_django.E107")
                    ok = False
        attnames: dict[str, str] = {}
        for field_name in rule.fields():
            attname = _attname(model, field_name)
            if attname is None:
                error(
                    f"{rule!r} references {field_name!r}, which is not a concrete field "
                    f"of {model._meta.label}.",
                    "verity_django.E108",
                    hint="Rules read local fields and foreign key ids only, so that "
                    "evaluating them needs no query.",
                )
                ok = False
                continue
            attnames[field_name] = attname
            tracked[attname] = None
        if not ok:
            continue
        collapse_to: tuple[str, ...] = ()
        if isinstance(rule, RefreshItem):
            if isinstance(rule.collection, str):
                collapse_to = (rule.collection,)
            elif rule.collection is not None:
                collapse_to = tuple(rule.collection)
            elif rule.is_self:
                collapse_to = tuple(dict.fromkeys(collection_names))
        bound_rules.append(BoundRule(rule, attnames, collapse_to))

    audience_fields: list[tuple[str, str]] = []
    audience_constants: set[str] = set()
    audience_callables: list[Callable[[Any], Any]] = []
    spec = declaration.audience
    specs: Sequence[Any] = (
        [GLOBAL] if spec is None else spec if isinstance(spec, list | tuple) else [spec]
    )
    for item in specs:
        if callable(item):
            audience_callables.append(item)
            continue
        if not isinstance(item, str):
            error(
                f"directive_audience {item!r} must be a field name, an audience or a callable.",
                "verity_django.E109",
            )
            continue
        try:
            f = model._meta.get_field(item)
        except FieldDoesNotExist:
            f = None
        if f is not None and getattr(f, "concrete", False) and not f.many_to_many:
            attname = f.get_attname()  # type: ignore[union-attr]
            tracked[attname] = None
            if f.is_relation and f.related_model is not None:
                related = f.related_model
                prefix = "user-" if _is_user_model(related) else f"{related._meta.model_name}-"
            else:
                prefix = ""
            audience_fields.append((attname, prefix))
            continue
        try:
            audience_constants.add(validate_audience(item))
        except InvalidAudience as exc:
            error(
                f"directive_audience {item!r} is neither a concrete field of "
                f"{model._meta.label} nor a valid audience: {exc}.",
                "verity_django.E109",
            )

    relations: list[models.ManyToManyField[Any, Any]] = []
    for name in declaration.relations:
        try:
            rel = model._meta.get_field(name)
        except FieldDoesNotExist:
            rel = None
        if not isinstance(rel, models.ManyToManyField):
            error(
                f"directive_relations names {name!r}, which is not a many-to-many field "
                f"of {model._meta.label}.",
                "verity_django.E110",
            )
            continue
        relations.append(rel)

    return ModelRules(
        model=model,
        rules=tuple(bound_rules),
        tracked=tuple(tracked),
        audience_fields=tuple(audience_fields),
        audience_constants=frozenset(audience_constants),
        audience_callables=tuple(audience_callables),
        relations=tuple(relations),
        errors=errors,
    )


def _is_user_model(model: Any) -> bool:
    return bool(model._meta.label == settings.AUTH_USER_MODEL)


def _attname(model: type[models.Model], name: str) -> str | None:
    if name == "pk":
        return model._meta.pk.attname if model._meta.pk else None
    try:
        f = model._meta.get_field(name)
    except FieldDoesNotExist:
        for candidate in model._meta.concrete_fields:
            if candidate.attname == name:
                return candidate.attname
        return None
    if not getattr(f, "concrete", False) or f.many_to_many:
        return None
    return str(f.get_attname())  # type: ignore[union-attr]


def _uid(signal: str, model: type[models.Model]) -> str:
    return f"verity_django.{signal}.{model._meta.label_lower}"


def _bind_and_connect(model: type[models.Model], declaration: Declaration) -> None:
    previous = _registry.pop(model, None)
    if previous is not None:
        _disconnect(previous)
    bound = bind(model, declaration)
    _registry[model] = bound
    post_init.connect(_on_post_init, sender=model, dispatch_uid=_uid("post_init", model))
    post_save.connect(_on_post_save, sender=model, dispatch_uid=_uid("post_save", model))
    post_delete.connect(_on_post_delete, sender=model, dispatch_uid=_uid("post_delete", model))
    for rel in bound.relations:
        through = rel.remote_field.through
        m2m_changed.connect(
            _on_m2m_changed, sender=through, dispatch_uid=_uid(f"m2m.{rel.name}", model)
        )


def _disconnect(bound: ModelRules) -> None:
    model = bound.model
    post_init.disconnect(sender=model, dispatch_uid=_uid("post_init", model))
    post_save.disconnect(sender=model, dispatch_uid=_uid("post_save", model))
    post_delete.disconnect(sender=model, dispatch_uid=_uid("post_delete", model))
    for rel in bound.relations:
        m2m_changed.disconnect(
            sender=rel.remote_field.through, dispatch_uid=_uid(f"m2m.{rel.name}", model)
        )


def _active() -> bool:
    return conf.ENABLED and not batching.is_disabled()


def _on_post_init(sender: type[models.Model], instance: models.Model, **kwargs: Any) -> None:
    bound = _registry.get(sender)
    if bound is not None and conf.ENABLED:
        tracking.snapshot(instance, bound.tracked)


def _on_post_save(
    sender: type[models.Model],
    instance: models.Model,
    created: bool,
    raw: bool = False,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    bound = _registry.get(sender)
    if bound is None or not conf.ENABLED:
        return
    new = tracking.current(instance, bound.tracked)
    if not raw and _active():
        old = None if created else tracking.previous(instance)
        routed = bound.changes("create" if created else "update", old, new, instance)
        batching.collect(routed, using=using)
    tracking.remember(instance, new)


def _on_post_delete(
    sender: type[models.Model],
    instance: models.Model,
    using: str | None = None,
    origin: Any = None,
    **kwargs: Any,
) -> None:
    bound = _registry.get(sender)
    if bound is None or not _active():
        return
    old = tracking.current(instance, bound.tracked)
    batching.collect(bound.changes("delete", old, None, instance), using=using)


def _on_m2m_changed(
    sender: Any,
    instance: models.Model,
    action: str,
    reverse: bool,
    model: type[models.Model],
    pk_set: set[Any] | None,
    using: str | None = None,
    **kwargs: Any,
) -> None:
    if action not in ("post_add", "post_remove", "post_clear") or not _active():
        return
    if not reverse:
        bound = _registry.get(type(instance))
        if bound is None:
            return
        values = tracking.current(instance, bound.tracked)
        batching.collect(bound.changes("update", values, values, instance), using=using)
        return
    bound = _registry.get(model)
    if bound is None:
        return
    if pk_set is None:
        batching.collect(bound.collapsed(), using=using)
        return
    routed = list(_self_item_changes(bound, pk_set))
    routed.extend(r for r in bound.collapsed() if r.directive.op == "refresh_collection")
    batching.collect(routed, using=using)


def _self_item_changes(bound: ModelRules, pks: Iterable[Any]) -> Iterator[Routed]:
    audiences = frozenset(bound.audience_constants)
    for b in bound.rules:
        if isinstance(b.rule, RefreshItem) and b.rule.is_self:
            for pk in pks:
                yield Routed(
                    d.refresh_item(b.rule.name, to_json_value(pk), level=b.rule.level),
                    audiences,
                    b.collapse_to,
                )
