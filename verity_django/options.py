"""Teach ``class Meta`` the ``directives`` and ``directive_audience`` options.

This runs when the package is imported, which Django does for every installed
app before it imports any models module.
"""

from __future__ import annotations

from django.db.models import options

META_OPTIONS = ("directives", "directive_audience", "directive_relations")

if not set(META_OPTIONS) <= set(options.DEFAULT_NAMES):
    options.DEFAULT_NAMES = (*options.DEFAULT_NAMES, *META_OPTIONS)
