"""Remember, when an instance is loaded, the fields its rules reference.

The snapshot is taken from the instance's own ``__dict__`` in ``post_init``,
so it costs no query; deferred fields are simply absent and count as unknown.
It is kept equal to what the database holds: a save with ``update_fields``
(or a ``bulk_update`` of some fields) takes only those fields as new, and
``refresh_from_db()`` takes a new snapshot.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from verity_django.rules import MISSING

_SNAPSHOT = "_verity_loaded_values"


def snapshot(instance: Any, attnames: Iterable[str]) -> None:
    values = instance.__dict__
    values[_SNAPSHOT] = {name: values.get(name, MISSING) for name in attnames}


def previous(instance: Any) -> Mapping[str, Any] | None:
    found: Mapping[str, Any] | None = instance.__dict__.get(_SNAPSHOT)
    return found


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


def remember(instance: Any, values: Mapping[str, Any]) -> None:
    instance.__dict__[_SNAPSHOT] = dict(values)


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
    remember(instance, {**old, **{name: values.get(name, MISSING) for name in names}})


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
