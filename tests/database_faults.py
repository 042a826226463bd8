"""Real database failures for tests, made by the database itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import connection


def refuse_deletes(table: str) -> None:
    """From now until the test's transaction ends, the database refuses every
    DELETE on ``table`` with an error (a trigger, on SQLite or PostgreSQL)."""
    statements = {
        "sqlite": [
            f"CREATE TRIGGER refuse_deletes BEFORE DELETE ON {table}"
            " BEGIN SELECT RAISE(ABORT, 'deletes refused'); END"
        ],
        "postgresql": [
            "CREATE FUNCTION refuse_deletes() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'deletes refused'; END $$",
            f"CREATE TRIGGER refuse_deletes BEFORE DELETE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION refuse_deletes()",
        ],
    }[connection.vendor]
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


@contextmanager
def held_elsewhere(statement: str, params: Sequence[Any] = ()) -> Iterator[None]:
    """PostgreSQL: another connection runs ``statement`` in a transaction and
    keeps the locks it took until the block ends."""
    import psycopg

    settings = connection.settings_dict
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with psycopg.connect(
            dbname=settings["NAME"],
            user=settings["USER"],
            host=settings["HOST"],
            port=settings["PORT"],
            password=settings["PASSWORD"] or None,
            connect_timeout=5,
        ) as other:
            other.execute(statement, params)
            locked.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        release.set()
        holder.join(10)
