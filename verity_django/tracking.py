"""Remember, when an instance is loaded, the fields its rules reference.

The snapshot is taken from the instance's own ``__dict__`` in ``post_init``,
so it costs no query; deferred fields are simply absent and count as unknown.
It is kept equal to what the database holds: a save with ``update_fields``
(or a ``bulk_update`` of some fields) takes only those fields as new, and
``refresh_from_db()`` takes a new snapshot.

A save inside an atomic block is remembered *pending* that block: Django
drops an ``on_commit`` callback when its savepoint (or transaction) rolls
back, so one marker per savepoint level tells, when the snapshot is next
read, whether the values it took still stand or the row went back to the
ones remembered before (Django does not undo the instance itself).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import connections, transaction

from verity_django import internals
from verity_django.rules import MISSING

_SNAPSHOT = "_verity_loaded_values"
# (level, the snapshot before, the pending entry before): newest first.
_PENDING = "_verity_pending_values"
_LEVEL_ATTR = "_verity_open_level"


class _Level:
    """One savepoint level of one transaction, registered with ``on_commit``."""

    __slots__ = ("committed", "savepoints")

    def __init__(self, savepoints: tuple[str, ...]) -> None:
        self.savepoints = savepoints
        self.committed = False

    def __call__(self) -> None:
        self.committed = True


def snapshot(instance: Any, attnames: Iterable[str]) -> None:
    values = instance.__dict__
    values[_SNAPSHOT] = {name: values.get(name, MISSING) for name in attnames}


def previous(instance: Any) -> Mapping[str, Any] | None:
    values = instance.__dict__
    if _PENDING in values:
        _settle(values)
    found: Mapping[str, Any] | None = values.get(_SNAPSHOT)
    return found


def _settle(values: dict[str, Any]) -> None:
    """Go back past the saves whose savepoint or transaction rolled back."""
    pending = values[_PENDING]
    while pending is not None:
        level, connection, before, earlier = pending
        if level.committed:
            # Everything pending committed with it.
            values.pop(_PENDING)
            return
        if internals.is_registered(connection, level):
            values[_PENDING] = pending
            return
        values[_SNAPSHOT] = before
        pending = earlier
    values.pop(_PENDING)
    if values[_SNAPSHOT] is None:
        values.pop(_SNAPSHOT)


def current(instance: Any, attnames: Iterable[str]) -> dict[str, Any]:
    values = instance.__dict__
    return {name: values.get(name, MISSING) for name in attnames}


def written(instance: Any, attnames: Iterable[str], fields: Iterable[str] | None) -> dict[str, Any]:
    """The values the database holds after writing ``fields`` of ``instance``
    (all of them when None); the others keep their loaded values."""
    now = current(instance, attnames)
    old = previous(instance)
    if fields is None or old is None:
        return now
    meta = instance._meta
    saved = {meta.get_field(name).attname for name in fields}
    return {name: value if name in saved else old.get(name, MISSING) for name, value in now.items()}


def remember(instance: Any, values: Mapping[str, Any], using: str | None = None) -> None:
    """Take ``values`` as what the database holds after a write through
    ``using``, pending the atomic block the write is in."""
    own = instance.__dict__
    if using is not None:
        connection = connections[using]
        if connection.in_atomic_block:
            before = own.get(_SNAPSHOT)
            own[_PENDING] = (_open_level(connection), connection, before, own.get(_PENDING))
    own[_SNAPSHOT] = dict(values)


def _open_level(connection: Any) -> _Level:
    savepoints = internals.open_savepoints(connection)
    level: _Level | None = getattr(connection, _LEVEL_ATTR, None)
    if (
        level is not None
        and level.savepoints == savepoints
        and not level.committed
        # Still registered: a rollback of its savepoint or transaction drops it.
        and internals.is_registered(connection, level)
    ):
        return level
    level = _Level(savepoints)
    setattr(connection, _LEVEL_ATTR, level)
    transaction.on_commit(level, using=connection.alias)
    return level


def refreshed(instance: Any, fields: Iterable[str] | None) -> None:
    """Take the values ``refresh_from_db(fields)`` just read as the loaded ones."""
    old = previous(instance)
    if old is None:
        return
    values = instance.__dict__
    names = (
        old.keys()
        if fields is None
        else {instance._meta.get_field(name).attname for name in fields} & old.keys()
    )
    fresh = {**old, **{name: values.get(name, MISSING) for name in names}}
    remember(instance, fresh, instance._state.db)


def as_loaded(instance: Any) -> Any:
    """The instance as it was when loaded (see :func:`with_values`)."""
    old = previous(instance)
    return instance if old is None else with_values(instance, old)


def with_values(instance: Any, values: Mapping[str, Any]) -> Any:
    """``instance`` itself when it holds ``values`` already, else a copy that
    does, whose related objects that differ are fetched again when read."""
    own = instance.__dict__
    changed = {
        name: value
        for name, value in values.items()
        if value is not MISSING and own.get(name, MISSING) != value
    }
    if not changed:
        return instance
    # Django copies _state and its cache of related objects with the instance.
    copied = copy.copy(instance)
    copied.__dict__.update(changed)
    for field in instance._meta.concrete_fields:
        if field.is_relation and field.attname in changed and field.is_cached(copied):
            field.delete_cached_value(copied)
    return copied
