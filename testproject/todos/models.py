from __future__ import annotations

from django.conf import settings
from django.db import models

from verity_django.contrib.rest_framework.levels import level_result
from verity_django.querysets import DirectiveManager
from verity_django.rules import RefreshCollection, RefreshItem

# The serializers import these models, so the levels are named by path.
TODO_RESULT = level_result("testproject.todos.serializers.TODO_LEVELS")


class Project(models.Model):
    name = models.CharField(max_length=200)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="projects"
    )

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [
            RefreshItem("project"),
            RefreshCollection("projects"),
        ]
        directive_audience = "global"

    def __str__(self) -> str:
        return self.name


class Tag(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Todo(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        DONE = "done"

    title = models.CharField(max_length=200)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    description = models.TextField(blank=True, default="")
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.SET_NULL, related_name="todos"
    )
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="todos"
    )
    tags = models.ManyToManyField(Tag, blank=True, related_name="todos")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [
            # The maximal level, so that a window holding the todo at any
            # level refetches nothing after another window edits it.
            RefreshItem("todo", result=TODO_RESULT if settings.DEMO_TODO_RESULT else None),
            # A new or deleted todo changes every list; an edit changes the
            # lists filtered by the status or project it had and has.
            RefreshCollection("todos", on=["create", "delete"]),
            RefreshCollection("todos", params=["status"], mode="contains", on=["update"]),
            RefreshCollection("todos", params=["project"], mode="contains", on=["update"]),
            RefreshItem("project", id="project", collection="projects"),
        ]
        directive_audience = "owner"
        directive_relations = ["tags"]

    def __str__(self) -> str:
        return self.title
