"""The ``result`` payloads a ``refresh_item`` may carry (PROTOCOL.md §1).

A ``RefreshItem(result=...)`` callable may return plain data, which the rule
wraps as the default level (or ``result_level``), or one of these, which is
sent in its own shape. The client writes a payload straight into its cache
and refetches none of the levels it satisfies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from verity_django.directives import now_ms

# How the default level is named as a key of ``{"levels": {...}}``: the
# client's conversion maps spell the default level ``null``, and a JSON key
# is a string.
DEFAULT_LEVEL_KEY = "null"


@dataclass(frozen=True)
class LevelResult:
    """One level's data: ``{"level": ..., "data": ..., "ts": ...}``.

    ``level=None`` is the default level, sent as ``{"data": ..., "ts": ...}``.
    """

    level: str | None
    data: Any
    ts: int = field(default_factory=now_ms)

    def as_json(self) -> dict[str, Any]:
        if self.level is None:
            return {"data": self.data, "ts": self.ts}
        return {"level": self.level, "data": self.data, "ts": self.ts}


@dataclass(frozen=True)
class LevelsResult:
    """Several levels at once: ``{"levels": {"<level>": {"data": ..., "ts": ...}}}``."""

    levels: Mapping[str | None, Any]
    ts: int = field(default_factory=now_ms)

    def as_json(self) -> dict[str, Any]:
        return {
            "levels": {
                DEFAULT_LEVEL_KEY if level is None else level: {"data": data, "ts": self.ts}
                for level, data in self.levels.items()
            }
        }


Payload = LevelResult | LevelsResult
