from __future__ import annotations

from django.conf import settings
from django.db import models

from verity_django.querysets import DirectiveManager
from verity_django.rules import RefreshCollection, RefreshItem


class Project(models.Model):
    name = models.CharField(max_length=200)
    # "+": the demo's models, installed beside these, own the user's reverse names.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")

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
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    tags = models.ManyToManyField(Tag, blank=True, related_name="todos")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DirectiveManager()

    class Meta:
        ordering = ["id"]
        directives = [
            RefreshItem("todo"),
            RefreshCollection("todos", on=["create", "delete"]),
            RefreshCollection("todos", params=["status"], mode="contains", on=["update"]),
            RefreshCollection("todos", params=["project"], mode="contains", on=["update"]),
            RefreshItem("project", id="project", collection="projects"),
        ]
        directive_audience = "owner"
        directive_relations = ["tags"]

    def __str__(self) -> str:
        return self.title
