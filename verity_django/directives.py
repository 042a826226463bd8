"""Directive values: the four ops of the Verity contract, their metadata,
validation and JSON.

A :class:`Directive` is immutable. Its *identity* (op, name, id, params, …)
is what batching deduplicates on; metadata (idempotency key, timestamp,
source, seq) and ``result`` ride along without changing what it means.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import MISSING as MISSING_DEFAULT
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast

Op = Literal["refresh_collection", "refresh_item", "invalidate", "force_reload_page"]
OPS: tuple[Op, ...] = ("refresh_collection", "refresh_item", "invalidate", "force_reload_page")
PARAMS_MODES = ("exact", "contains")

_FIELDS_BY_OP: dict[str, frozenset[str]] = {
    "refresh_collection": frozenset({"name", "params", "params_mode", "result"}),
    "refresh_item": frozenset({"name", "id", "level", "result"}),
    "invalidate": frozenset({"targets"}),
    "force_reload_page": frozenset({"hard"}),
}
METADATA_FIELDS = frozenset({"idempotency_key", "timestamp", "audience", "source", "seq"})
# Fields that ride along without changing what a directive means: metadata,
# and ``result`` (the changed object's data, which spares a refetch).
RIDE_ALONG_FIELDS = METADATA_FIELDS | {"result"}
_MAX_TEXT = 200
_MAX_DEPTH = 4
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

JSON_SEPARATORS = (",", ":")


class InvalidDirective(ValueError):
    """A directive that the Verity contract does not allow."""


def dumps(value: Any) -> str:
    """The one JSON encoding used on the wire: compact, UTF-8, no NaN."""
    return _ENCODER.encode(value)


# One encoder for every call: json.dumps() with options builds a new one each
# time, and every envelope is encoded twice or more (bench W1).
_ENCODER = json.JSONEncoder(separators=JSON_SEPARATORS, ensure_ascii=False, allow_nan=False)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_idempotency_key() -> str:
    """A fresh key in ``uuid4().hex``'s format.

    The bits come from a generator seeded from ``os.urandom`` once per
    process (and again in a forked child), not from ``os.urandom`` per key:
    that syscall releases the GIL, and under concurrent requests (bench W5)
    each release handed the GIL to another thread, about six times per
    PATCH. Keys must be unique, not secret: a client only uses them to drop
    a directive it has already applied, and nothing is authorized by one.
    """
    bits = _key_bits.getrandbits(128) & _KEY_CLEAR | _KEY_VERSION
    return f"{bits:032x}"


# The version (4) and variant (RFC 4122) bits of a uuid4.
_KEY_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_KEY_VERSION = (0x4 << 76) | (0x2 << 62)
_key_bits = random.Random(os.urandom(32))


def _reseed_after_fork() -> None:
    _key_bits.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed_after_fork)


@dataclass(frozen=True, eq=False)
class Directive:
    op: Op
    name: str | None = None
    id: str | int | None = None
    params: Mapping[str, Any] | None = None
    params_mode: str = "exact"
    level: str | None = None
    targets: tuple[Directive, ...] = ()
    hard: bool = False
    result: Any = None
    idempotency_key: str | None = None
    timestamp: int | None = None
    audience: str | None = None
    source: str | None = None
    seq: int | None = None
    _identity: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self, depth=0)
        object.__setattr__(self, "_identity", self._compute_identity())

    def _compute_identity(self) -> tuple[Any, ...]:
        params = None if not self.params else _params_identity(self.params)
        return (
            self.op,
            self.name,
            None if self.id is None else (type(self.id).__name__, self.id),
            params,
            self.params_mode if params else "exact",
            self.level,
            tuple(t.identity for t in self.targets),
            self.hard,
        )

    @classmethod
    def trusted(cls, **fields: Any) -> Directive:
        """Build without validation from values that are valid by
        construction: rules check their names at start-up and turn field
        values into JSON scalars. This runs for every directive rules build
        (bench W4 with the rules' directive cache off: verity's extra Python
        calls per 200 saves 66,368 validated, 50,768 trusted)."""
        directive = object.__new__(cls)
        directive.__dict__.update(_DEFAULTS)
        directive.__dict__.update(fields)
        directive.__dict__["_identity"] = directive._compute_identity()
        return directive

    @property
    def identity(self) -> tuple[Any, ...]:
        """What the directive means, without metadata or ``result``."""
        return self._identity

    def _compared(self) -> tuple[Any, ...]:
        # JSON tells 1, 1.0 and true apart where Python's == does not, so
        # result is compared as its canonical JSON, as identity does params.
        result = None if self.result is None else _canonical_json(self.result)
        metadata = tuple(getattr(self, name) for name in sorted(METADATA_FIELDS))
        return (self._identity, result, metadata)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directive):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        # Equal directives have equal identities, so this keeps the contract.
        return hash(self._identity)

    def with_metadata(self, **changes: Any) -> Directive:
        """A copy with other metadata. What the directive means is unchanged,
        so only metadata is validated again (this runs for every directive
        of every change)."""
        if not changes.keys() <= RIDE_ALONG_FIELDS:
            return replace(self, **changes)
        copy = self.with_trusted_metadata(**changes)
        # What was already valid stays so: a result payload is not walked
        # again for every key stamped on it.
        _validate_metadata(copy, changes)
        return copy

    def with_trusted_metadata(self, **changes: Any) -> Directive:
        """A copy with metadata that is valid by construction, not checked
        again: keys and timestamps verity made, a source validated when its
        batch was opened (stamping runs for every directive; bench W1: 19
        Python calls per directive down to 4)."""
        copy = object.__new__(Directive)
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def to_dict(self, *, metadata: bool = True, source: bool = True) -> dict[str, Any]:
        """The contract's JSON object, with no ``null`` noise; without
        ``source`` when ``source`` is False (the push copy)."""
        out: dict[str, Any] = {"op": self.op}
        if self.name is not None:
            out["name"] = self.name
        if self.id is not None:
            out["id"] = self.id
        if self.level is not None:
            out["level"] = self.level
        if self.params:
            out["params"] = dict(self.params)
            if self.params_mode != "exact":
                out["params_mode"] = self.params_mode
        if self.op == "invalidate":
            out["targets"] = [t.to_dict(metadata=metadata, source=source) for t in self.targets]
        if self.hard:
            out["hard"] = True
        if self.result is not None:
            out["result"] = self.result
        if metadata:
            # Spelled out, not a getattr() loop: this runs for every directive
            # on both the pull and the push path (bench W1).
            if self.idempotency_key is not None:
                out["idempotency_key"] = self.idempotency_key
            if self.timestamp is not None:
                out["timestamp"] = self.timestamp
            if self.audience is not None:
                out["audience"] = self.audience
            if source and self.source is not None:
                out["source"] = self.source
            if self.seq is not None:
                out["seq"] = self.seq
        return out

    @classmethod
    def from_dict(cls, data: Any, *, _depth: int = 0) -> Directive:
        """Parse and validate a directive given as JSON data."""
        if not isinstance(data, Mapping):
            raise InvalidDirective(f"a directive must be a JSON object, got {_kind(data)}")
        op = data.get("op")
        if op not in OPS:
            raise InvalidDirective(f"'op' must be one of {', '.join(OPS)}; got {op!r}")
        allowed = _FIELDS_BY_OP[op] | RIDE_ALONG_FIELDS | {"op"}
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            raise InvalidDirective(f"{op}: unknown field(s) {', '.join(map(repr, unknown))}")
        kwargs = {k: v for k, v in data.items() if k != "op"}
        if op == "invalidate":
            targets = kwargs.get("targets")
            if not isinstance(targets, list):
                raise InvalidDirective(
                    f"invalidate: 'targets' must be a list of directives, got {_kind(targets)}"
                )
            if _depth >= _MAX_DEPTH:
                raise InvalidDirective(f"invalidate: nested deeper than {_MAX_DEPTH} levels")
            kwargs["targets"] = tuple(cls.from_dict(t, _depth=_depth + 1) for t in targets)
        if op == "force_reload_page" and "hard" in kwargs and not isinstance(kwargs["hard"], bool):
            raise InvalidDirective(
                f"force_reload_page: 'hard' must be a boolean, got {_kind(kwargs['hard'])}"
            )
        return cls(op=cast(Op, op), **kwargs)


# Every init field's default, for trusted(): derived, so a new field cannot
# be forgotten there.
_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Directive) if f.init and f.default is not MISSING_DEFAULT
}


def refresh_collection(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    params_mode: str = "exact",
    result: Any = None,
    **metadata: Any,
) -> Directive:
    return Directive(
        op="refresh_collection",
        name=name,
        params=params,
        params_mode=params_mode,
        result=result,
        **metadata,
    )


def refresh_item(
    name: str, id: str | int, *, level: str | None = None, result: Any = None, **metadata: Any
) -> Directive:
    return Directive(op="refresh_item", name=name, id=id, level=level, result=result, **metadata)


def invalidate(targets: Iterable[Directive], **metadata: Any) -> Directive:
    return Directive(op="invalidate", targets=tuple(targets), **metadata)


def force_reload_page(*, hard: bool = False, **metadata: Any) -> Directive:
    return Directive(op="force_reload_page", hard=hard, **metadata)


def _validate(d: Directive, depth: int) -> None:
    op = d.op
    if op not in OPS:
        raise InvalidDirective(f"'op' must be one of {', '.join(OPS)}; got {op!r}")
    if op in ("refresh_collection", "refresh_item"):
        _require_text(op, "name", d.name)
    elif d.name is not None:
        raise InvalidDirective(f"{op}: 'name' is not a field of this op")
    if op == "refresh_item":
        if d.id is None:
            raise InvalidDirective("refresh_item: missing required field 'id'")
        if isinstance(d.id, bool) or not isinstance(d.id, str | int):
            raise InvalidDirective(
                f"refresh_item: 'id' must be a string or a number, got {_kind(d.id)}"
            )
        if isinstance(d.id, str) and not d.id:
            raise InvalidDirective("refresh_item: 'id' must not be empty")
        if d.level is not None:
            _require_text(op, "level", d.level)
    else:
        if d.id is not None:
            raise InvalidDirective(f"{op}: 'id' is not a field of this op")
        if d.level is not None:
            raise InvalidDirective(f"{op}: 'level' is not a field of this op")
    if op == "refresh_collection":
        if d.params is not None:
            if not isinstance(d.params, Mapping):
                raise InvalidDirective(
                    f"refresh_collection: 'params' must be an object, got {_kind(d.params)}"
                )
            for key, value in d.params.items():
                if not isinstance(key, str):
                    raise InvalidDirective(
                        f"refresh_collection: params keys must be strings, got {key!r}"
                    )
                _require_unicode(op, "params", key)
                _require_json(op, f"params.{key}", value)
            object.__setattr__(d, "params", dict(d.params))
        if d.params_mode not in PARAMS_MODES:
            raise InvalidDirective(
                "refresh_collection: 'params_mode' must be 'exact' or 'contains', "
                f"got {d.params_mode!r}"
            )
    elif d.params is not None or d.params_mode != "exact":
        raise InvalidDirective(f"{op}: 'params' is not a field of this op")
    if op == "invalidate":
        if not d.targets:
            raise InvalidDirective("invalidate: missing required field 'targets'")
        if depth >= _MAX_DEPTH:
            raise InvalidDirective(f"invalidate: nested deeper than {_MAX_DEPTH} levels")
        for target in d.targets:
            if not isinstance(target, Directive):
                raise InvalidDirective(
                    f"invalidate: every target must be a Directive, got {_kind(target)}"
                )
    elif d.targets:
        raise InvalidDirective(f"{op}: 'targets' is not a field of this op")
    if not isinstance(d.hard, bool):
        raise InvalidDirective(f"{op}: 'hard' must be a boolean, got {_kind(d.hard)}")
    if d.hard and op != "force_reload_page":
        raise InvalidDirective(f"{op}: 'hard' is not a field of this op")
    _validate_metadata(d)


_METADATA_CHECKED = frozenset(
    {"source", "result", "idempotency_key", "timestamp", "seq", "audience"}
)


def _validate_metadata(d: Directive, only: Iterable[str] | None = None) -> None:
    """Check the metadata fields, or only those named in ``only``."""
    op = d.op
    names = _METADATA_CHECKED if only is None else only
    if op == "force_reload_page" and d.source is not None and "source" in names:
        raise InvalidDirective(
            "force_reload_page: must not carry a 'source' (every client reloads)"
        )
    if d.result is not None and "result" in names:
        if op not in ("refresh_collection", "refresh_item"):
            raise InvalidDirective(f"{op}: 'result' is not a field of this op")
        _require_json(op, "result", d.result)
    if d.idempotency_key is not None and "idempotency_key" in names:
        _require_text(op, "idempotency_key", d.idempotency_key)
    if (
        d.timestamp is not None
        and "timestamp" in names
        and (isinstance(d.timestamp, bool) or not isinstance(d.timestamp, int) or d.timestamp < 0)
    ):
        raise InvalidDirective(
            f"{op}: 'timestamp' must be a non-negative integer (ms), got {d.timestamp!r}"
        )
    if d.source is not None and "source" in names:
        _require_text(op, "source", d.source)
    if (
        d.seq is not None
        and "seq" in names
        and (isinstance(d.seq, bool) or not isinstance(d.seq, int) or d.seq < 1)
    ):
        raise InvalidDirective(f"{op}: 'seq' must be a positive integer, got {d.seq!r}")
    if d.audience is not None and "audience" in names:
        from verity_django.audiences import InvalidAudience, validate_audience

        try:
            validate_audience(d.audience)
        except InvalidAudience as exc:
            raise InvalidDirective(f"{op}: {exc}") from None


def validate_source(value: Any) -> str:
    """A ``source`` as every directive may carry it; InvalidDirective if not."""
    _require_text("directive", "source", value)
    return str(value)


def _require_text(op: str, name: str, value: Any) -> None:
    if value is None:
        raise InvalidDirective(f"{op}: missing required field '{name}'")
    if not isinstance(value, str):
        raise InvalidDirective(f"{op}: '{name}' must be a string, got {_kind(value)}")
    if not value:
        raise InvalidDirective(f"{op}: missing required field '{name}'")
    if len(value) > _MAX_TEXT:
        raise InvalidDirective(f"{op}: '{name}' is longer than {_MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise InvalidDirective(f"{op}: '{name}' contains control characters")
    _require_unicode(op, name, value)


def _require_unicode(op: str, name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidDirective(f"{op}: '{name}' is not valid Unicode (lone surrogate)") from None


def _require_json(op: str, name: str, value: Any, depth: int = 0) -> None:
    if depth > 32:
        raise InvalidDirective(f"{op}: '{name}' is nested too deeply")
    if isinstance(value, str):
        _require_unicode(op, name, value)
        return
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidDirective(f"{op}: '{name}' must be a finite number, got {value!r}")
        return
    if isinstance(value, list | tuple):
        for item in value:
            _require_json(op, name, item, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidDirective(f"{op}: '{name}' has a non-string key {key!r}")
            _require_unicode(op, name, key)
            _require_json(op, name, item, depth + 1)
        return
    raise InvalidDirective(f"{op}: '{name}' must be JSON data, got {_kind(value)}")


_SCALARS = (str, int, float, bool, type(None))


def _params_identity(params: Mapping[str, Any]) -> Any:
    """Params compared as JSON with sorted keys, cheaply for flat params.

    The value's type is part of the key because JSON tells ``1`` from
    ``true`` and ``1.0`` where Python's equality does not.
    """
    if all(type(v) in _SCALARS for v in params.values()):
        return tuple(sorted((k, type(v), v) for k, v in params.items()))
    return dumps(_sorted(params))


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=JSON_SEPARATORS, default=repr)


def _sorted(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted(v) for v in value]
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return type(value).__name__
