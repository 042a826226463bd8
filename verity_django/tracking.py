"""Remember, when an instance is loaded, the fields its rules reference.

The snapshot is taken from the instance's own ``__dict__`` in ``post_init``,
so it costs no query; deferred fields are simply absent and count as unknown.
"""

from __future__ import annotations

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


def remember(instance: Any, values: Mapping[str, Any]) -> None:
    instance.__dict__[_SNAPSHOT] = dict(values)
