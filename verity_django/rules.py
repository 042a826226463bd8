"""Declarative directive rules: each rule class checks, binds and evaluates itself.

A rule names fields. Binding resolves those names to attribute names once, at
start-up; evaluation reads them from two plain dicts (the values when the
instance was loaded, and the values now). It never touches the database, so
evaluating rules on a save costs no query.

User code inside rules (``result=``, ``idempotency_key=``) and values that
cannot go on the wire never fail the request that committed the change: the
directive falls back to what the client can always act on (no ``result``, a
random key, a whole-collection refresh), and the failure is logged and
counted in :data:`counters`.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import logging
import math
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from django.core import checks
from django.core.exceptions import FieldDoesNotExist

from verity_django import directives as d

logger = logging.getLogger(__name__)

Event = Literal["create", "update", "delete"]
EVENTS: frozenset[str] = frozenset({"create", "update", "delete"})
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()

ResultBuilder = Callable[[Any], Any]
KeyBuilder = Callable[[Any, str], str]
# Which state of the row a directive comes from, so that it is told only to
# the audiences of that state: a card moved to another team's board names its
# old board to the old team and its new board to the new team.
OLD, NEW, BOTH = 1, 2, 3
Evaluated = Iterator[tuple[d.Directive, tuple[str, ...], int]]
# A change as (event, values when loaded, values now).
PlainChange = tuple[str, Mapping[str, Any] | None, Mapping[str, Any] | None]


@dataclass
class Counters:
    # A callable of a rule or audience raised or returned something unusable.
    user_code_errors: int = 0
    # A params, id or audience value was refused because it cannot go on the wire.
    refused_values: int = 0


counters = Counters()
_counters_lock = threading.Lock()


def report_user_code_error(model_label: str, where: str, func: Any, problem: str) -> None:
    """Log and count a failure of user code inside a rule; the change goes on."""
    name = getattr(func, "__qualname__", repr(func))
    _report(
        "user_code_errors", f"{model_label}: {where} {name} {problem}; sending a safe directive"
    )


def report_refused_value(model_label: str, where: str, value: Any, problem: str) -> None:
    _report("refused_values", f"{model_label}: refused {where} value {value!r} ({problem})")


def _report(counter: str, message: str) -> None:
    with _counters_lock:
        setattr(counters, counter, getattr(counters, counter) + 1)
    logger.error("verity_django: %s", message)


@dataclass(frozen=True)
class RefreshItem:
    """Refresh one item when the instance changes.

    ``id`` names the field holding the item's id: ``"pk"`` (the default) is the
    instance itself; a foreign key such as ``"project"`` or ``"project_id"``
    refreshes a related item. The instance's own item is refreshed on update
    only (a new item has nothing cached, a deleted one is gone); a related
    item is refreshed on every event, for both the old and the new id.
    """

    name: str
    id: str = "pk"
    on: Collection[str] | None = None
    level: str | None = None
    result: ResultBuilder | None = None
    result_level: str | None = None
    collection: str | Sequence[str] | None = None
    idempotency_key: KeyBuilder | None = None

    def fields(self) -> tuple[str, ...]:
        return (self.id,)

    @property
    def is_self(self) -> bool:
        return self.id == "pk"

    def events(self) -> frozenset[str]:
        if self.on is not None:
            return frozenset(self.on)
        return frozenset({"update"}) if self.is_self else EVENTS

    def collections(self) -> tuple[str, ...]:
        """Names of the collections this rule refreshes (none: it refreshes items)."""
        return ()

    def check(self, model: Any) -> list[checks.CheckMessage]:
        errors = _common_errors(self, model)
        for attr in ("result", "idempotency_key"):
            value = getattr(self, attr)
            if value is not None and not callable(value):
                errors.append(_error(model, f"{self!r}: '{attr}' must be a callable.", "E107"))
        return errors + _field_errors(self, model)

    def bind(self, model: Any, collections: Sequence[str]) -> BoundItem:
        if isinstance(self.collection, str):
            collapse_to: tuple[str, ...] = (self.collection,)
        elif self.collection is not None:
            collapse_to = tuple(self.collection)
        elif self.is_self:
            collapse_to = tuple(dict.fromkeys(collections))
        else:
            collapse_to = ()
        attname = attname_of(model, self.id)
        assert attname is not None
        return BoundItem(self, model._meta.label, attname, collapse_to, self.events())


@dataclass(frozen=True)
class RefreshCollection:
    """Refresh a collection; ``params`` maps query params to fields.

    ``params=["status"]`` is short for ``params={"status": "status"}``. When a
    params field changes, both the old and the new collection are refreshed.
    """

    name: str
    params: Sequence[str] | Mapping[str, str] | None = None
    mode: str = "exact"
    on: Collection[str] | None = None
    idempotency_key: KeyBuilder | None = None

    def param_fields(self) -> dict[str, str]:
        if self.params is None:
            return {}
        if isinstance(self.params, Mapping):
            return dict(self.params)
        return {name: name for name in self.params}

    def fields(self) -> tuple[str, ...]:
        return tuple(self.param_fields().values())

    def events(self) -> frozenset[str]:
        return frozenset(self.on) if self.on is not None else EVENTS

    def collections(self) -> tuple[str, ...]:
        return (self.name,)

    def check(self, model: Any) -> list[checks.CheckMessage]:
        errors = _common_errors(self, model)
        if self.mode not in ("exact", "contains"):
            errors.append(
                _error(
                    model,
                    f"{self!r}: mode must be 'exact' or 'contains', got {self.mode!r}.",
                    "E105",
                )
            )
        if self.params is not None and (
            isinstance(self.params, str)
            or not isinstance(self.params, Sequence | Mapping)
            or not all(isinstance(v, str) for v in self.param_fields().values())
        ):
            errors.append(
                _error(
                    model,
                    f"{self!r}: params must be a list of field names or a dict of "
                    "param name to field name.",
                    "E106",
                )
            )
            return errors
        if self.idempotency_key is not None and not callable(self.idempotency_key):
            errors.append(_error(model, f"{self!r}: 'idempotency_key' must be a callable.", "E107"))
        return errors + _field_errors(self, model)

    def bind(self, model: Any, collections: Sequence[str]) -> BoundCollection:
        params = tuple(
            (param, attname_of(model, f) or f) for param, f in self.param_fields().items()
        )
        return BoundCollection(self, model._meta.label, params, self.events())


Rule = RefreshItem | RefreshCollection
RULE_TYPES = (RefreshItem, RefreshCollection)


class Bound(Protocol):
    """A rule bound to a model's attribute names, ready to evaluate."""

    @property
    def rule(self) -> Rule: ...

    @property
    def tracked(self) -> tuple[str, ...]: ...

    @property
    def needs_instance(self) -> bool: ...

    @property
    def events(self) -> frozenset[str]:
        """The events the rule gives directives for."""

    @property
    def collapse_names(self) -> tuple[str, ...]:
        """The collections a change to rows not read one by one refreshes."""

    def evaluate(
        self,
        event: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        instance: Any = None,
    ) -> Evaluated: ...

    def crowds(self, changes: Sequence[PlainChange], threshold: int) -> bool:
        """Whether ``changes`` give more than ``threshold`` items of this
        rule, which collapse into ``collapse_names`` whatever else the batch
        holds, so that they need not be evaluated one by one."""

    def gives_item(self, event: str, new: Mapping[str, Any] | None) -> bool:
        """Whether a rule that :meth:`crowds` gives the row's item for ``event``."""


