"""Stored envelopes in a database of their own (``VERITY_EVENTS_SQLITE_PATH``).

verity_django's database storage reads and writes django-eventstream's
tables through the router, like any model, so a project that keeps them off
its main database routes that app: the envelopes' writes then never contend
with the project's own for its database, and a storage that fails leaves
the project's writes alone.
"""

from __future__ import annotations

from typing import Any

EVENTS = "events"
_STORED = "django_eventstream"


class EventsRouter:
    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return EVENTS if model._meta.app_label == _STORED else None

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return EVENTS if model._meta.app_label == _STORED else None

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return (db == EVENTS) == (app_label == _STORED)
