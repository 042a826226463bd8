from __future__ import annotations

from typing import Any

from rest_framework import serializers

from testproject.todos.models import Project, Todo

LEVELS = ("simplified", "expanded")


class TodoSerializer(serializers.ModelSerializer[Todo]):
    class Meta:
        model = Todo
        fields = ["id", "title", "status", "description", "project", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


def todo_at_level(todo: Todo, level: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"id": todo.pk, "title": todo.title, "status": todo.status}
    if level in LEVELS:
        data["project"] = todo.project_id
    if level == "expanded":
        data["description"] = todo.description
        data["created_at"] = todo.created_at.isoformat()
        data["updated_at"] = todo.updated_at.isoformat()
    return data


class ProjectSerializer(serializers.ModelSerializer[Project]):
    class Meta:
        model = Project
        fields = ["id", "name", "owner"]
        read_only_fields = ["id", "owner"]
