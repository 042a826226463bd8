"""Turn Django model changes into Verity directives.

The public API is re-exported lazily so that importing the package (which
Django does for every app in ``INSTALLED_APPS``) only teaches ``class Meta``
our options and touches nothing else.
"""

from __future__ import annotations

from typing import Any

from verity_django import options as _options  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "RefreshItem": "verity_django.rules",
    "RefreshCollection": "verity_django.rules",
    "Audience": "verity_django.audience_specs",
    "register": "verity_django.registry",
    "unregister": "verity_django.registry",
    "batch": "verity_django.batching",
    "disabled": "verity_django.batching",
    "emit": "verity_django.batching",
    "revoke": "verity_django.revocation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'verity_django' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module), name)
