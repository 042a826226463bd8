"""What ``directive_audience`` can say, one small type per kind of spec.

- :class:`Audience` ``("team-ops")``: a constant audience (``"global"`` is one);
- :class:`FieldAudience`: a field of the model (``"owner"`` -> ``user-<pk>``);
- :class:`PathAudience`: a related path in lookup spelling (``"board__team"``
  -> ``team-<id>``), followed from the first foreign key's id;
- :class:`CallableAudience`: ``instance -> audience | list``;
- :class:`AudienceList`: several of these.

Every spec tells the audiences of a row in one *state* (a :class:`Side`: the
values when loaded, or the values now). A spec resolves all the sides of one
operation at once, so that a path costs one query per operation, not one per
row, and a save tells both the old and the new audience. A path also names
the models further up it (:meth:`PathAudience.upstream`), so that a change
there (a board moved to another team) tells the rows below; a callable's
reads cannot be known, so it has none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings
from django.core import checks
from django.db import models

from verity_django.audiences import GLOBAL, InvalidAudience, validate_audience
from verity_django.rules import (
    MISSING,
    concrete_field,
    report_refused_value,
    report_user_code_error,
)

# Keeps each IN list under every backend's parameter limit.
_CHUNK = 500


@dataclass(frozen=True)
class Side:
    """A row in one state: its tracked values, and the instance in that state
    (None where the spec list needs no instance)."""

    values: Mapping[str, Any]
    instance: Any = None


Resolved = Callable[[Side], Iterable[str]]


class AudienceSpec(Protocol):
    @property
    def tracked(self) -> tuple[str, ...]:
        """Attribute names the spec reads from a side's values."""

    @property
    def needs_instance(self) -> bool: ...

    @property
    def reads_other_rows(self) -> bool:
        """Whether resolving queries the database (or user code may): when
        False, a side's audiences follow from its values alone, and
        ``resolve`` needs none of the sides up front."""

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        """A function from each of ``sides`` to its audiences."""

    def upstream(self, model: type[models.Model]) -> Sequence[Upstream]:
        """The models further up whose changes change these audiences of
        ``model``'s rows (only a related path has any)."""


@dataclass(frozen=True)
class Audience:
    """A constant audience, spelled ``verity_django.Audience("team-ops")``."""

    name: str
    tracked: tuple[str, ...] = field(default=(), init=False, repr=False)
    needs_instance: bool = field(default=False, init=False, repr=False)
    reads_other_rows: bool = field(default=False, init=False, repr=False)

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        constant = (self.name,)
        return lambda side: constant

    def upstream(self, model: type[models.Model]) -> Sequence[Upstream]:
        return ()


@dataclass(frozen=True)
class FieldAudience:
    attname: str
    prefix: str
    model_label: str
    needs_instance: bool = field(default=False, init=False, repr=False)

    @property
    def reads_other_rows(self) -> bool:
        return False

    @property
    def tracked(self) -> tuple[str, ...]:
        return (self.attname,)

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        return self._of

    def upstream(self, model: type[models.Model]) -> Sequence[Upstream]:
        return ()

    def _of(self, side: Side) -> Iterator[str]:
        value = side.values.get(self.attname, MISSING)
        if value is not MISSING and value is not None:
            where = f"directive_audience field {self.attname!r}"
            audience = _checked(self.model_label, where, f"{self.prefix}{value}")
            if audience is not None:
                yield audience


@dataclass(frozen=True)
class PathAudience(FieldAudience):
    """``"board__team"``: the first foreign key's id is tracked like a field
    audience's, so the old and the new one are known; the rest of the path is
    read with one query for all the sides of an operation."""

    path: str
    target: type[models.Model]
    target_field: str
    rest: str

    @property
    def reads_other_rows(self) -> bool:
        return True

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        ids = {
            value
            for side in sides
            if (value := side.values.get(self.attname, MISSING)) is not MISSING
            and value is not None
        }
        found: dict[Any, Any] = {}
        rows = self.target._base_manager.using(using).order_by()
        pending = list(ids)
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start : start + _CHUNK]
            found.update(
                rows.filter(**{f"{self.target_field}__in": chunk}).values_list(
                    self.target_field, self.rest
                )
            )
        where = f"directive_audience path {self.path!r}"

        def of(side: Side) -> Iterator[str]:
            value = found.get(side.values.get(self.attname, MISSING))
            if value is not None:
                audience = _checked(self.model_label, where, f"{self.prefix}{value}")
                if audience is not None:
                    yield audience

        return of

    def upstream(self, model: type[models.Model]) -> Sequence[Upstream]:
        """Every model along the path past ``model``, nearest first, with the
        rest of the path as it reads from there."""
        names = self.path.split("__")
        fields, _ = _walk(model, names)
        return [
            Upstream(
                model=fields[hop - 1].related_model._meta.concrete_model,
                via="__".join(names[:hop]),
                spec=_path_spec(self.model_label, names[hop:], fields[hop:], self.prefix),
            )
            for hop in range(1, len(names))
        ]