@dataclass(frozen=True)
class Routed:
    """A directive and the audiences it is published to."""

    directive: d.Directive
    audiences: frozenset[str]
    collapse_to: tuple[str, ...] = ()
    # Who may receive the directive's ``result`` (the object's data as it is
    # now); None means every audience. The others get the directive without it.
    result_audiences: frozenset[str] | None = None
    # A collection standing for more than COLLAPSE_THRESHOLD items of this
    # name: the batch collapses its other items of the name too.
    crowds: str | None = None


@dataclass(frozen=True)
class BoundItem:
    rule: RefreshItem
    model_label: str
    attname: str
    collapse_to: tuple[str, ...]
    # Derived once at start-up; evaluate() runs on every save.
    events: frozenset[str]

    @property
    def tracked(self) -> tuple[str, ...]:
        return (self.attname,)

    @property
    def needs_instance(self) -> bool:
        return self.rule.result is not None or self.rule.idempotency_key is not None

    @property
    def collapse_names(self) -> tuple[str, ...]:
        return self.collapse_to

    def evaluate(
        self,
        event: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        instance: Any = None,
    ) -> Evaluated:
        rule = self.rule
        if event not in self.events or (rule.is_self and event == "delete"):
            return
        attname = self.attname
        ids: list[list[Any]] = []
        if rule.is_self and new is not None:
            ids = [[new[attname], BOTH]]
        else:
            for values, side in _states(event, old, new):
                value = values.get(attname, MISSING)
                if value is MISSING or value is None:
                    continue
                for seen in ids:
                    if seen[0] == value:
                        seen[1] |= side
                        break
                else:
                    ids.append([value, side])
        for item_id, side in ids:
            json_id = to_json_value(item_id)
            problem = _id_problem(json_id)
            if problem is not None:
                report_refused_value(
                    self.model_label, f"{rule!r} field {rule.id!r}", json_id, problem
                )
                for name in self.collapse_to:
                    yield _shared_collection(name, None, "exact"), (), side
                continue
            yield self._directive(json_id, event, instance), self.collapse_to, side

    def crowds(self, changes: Sequence[PlainChange], threshold: int) -> bool:
        # Only an item named by the row's own pk is one per row for sure.
        if len(changes) <= threshold or not (self.rule.is_self and self.collapse_to):
            return False
        if self.needs_instance:
            return False
        attname, events = self.attname, self.events
        try:
            ids = {
                new[attname]
                for event, _, new in changes
                if new is not None and event in events and event != "delete"
            }
        except (KeyError, TypeError):
            return False
        return len(ids) > threshold

    def gives_item(self, event: str, new: Mapping[str, Any] | None) -> bool:
        return new is not None and event in self.events and event != "delete"

    def _directive(self, json_id: Any, event: str, instance: Any) -> d.Directive:
        rule = self.rule
        result = None
        if (
            rule.result is not None
            and instance is not None
            and event != "delete"
            and json_id == to_json_value(instance.pk)
        ):
            result = self._result_payload(instance)
        key = _key(self.model_label, rule, instance, event)
        if result is not None or key is not None:
            try:
                return d.refresh_item(
                    rule.name, json_id, level=rule.level, result=result, idempotency_key=key
                )
            except d.InvalidDirective as exc:
                func = rule.result if result is not None else rule.idempotency_key
                report_user_code_error(self.model_label, f"{rule!r}", func, f"gave {exc}")
        return _item(rule.name, type(json_id).__name__, json_id, rule.level)

    def _result_payload(self, instance: Any) -> Any:
        from verity_django.conf import conf
        from verity_django.results import LevelResult, LevelsResult

        rule = self.rule
        where = f"{rule!r} result"
        try:
            data = rule.result(instance)  # type: ignore[misc]
        except Exception as exc:
            report_user_code_error(self.model_label, where, rule.result, f"raised {exc!r}")
            return None
        if data is None:
            return None
        # A payload object already names its levels; plain data is one level's.
        if isinstance(data, LevelResult | LevelsResult):
            payload = data.as_json()
        else:
            payload = LevelResult(rule.result_level, data).as_json()
        try:
            size = len(d.dumps(payload).encode())
        except (TypeError, ValueError, UnicodeEncodeError) as exc:
            report_user_code_error(
                self.model_label, where, rule.result, f"returned data that is not JSON ({exc})"
            )
            return None
        if size > conf.RESULT_MAX_BYTES:
            # The client refetches what a directive without result names.
            logger.warning(
                "verity_django: dropped the %d-byte result of %s %s (RESULT_MAX_BYTES is %d)",
                size,
                rule.name,
                instance.pk,
                conf.RESULT_MAX_BYTES,
            )
            return None
        return payload


