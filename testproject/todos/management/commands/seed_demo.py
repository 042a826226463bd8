from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from testproject.todos.models import Project, Todo
from verity_django.batching import disabled

DEMO_USERS = {"alice": "alice-password", "bob": "bob-password"}


class Command(BaseCommand):
    help = "Create the demo users (alice, bob) and a few todos; safe to run again."

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        with disabled():
            users = {}
            for username, password in DEMO_USERS.items():
                user, created = User.objects.get_or_create(username=username)
                if created:
                    user.set_password(password)
                    user.save()
                users[username] = user
            if not Project.objects.exists():
                home = Project.objects.create(name="Home", owner=users["alice"])
                work = Project.objects.create(name="Work", owner=users["bob"])
                Todo.objects.create(title="Buy milk", project=home, owner=users["alice"])
                Todo.objects.create(
                    title="Water the plants", project=home, owner=users["alice"], status="done"
                )
                Todo.objects.create(title="Write the report", project=work, owner=users["bob"])
        self.stdout.write("Demo users: " + ", ".join(f"{u} / {p}" for u, p in DEMO_USERS.items()))
