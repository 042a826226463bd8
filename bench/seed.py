"""Give alice at least ``--todos`` todos, without emitting anything.

python -m bench.seed --todos 10000     (bench settings, VERITY_SQLITE_PATH set)
"""

from __future__ import annotations

import argparse

import django


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--todos", type=int, required=True)
    args = parser.parse_args()
    django.setup()

    from django.contrib.auth import get_user_model

    from testproject.todos.models import Project, Todo
    from verity_django import disabled

    alice = get_user_model().objects.get(username="alice")
    project = Project.objects.filter(owner=alice).order_by("id").first()
    missing = args.todos - Todo.objects.filter(owner=alice).count()
    with disabled():
        Todo.objects.bulk_create(
            [
                Todo(
                    title=f"bench {i}",
                    owner=alice,
                    project=project,
                    status="active" if i % 2 else "done",
                )
                for i in range(max(missing, 0))
            ],
            batch_size=1000,
        )
    print(Todo.objects.filter(owner=alice).count())


if __name__ == "__main__":
    main()