@dataclass(frozen=True)
class BoundCollection:
    rule: RefreshCollection
    model_label: str
    params: tuple[tuple[str, str], ...]
    events: frozenset[str]

    @property
    def tracked(self) -> tuple[str, ...]:
        return tuple(attname for _, attname in self.params)

    @property
    def needs_instance(self) -> bool:
        return self.rule.idempotency_key is not None

    @property
    def collapse_names(self) -> tuple[str, ...]:
        return (self.rule.name,)

    def evaluate(
        self,
        event: str,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any] | None,
        instance: Any = None,
    ) -> Evaluated:
        """Values missing from ``old`` (deferred fields) are unknown, and an
        unknown or unsendable params value refreshes the whole collection
        rather than guessing."""
        if event not in self.events:
            return
        rule = self.rule
        key = _key(self.model_label, rule, instance, event)
        if not self.params:
            yield self._directive(None, key), (), BOTH
            return
        seen: list[list[Any]] = []
        for values, side in _states(event, old, new):
            params: list[tuple[str, type, Any]] = []
            for param, attname in self.params:
                value = values.get(attname, MISSING)
                if value is MISSING:
                    yield self._directive(None, key), (), BOTH
                    return
                value = to_json_value(value)
                problem = _value_problem(value)
                if problem is not None:
                    report_refused_value(
                        self.model_label, f"{rule!r} param {param!r}", value, problem
                    )
                    yield self._directive(None, key), (), BOTH
                    return
                params.append((param, type(value), value))
            frozen = tuple(params)
            for entry in seen:
                if entry[0] == frozen:
                    entry[1] |= side
                    break
            else:
                seen.append([frozen, side])
        for frozen, side in seen:
            yield self._directive(frozen, key), (), side

    def crowds(self, changes: Sequence[PlainChange], threshold: int) -> bool:
        return False

    def gives_item(self, event: str, new: Mapping[str, Any] | None) -> bool:
        return False

    def _directive(self, params: _ParamsKey | None, key: str | None) -> d.Directive:
        rule = self.rule
        mode = rule.mode if params else "exact"
        if key is not None:
            try:
                return d.refresh_collection(
                    rule.name, _params_dict(params), params_mode=mode, idempotency_key=key
                )
            except d.InvalidDirective as exc:
                report_user_code_error(
                    self.model_label, f"{rule!r}", rule.idempotency_key, f"gave {exc}"
                )
        return _shared_collection(rule.name, params, mode)


