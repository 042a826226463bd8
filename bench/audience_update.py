"""What telling old and new audiences costs a 1,000-row ``update()``.

    .venv/bin/python -m bench.audience_update [--rows 1000] [--repetitions 7]

One process, one fresh SQLite file, the demo's ``Todo`` model. Each
repetition moves every row to another project (the foreign key that decides
the audience) with ``Todo.objects.update(project=...)``, three ways,
interleaved and in a rotating order:

- ``path``: ``directive_audience = "project__owner"`` (a related path);
- ``callable``: ``directive_audience = lambda todo: f"user-{todo.project.owner_id}"``;
- ``off``: the same ``update()`` inside ``verity_django.disabled()``.

It prints the query count of each (the same every repetition) and the median
time, as a ratio to ``off``. Publishing is off (``PUSH: False``) so that only
the rule work is measured.

Then the change further up the path: the project the rows are on changes
owner (``Project.objects.filter(pk=...).update(owner=...)`` and
``project.save()``), so every todo on it moves to another audience with none
of its own fields changing, with the ``path`` audience and with ``off``
(a callable cannot be told of it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any


def team_owner(todo: Any) -> str:
    return f"user-{todo.project.owner_id}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--repetitions", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VERITY_SQLITE_PATH"] = os.path.join(tmp, "bench.sqlite3")
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
        import django

        django.setup()
        run(args.rows, args.repetitions)


def run(rows: int, repetitions: int) -> None:
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    import verity_django
    from testproject.todos.models import Project, Todo
    from verity_django import registry
    from verity_django.testing import capture_directives

    settings.VERITY = {**getattr(settings, "VERITY", {}), "PUSH": False}
    call_command("migrate", verbosity=0, run_syncdb=True)
    User = get_user_model()
    alice = User.objects.create(username="alice")
    bob = User.objects.create(username="bob")
    here = Project.objects.create(name="here", owner=alice)
    there = Project.objects.create(name="there", owner=bob)
    Todo.objects.bulk_create(Todo(title=f"t{i}", owner=alice, project=here) for i in range(rows))
    declared = registry.declaration(Todo)
    assert declared is not None

    audiences: dict[str, Any] = {"path": "project__owner", "callable": team_owner, "off": None}
    times: dict[str, list[float]] = {name: [] for name in audiences}
    queries: dict[str, int] = {}
    names = list(audiences)
    target = there
    for repetition in range(repetitions):
        order = names[repetition % 3 :] + names[: repetition % 3]
        for name in order:
            audience = audiences[name]
            if audience is not None:
                verity_django.register(
                    Todo, directives=declared.directives, audience=audience, relations=["tags"]
                )
            scope = verity_django.disabled() if audience is None else capture_directives()
            with CaptureQueriesContext(connection) as captured, scope:
                start = time.perf_counter()
                Todo.objects.all().update(project=target)
                times[name].append(time.perf_counter() - start)
            queries[name] = len(captured)
            target = here if target is there else there
    title = f"{rows}-row update() moving every row to another owner's project, {repetitions} reps"
    report(title, names, times, queries)

    # The rows stay on ``here``; its owner changes.
    verity_django.register(
        Todo, directives=declared.directives, audience="project__owner", relations=["tags"]
    )
    Todo.objects.update(project=here)
    moves: dict[str, Callable[[Any], None]] = {
        "update": lambda owner: Project.objects.filter(pk=here.pk).update(owner=owner),
        "save": lambda owner: save_owner(here, owner),
    }
    for how, move in moves.items():
        times = {"path": [], "off": []}
        owner = bob
        for repetition in range(repetitions):
            for name in ("path", "off") if repetition % 2 else ("off", "path"):
                scope = verity_django.disabled() if name == "off" else capture_directives()
                with CaptureQueriesContext(connection) as captured, scope:
                    start = time.perf_counter()
                    move(owner)
                    times[name].append(time.perf_counter() - start)
                queries[name] = len(captured)
                owner = alice if owner is bob else bob
        title = f"the project of {rows} rows changes owner with {how}, {repetitions} reps"
        report(title, ["path", "off"], times, queries)


def save_owner(project: Any, owner: Any) -> None:
    project.owner = owner
    project.save()


def report(
    title: str, names: list[str], times: dict[str, list[float]], queries: dict[str, int]
) -> None:
    baseline = statistics.median(times["off"])
    print(title)
    print(f"{'audience':<10} {'queries':>8} {'median ms':>10} {'ratio to off':>13}")
    for name in names:
        median = statistics.median(times[name])
        print(f"{name:<10} {queries[name]:>8} {median * 1000:>10.1f} {median / baseline:>13.2f}")


if __name__ == "__main__":
    main()
