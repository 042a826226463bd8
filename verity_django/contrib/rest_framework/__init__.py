"""Django REST framework integration: the read side a Verity client needs.

With ``DirectiveMiddleware`` installed, every DRF response already gains
``"directives"`` when the client asks for them. Set
``VERITY["INJECT_DRF_RESPONSES"] = False`` to limit that to the views that
use :class:`DirectivesMixin`.

The rest serves what a client refetches: collections as ``{ids, count}``
filtered by the params the model's rules declare, bulk fetch, items at named
levels, and the ``result`` payloads built from the same levels.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Lazy, like verity_django's own exports: a model's Meta may name
# level_result() while DRF's views cannot be imported yet.
_EXPORTS = {
    "RuleParamsFilter": "filters",
    "collection_params": "filters",
    "EVERY_LEVEL": "levels",
    "MAXIMAL": "levels",
    "Levels": "levels",
    "UnknownLevel": "levels",
    "level_result": "levels",
    "CollectionMixin": "mixins",
    "DirectivesMixin": "mixins",
    "LevelsMixin": "mixins",
    "stable_order": "mixins",
    "VerityModelViewSet": "viewsets",
    "VerityReadOnlyModelViewSet": "viewsets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
