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

    __slots__ = ("committed", "connection", "savepoints", "seen_in")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.savepoints = internals.open_savepoints(connection)
        self.committed = False
        transaction.on_commit(self, using=connection.alias)
        self.seen_in = internals.commit_callbacks(connection)

    def __call__(self) -> None:
        self.committed = True

    def stands(self) -> bool:
        """Whether the writes of this level committed or still may."""
        if self.committed:
            return True
        if internals.still_registered(self.connection, self, self.seen_in):
            self.seen_in = internals.commit_callbacks(self.connection)
            return True
        return False


def snapshot(instance: Any, attnames: Iterable[str]) -> None:
    instance.__dict__[_SNAPSHOT] = current(instance, attnames)


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
        level, before, earlier = pending
        if level.committed:
            # Everything pending committed with it.
            break
        if level.stands():
            values[_PENDING] = pending
            return
        values[_SNAPSHOT] = before
        pending = earlier
    values.pop(_PENDING)
    if values.get(_SNAPSHOT, MISSING) is None:
        values.pop(_SNAPSHOT)


def current(instance: Any, attnames: Iterable[str]) -> dict[str, Any]:
    values = instance.__dict__
    try:
        # Subscripts, not get(): this runs on every load and save (bench W4).
        return {name: values[name] for name in attnames}
    except KeyError:
        return {name: values.get(name, MISSING) for name in attnames}


def written(instance: Any, attnames: Iterable[str], fields: Iterable[str] | None) -> dict[str, Any]:
    """The values the database holds after writing ``fields`` of ``instance``
    (all of them when None); the others keep their loaded values."""
    now = current(instance, attnames)
    if fields is None:
        return now
    old = previous(instance)
    if old is None:
        return now
    meta = instance._meta
    saved = {meta.get_field(name).attname for name in fields}
    return {name: value if name in saved else old.get(name, MISSING) for name, value in now.items()}


def remember(instance: Any, values: Mapping[str, Any], connection: Any = None) -> None:
    """Take ``values`` as what the database holds after a write through
    ``connection``, pending the atomic block the write is in.

    ``values`` is kept, not copied: callers hand over a dict of their own,
    which nothing changes afterwards (it is also the change's ``new``)."""
    own = instance.__dict__
    if connection is not None and connection.in_atomic_block:
        level = _open_level(connection)
        # Membership tests, not get(): this runs on every save (bench W4).
        pending = own[_PENDING] if _PENDING in own else None  # noqa: SIM401
        # A rollback of a level undoes all its writes: one entry will do.
        if pending is None or pending[0] is not level:
            before = own[_SNAPSHOT] if _SNAPSHOT in own else None  # noqa: SIM401
            own[_PENDING] = (level, before, pending)
    own[_SNAPSHOT] = values


def _open_level(connection: Any) -> _Level:
    level: _Level | None = getattr(connection, _LEVEL_ATTR, None)
    if (
        level is not None
        and not level.committed
        and internals.savepoints_are(connection, level.savepoints)
        and level.stands()
    ):
        return level
    level = _Level(connection)
    setattr(connection, _LEVEL_ATTR, level)
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
    db = instance._state.db
    remember(instance, fresh, None if db is None else connections[db])


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