def evaluate(
    bound: Bound,
    event: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    *,
    instance: Any = None,
) -> Iterator[tuple[d.Directive, tuple[str, ...]]]:
    """The directives one bound rule produces for one change (no query).

    ``old`` is None on create, ``new`` is None on delete.
    """
    for directive, collapse_to, _ in bound.evaluate(event, old, new, instance):
        yield directive, collapse_to


def _states(
    event: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> Iterator[tuple[Mapping[str, Any], int]]:
    if old is not None and event != "create":
        yield old, OLD
    if new is not None and event != "delete":
        yield new, NEW


def to_json_value(value: Any) -> Any:
    """Field values as they appear in params and ids on the wire."""
    # The exact-type test first: it is every value of a plain field, on every save.
    if value is None or type(value) in (str, bool, int, float):
        return value
    # Choices members (TextChoices, IntegerChoices) as the plain value they are
    # (bool cannot be subclassed, so the test above caught every bool).
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    return str(value)


def _value_problem(value: Any) -> str | None:
    """Why a JSON scalar from to_json_value() cannot be sent, or None."""
    if type(value) is float and not math.isfinite(value):
        return "JSON has no NaN or infinity"
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode (lone surrogate)"
    return None


def _id_problem(value: Any) -> str | None:
    if type(value) not in (str, int):
        return "an item id must be a string or an integer"
    if value == "":
        return "an item id must not be empty"
    return _value_problem(value)


# Params as (name, JSON type, value) triples: the type keeps 1, 1.0 and True
# apart, which Python's equality and hashing would merge.
_ParamsKey = tuple[tuple[str, type, Any], ...]


# A save builds the same few directives as the previous save of the same kind
# of row: directives are immutable and stamping copies them, so built ones are
# shared. Bounded, because ids and params values come from the data. Bench
# W4: verity's extra Python calls per 200 saves 50,768 without, 37,171 with.
@functools.lru_cache(maxsize=4096)
def _item(name: str, id_type: str, item_id: Any, level: str | None) -> d.Directive:
    return d.Directive.trusted(op="refresh_item", name=name, id=item_id, level=level)


@functools.lru_cache(maxsize=4096)
def _shared_collection(name: str, params: _ParamsKey | None, mode: str) -> d.Directive:
    return d.Directive.trusted(
        op="refresh_collection", name=name, params=_params_dict(params), params_mode=mode
    )


def _params_dict(params: _ParamsKey | None) -> dict[str, Any] | None:
    return None if params is None else {param: value for param, _, value in params}


def _key(model_label: str, rule: Rule, instance: Any, event: str) -> str | None:
    if rule.idempotency_key is None or instance is None:
        return None
    try:
        key = rule.idempotency_key(instance, event)
    except Exception as exc:
        report_user_code_error(
            model_label, f"{rule!r} idempotency_key", rule.idempotency_key, f"raised {exc!r}"
        )
        return None
    if not isinstance(key, str):
        report_user_code_error(
            model_label,
            f"{rule!r} idempotency_key",
            rule.idempotency_key,
            f"returned {type(key).__name__}, not a string",
        )
        return None
    return key


def attname_of(model: Any, name: str) -> str | None:
    """The attribute a rule reads for ``name``: a concrete, non-m2m field."""
    if name == "pk":
        return model._meta.pk.attname if model._meta.pk else None
    f = concrete_field(model, name)
    return None if f is None else str(f.get_attname())


def concrete_field(model: Any, name: str) -> Any:
    """The field ``name`` (or attribute name) of ``model`` if it has a column, else None."""
    try:
        f = model._meta.get_field(name)
    except FieldDoesNotExist:
        return None
    if not getattr(f, "concrete", False) or f.many_to_many:
        return None
    return f


def _error(model: Any, msg: str, code: str, hint: str | None = None) -> checks.CheckMessage:
    return checks.Error(msg, hint=hint, obj=model, id=f"verity_django.{code}")


def _common_errors(rule: Rule, model: Any) -> list[checks.CheckMessage]:
    errors = []
    for attr in ("name", "level"):
        value = getattr(rule, attr, None)
        if attr == "level" and value is None:
            continue
        try:
            d.Directive.from_dict({"op": "refresh_item", "name": "x", "id": 1, attr: value})
        except d.InvalidDirective as exc:
            errors.append(_error(model, f"{rule!r}: {attr!r} is not valid: {exc}.", "E103"))
    bad_events = set(rule.on or ()) - EVENTS
    if rule.on is not None and (isinstance(rule.on, str) or bad_events):
        errors.append(
            _error(
                model,
                f"{rule!r}: 'on' must be a collection of 'create', 'update', 'delete'.",
                "E104",
            )
        )
    return errors


def _field_errors(rule: Rule, model: Any) -> list[checks.CheckMessage]:
    return [
        _error(
            model,
            f"{rule!r} references {name!r}, which is not a concrete field of {model._meta.label}.",
            "E108",
            hint="Rules read local fields and foreign key ids only, so that "
            "evaluating them needs no query.",
        )
        for name in rule.fields()
        if attname_of(model, name) is None
    ]
