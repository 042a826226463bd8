"""Levels of one item type, declared once: a serializer per level name and
which level's data satisfies which.

The same declaration serves ``?level=`` on retrieve and bulk fetch, and
builds the ``result`` payloads a ``RefreshItem`` sends, so what a client
refetches and what a directive hands it can never disagree.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from verity_django.results import DEFAULT_LEVEL_KEY, LevelResult, LevelsResult, Payload

if TYPE_CHECKING:
    from rest_framework.serializers import BaseSerializer

SerializerRef: TypeAlias = "type[BaseSerializer[Any]] | str"
# Spellings the client reads as the default level, so no named level may use them.
_RESERVED = frozenset({"", DEFAULT_LEVEL_KEY, "default"})


class Pick(enum.Enum):
    """Which levels a ``result`` carries, besides naming one level."""

    MAXIMAL = "maximal"
    EVERY_LEVEL = "every level"


MAXIMAL = Pick.MAXIMAL
EVERY_LEVEL = Pick.EVERY_LEVEL


class UnknownLevel(ValueError):
    def __init__(self, level: str, levels: Levels) -> None:
        self.level = level
        named = [n for n in levels.names if n is not None]
        super().__init__(
            f"Unknown level {level!r}. Use one of: {', '.join(named)}, or no level for the default."
        )


class Levels:
    """The levels of one item type.

    ``serializers`` maps each level name to its serializer class (or its
    dotted path, for declarations that must not import the serializers yet);
    ``None`` is the default level and is required. ``converts`` maps a level
    to the levels its data also satisfies (``{"expanded": ["simplified"],
    "simplified": [None]}``); the relation is transitive. The *maximal* level
    is the one whose data satisfies every level.
    """

    def __init__(
        self,
        serializers: Mapping[str | None, SerializerRef],
        *,
        converts: Mapping[str | None, Iterable[str | None]] | None = None,
    ) -> None:
        if None not in serializers:
            raise ImproperlyConfigured("Levels need a serializer for the default level (None).")
        for name in serializers:
            if name is not None and (not isinstance(name, str) or name.strip() in _RESERVED):
                raise ImproperlyConfigured(
                    f"{name!r} is not a level name: use a non-empty string other than "
                    f"{', '.join(repr(r) for r in sorted(_RESERVED) if r)}."
                )
        self.names: tuple[str | None, ...] = (None, *(n for n in serializers if n is not None))
        self._serializers = dict(serializers)
        edges: dict[str | None, set[str | None]] = {name: set() for name in self.names}
        for source, targets in (converts or {}).items():
            for level in (source, *targets):
                if level not in edges:
                    raise ImproperlyConfigured(f"converts names {level!r}, which is not a level.")
            edges[source].update(targets)
        self._satisfies = {name: _closure(name, edges) for name in self.names}
        everything = frozenset(self.names)
        widest = [name for name in self.names if self._satisfies[name] == everything]
        self.maximal: str | None = widest[0] if len(widest) == 1 else None

    def satisfies(self, level: str | None) -> frozenset[str | None]:
        """The levels that fresh data at ``level`` makes fresh (itself included)."""
        return self._satisfies[level]

    def parse(self, raw: str | None) -> str | None:
        """The level a ``?level=`` value names; raises :class:`UnknownLevel`."""
        if raw is None or raw in _RESERVED:
            return None
        if raw not in self._serializers:
            raise UnknownLevel(raw, self)
        return raw

    def serializer_class(self, level: str | None) -> type[BaseSerializer[Any]]:
        ref = self._serializers[level]
        if isinstance(ref, str):
            try:
                ref = import_string(ref)
            except ImportError as exc:
                raise ImproperlyConfigured(f"Level {level!r}: cannot import {ref!r}.") from exc
            self._serializers[level] = ref
        return ref

    def data(
        self, instance: Any, level: str | None, context: Mapping[str, Any] | None = None
    ) -> Any:
        serializer = self.serializer_class(level)(instance, context=dict(context or {}))
        return serializer.data

    def payload(self, instance: Any, pick: str | Pick | None) -> Payload:
        """The ``result`` for ``instance``: one named level, the maximal one, or all."""
        if pick is Pick.EVERY_LEVEL:
            return LevelsResult({level: self.data(instance, level) for level in self.names})
        level = self.maximal if pick is Pick.MAXIMAL else pick
        return LevelResult(level, self.data(instance, level))

    def result(self, pick: str | Pick | None = MAXIMAL) -> Callable[[Any], Payload]:
        """A ``RefreshItem(result=...)`` callable built from these levels."""
        return LevelResultBuilder(self, pick)


class LevelResultBuilder:
    """``RefreshItem(result=...)``: the instance's data at the picked levels.

    ``levels`` may be a dotted path to a :class:`Levels`, so that a model's
    ``Meta`` can name levels whose serializers import the model.
    """

    def __init__(self, levels: Levels | str, pick: str | Pick | None = MAXIMAL) -> None:
        self._ref = levels
        self.pick = pick
        self._levels = levels if isinstance(levels, Levels) else None
        if self._levels is not None:
            _check_pick(self._levels, pick, levels)
        _builders.add(self)

    @property
    def levels(self) -> Levels:
        if self._levels is None:
            try:
                found = import_string(str(self._ref))
            except ImportError as exc:
                raise ImproperlyConfigured(f"level_result: cannot import {self._ref!r}.") from exc
            if not isinstance(found, Levels):
                raise ImproperlyConfigured(f"level_result: {self._ref!r} is not a Levels.")
            _check_pick(found, self.pick, self._ref)
            self._levels = found
        return self._levels

    def __call__(self, instance: Any) -> Payload:
        return self.levels.payload(instance, self.pick)

    def __repr__(self) -> str:
        pick = self.pick.value if isinstance(self.pick, Pick) else repr(self.pick)
        return f"level_result({self._ref!r}, {pick})"


def level_result(levels: Levels | str, pick: str | Pick | None = MAXIMAL) -> LevelResultBuilder:
    """``RefreshItem("todo", result=level_result("app.api.TODO_LEVELS"))``.

    ``pick`` is a level name (``None`` for the default), ``MAXIMAL`` (the
    default: one level that the client's conversions spread to every level it
    holds) or ``EVERY_LEVEL`` (each level's own data, for clients without
    conversions).
    """
    return LevelResultBuilder(levels, pick)


def _closure(
    start: str | None, edges: Mapping[str | None, set[str | None]]
) -> frozenset[str | None]:
    seen = {start}
    stack = [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return frozenset(seen)


def _check_pick(levels: Levels, pick: str | Pick | None, ref: object) -> None:
    if pick is MAXIMAL and levels.maximal is None:
        raise ImproperlyConfigured(
            f"{ref!r} has no maximal level: declare converts so that one level satisfies all."
        )
    if not isinstance(pick, Pick) and pick not in levels.names:
        raise ImproperlyConfigured(f"{ref!r} has no level {pick!r}.")


# Builders named by dotted path resolve lazily; a system check resolves them
# at start-up, so a typo is an error before the first save rather than in it.
_builders: weakref.WeakSet[LevelResultBuilder] = weakref.WeakSet()


@checks.register()
def check_level_results(**kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for builder in list(_builders):
        try:
            for level in builder.levels.names:
                builder.levels.serializer_class(level)
        except ImproperlyConfigured as exc:
            errors.append(
                checks.Error(
                    str(exc),
                    hint="level_result() takes a Levels or the dotted path of one.",
                    obj=builder,
                    id="verity_django.E201",
                )
            )
    return errors
