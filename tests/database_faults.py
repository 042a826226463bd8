"""Real database failures for tests, made by the database itself."""

from __future__ import annotations

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