@dataclass(frozen=True)
class CallableAudience:
    """``instance -> audience | list``, called on the instance as it was
    loaded and as it is now. User code: if it raises or returns something
    that is not an audience, the other audiences are still told, and the
    failure is logged and counted. What it reads of other rows cannot be
    known, so a change of those rows (the card's board moved to another
    team) is not told to it: :class:`PathAudience` says what it reads."""

    func: Callable[[Any], Any]
    model_label: str
    tracked: tuple[str, ...]
    needs_instance: bool = field(default=True, init=False, repr=False)
    reads_other_rows: bool = field(default=True, init=False, repr=False)

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        instances = [s.instance for s in sides if s.instance is not None]
        if len(instances) > 2:
            _prefetch_foreign_keys(instances)
        memo: dict[int, tuple[str, ...]] = {}

        def of(side: Side) -> tuple[str, ...]:
            if side.instance is None:
                return ()
            key = id(side.instance)
            if key not in memo:
                memo[key] = self._call(side.instance)
            return memo[key]

        return of

    def _call(self, instance: Any) -> tuple[str, ...]:
        where = "directive_audience callable"
        try:
            produced = self.func(instance)
        except Exception as exc:
            report_user_code_error(self.model_label, where, self.func, f"raised {exc!r}")
            return ()
        items = [produced] if isinstance(produced, str) else produced
        if not isinstance(items, list | tuple | set | frozenset):
            report_user_code_error(
                self.model_label,
                where,
                self.func,
                f"returned {produced!r}, not an audience or a list of audiences",
            )
            return ()
        out = []
        for item in items:
            try:
                out.append(validate_audience(item))
            except InvalidAudience as exc:
                report_user_code_error(self.model_label, where, self.func, f"returned {exc}")
        return tuple(out)

    def upstream(self, model: type[models.Model]) -> Sequence[Upstream]:
        return ()


@dataclass(frozen=True)
class AudienceList:
    specs: tuple[AudienceSpec, ...]

    @property
    def tracked(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a for s in self.specs for a in s.tracked))

    @property
    def needs_instance(self) -> bool:
        return any(s.needs_instance for s in self.specs)

    @property
    def reads_other_rows(self) -> bool:
        return any(s.reads_other_rows for s in self.specs)

    def resolve(self, sides: Sequence[Side], using: str) -> Resolved:
        resolved = [s.resolve(sides, using) for s in self.specs]
        return lambda side: [a for of in resolved for a in of(side)]


def parse(
    model: type[models.Model], declared: Any
) -> tuple[AudienceList, list[checks.CheckMessage]]:
    """The spec a ``directive_audience`` declares, and what is wrong with it."""
    items = [GLOBAL] if declared is None else declared
    if not isinstance(items, list | tuple):
        items = [items]
    specs: list[AudienceSpec] = []
    errors: list[checks.CheckMessage] = []
    for item in items:
        spec, error = _parse_one(model, item)
        if error is not None:
            errors.append(error)
        elif spec is not None:
            specs.append(spec)
    return AudienceList(tuple(specs)), errors


