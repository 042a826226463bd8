"""Declarative directive rules and the pure function from a change to directives.

Rules name fields; :func:`evaluate` reads those fields from two plain dicts
(the values when the instance was loaded, and the values now). It never
touches the database, so evaluating rules on a save costs no query.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import logging
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from verity_django import directives as d

logger = logging.getLogger(__name__)

Event = Literal["create", "update", "delete"]
EVENTS: frozenset[str] = frozenset({"create", "update", "delete"})
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()

ResultBuilder = Callable[[Any], Any]
KeyBuilder = Callable[[Any, str], str]


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


Rule = RefreshItem | RefreshCollection


@dataclass(frozen=True)
class Routed:
    """A directive and the audiences it is published to."""

    directive: d.Directive
    audiences: frozenset[str]
    collapse_to: tuple[str, ...] = ()
    # Who may receive the directive's ``result`` (the object's data as it is
    # now); None means every audience. The others get the directive without it.
    result_audiences: frozenset[str] | None = None


@dataclass(frozen=True)
class BoundRule:
    """A rule whose field names were resolved to attribute names at start-up."""

    rule: Rule
    attnames: Mapping[str, str] = field(default_factory=dict)
    collapse_to: tuple[str, ...] = ()
    # Derived once at start-up; evaluate() runs on every save.
    events: frozenset[str] = field(init=False)
    params: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", self.rule.events())
        params = self.rule.param_fields() if isinstance(self.rule, RefreshCollection) else {}
        object.__setattr__(
            self, "params", tuple((param, self.attnames[f]) for param, f in params.items())
        )


def to_json_value(value: Any) -> Any:
    """Field values as they appear in params and ids on the wire."""
    if value is None or type(value) in (str, bool, int, float):
        return value
    # Choices members (TextChoices, IntegerChoices) as the plain value they are.
    if isinstance(value, bool):
        return bool(value)
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


def evaluate(
    bound: BoundRule,
    event: str,
    old: Mapping[str, Any] | None,
    new: Mapping[str, Any] | None,
    *,
    instance: Any = None,
) -> Iterator[tuple[d.Directive, tuple[str, ...]]]:
    """Yield the directives one rule produces for one change.

    ``old`` is None on create, ``new`` is None on delete. Values missing from
    ``old`` (deferred fields) are unknown, and an unknown old params value
    falls back to refreshing the whole collection rather than guessing.
    """
    rule = bound.rule
    if event not in bound.events:
        return
    if isinstance(rule, RefreshItem):
        if rule.is_self and event == "delete":
            return
        attname = bound.attnames[rule.id]
        ids: list[Any] = []
        for values in (old, new) if event == "update" else (old if event == "delete" else new,):
            value = MISSING if values is None else values.get(attname, MISSING)
            if value is not MISSING and value is not None and value not in ids:
                ids.append(value)
        if rule.is_self and new is not None:
            ids = [new[attname]]
        for item_id in ids:
            result = None
            if rule.result is not None and instance is not None and event != "delete":
                result = _result_payload(rule, instance) if item_id == _pk_of(instance) else None
            key = _key(rule, instance, event)
            if result is None and key is None:
                json_id = to_json_value(item_id)
                directive = _item(rule.name, type(json_id).__name__, json_id, rule.level)
            else:
                directive = d.refresh_item(
                    rule.name,
                    to_json_value(item_id),
                    level=rule.level,
                    result=result,
                    idempotency_key=key,
                )
            yield directive, bound.collapse_to
        return

    if not bound.params:
        yield _collection(rule, None, _key(rule, instance, event)), ()
        return
    states = (old, new) if event == "update" else ((old,) if event == "delete" else (new,))
    seen: list[_ParamsKey] = []
    for values in states:
        if values is None:
            continue
        params: list[tuple[str, type, Any]] = []
        for param, attname in bound.params:
            value = values.get(attname, MISSING)
            if value is MISSING:
                yield _collection(rule, None, _key(rule, instance, event)), ()
                return
            value = to_json_value(value)
            params.append((param, type(value), value))
        frozen = tuple(params)
        if frozen not in seen:
            seen.append(frozen)
    for frozen in seen:
        yield _collection(rule, frozen, _key(rule, instance, event)), ()


# Params as (name, JSON type, value) triples: the type keeps 1, 1.0 and True
# apart, which Python's equality and hashing would merge.
_ParamsKey = tuple[tuple[str, type, Any], ...]


def _collection(rule: RefreshCollection, params: _ParamsKey | None, key: str | None) -> d.Directive:
    mode = rule.mode if params else "exact"
    if key is not None:
        return d.refresh_collection(
            rule.name, _params_dict(params), params_mode=mode, idempotency_key=key
        )
    return _whole_or_params(rule.name, params, mode)


# A save builds the same few directives as the previous save of the same kind
# of row: directives are immutable and stamping copies them, so built ones are
# shared. Bounded, because ids and params values come from the data.
@functools.lru_cache(maxsize=4096)
def _item(name: str, id_type: str, item_id: Any, level: str | None) -> d.Directive:
    return d.Directive.trusted(op="refresh_item", name=name, id=item_id, level=level)


@functools.lru_cache(maxsize=4096)
def _whole_or_params(name: str, params: _ParamsKey | None, mode: str) -> d.Directive:
    return d.Directive.trusted(
        op="refresh_collection", name=name, params=_params_dict(params), params_mode=mode
    )


def _params_dict(params: _ParamsKey | None) -> dict[str, Any] | None:
    return None if params is None else {param: value for param, _, value in params}


def _pk_of(instance: Any) -> Any:
    return instance.pk


def _key(rule: Rule, instance: Any, event: str) -> str | None:
    if rule.idempotency_key is None or instance is None:
        return None
    return rule.idempotency_key(instance, event)


def _result_payload(rule: RefreshItem, instance: Any) -> Any:
    assert rule.result is not None
    from verity_django.conf import conf
    from verity_django.results import LevelResult, LevelsResult

    data = rule.result(instance)
    if data is None:
        return None
    # A payload object already names its levels; plain data is one level's.
    if isinstance(data, LevelResult | LevelsResult):
        payload = data.as_json()
    else:
        payload = LevelResult(rule.result_level, data).as_json()
    size = len(d.dumps(payload).encode())
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