def _parse_one(
    model: type[models.Model], item: Any
) -> tuple[AudienceSpec | None, checks.CheckMessage | None]:
    label = model._meta.label
    if isinstance(item, Audience):
        try:
            validate_audience(item.name)
        except InvalidAudience as exc:
            return None, _error(model, f"directive_audience {item!r} is not valid: {exc}.", "E109")
        return item, None
    if callable(item):
        return CallableAudience(item, label, _all_attnames(model)), None
    if not isinstance(item, str):
        return None, _error(
            model,
            f"directive_audience {item!r} must be a field name, a related path, "
            "verity_django.Audience(...) or a callable.",
            "E109",
        )
    first = concrete_field(model, item)
    if first is not None:
        if first.is_relation and first.related_model is not None:
            return FieldAudience(first.get_attname(), prefix_for(first.related_model), label), None
        return FieldAudience(first.get_attname(), "", label), None
    if "__" in item:
        return _parse_path(model, item)
    if item == GLOBAL:
        return Audience(GLOBAL), None
    return None, _error(
        model,
        f"directive_audience {item!r} is neither a field, a related path nor 'global' of {label}.",
        "E111",
        hint=f"For a constant audience write verity_django.Audience({item!r}); for a "
        "field or a related path, check its spelling.",
    )


def _parse_path(
    model: type[models.Model], path: str
) -> tuple[AudienceSpec | None, checks.CheckMessage | None]:
    names = path.split("__")
    fields, error = _walk(model, names)
    if error is not None:
        return None, _error(
            model,
            f"directive_audience {path!r}: {error}.",
            "E112",
            hint="A related path follows foreign keys (lookup spelling, "
            "'board__team') and ends at a field or a foreign key.",
        )
    final = fields[-1]
    prefix = prefix_for(final.related_model) if final.is_relation else ""
    return _path_spec(model._meta.label, names, fields, prefix), None


def _walk(model: type[models.Model], names: Sequence[str]) -> tuple[list[Any], str | None]:
    """The fields ``names`` follows from ``model``, or what is wrong with them."""
    current: Any = model
    fields: list[Any] = []
    for position, name in enumerate(names):
        f = concrete_field(current, name)
        last = position == len(names) - 1
        if f is None or (not last and not (f.is_relation and f.related_model is not None)):
            kind = "concrete field" if last else "foreign key"
            return fields, f"{name!r} is not a {kind} of {current._meta.label}"
        fields.append(f)
        current = f.related_model if f.is_relation else current
    return fields, None


def _path_spec(
    model_label: str, names: Sequence[str], fields: Sequence[Any], prefix: str
) -> FieldAudience:
    first = fields[0]
    if len(names) == 1:
        return FieldAudience(first.get_attname(), prefix, model_label)
    return PathAudience(
        path="__".join(names),
        attname=first.get_attname(),
        target=first.related_model,
        target_field=first.target_field.attname,
        rest="__".join(names[1:]),
        prefix=prefix,
        model_label=model_label,
    )


@dataclass(frozen=True)
class Upstream:
    """A model further up a path audience, whose rows decide it for the rows
    below: for Card's ``"board__team"``, ``Board`` (reached ``via="board"``)
    decides it with ``spec``, its own ``"team"``."""

    model: type[models.Model]
    via: str
    spec: FieldAudience


def prefix_for(related: Any) -> str:
    """``user-`` for the user model, ``<model_name>-`` for other models.

    A model of another app that is also named ``user`` gets its app label in
    front (``crm.user-<pk>``), so that its audiences never name real users.
    """
    if related._meta.label == settings.AUTH_USER_MODEL:
        return "user-"
    name = related._meta.model_name
    if name == "user":
        return f"{related._meta.app_label}.{name}-"
    return f"{name}-"


def _all_attnames(model: type[models.Model]) -> tuple[str, ...]:
    # A callable may read any field; the loaded state is rebuilt from them.
    return tuple(f.attname for f in model._meta.concrete_fields)


def _checked(model_label: str, where: str, audience: str) -> str | None:
    try:
        return validate_audience(audience)
    except InvalidAudience as exc:
        report_refused_value(model_label, where, audience, str(exc))
        return None


def _prefetch_foreign_keys(instances: list[Any]) -> None:
    """Load every forward foreign key of many instances in one query each, so
    that a callable reading ``card.board`` does not cost a query per row."""
    model = type(instances[0])
    names = [
        f.name
        for f in model._meta.concrete_fields
        if f.is_relation and f.many_to_one and not f.is_cached(instances[0])
    ]
    if names:
        models.prefetch_related_objects(instances, *names)


def _error(model: Any, msg: str, code: str, hint: str | None = None) -> checks.CheckMessage:
    return checks.Error(msg, hint=hint, obj=model, id=f"verity_django.{code}")
