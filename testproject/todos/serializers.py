from __future__ import annotations

from rest_framework import serializers

from testproject.todos.models import Project, Todo
from verity_django.contrib.rest_framework.levels import Levels


class TodoSerializer(serializers.ModelSerializer[Todo]):
    """What create and update take and answer."""

    class Meta:
        model = Todo
        fields = ["id", "title", "status", "description", "project", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


class TodoDefaultSerializer(serializers.ModelSerializer[Todo]):
    """The default level: what a list row shows."""

    class Meta:
        model = Todo
        fields = ["id", "title", "status"]
        read_only_fields = fields


class TodoSimplifiedSerializer(serializers.ModelSerializer[Todo]):
    class Meta:
        model = Todo
        fields = [*TodoDefaultSerializer.Meta.fields, "project"]
        read_only_fields = fields


class TodoExpandedSerializer(serializers.ModelSerializer[Todo]):
    """The maximal level: everything the detail pane shows."""

    class Meta:
        model = Todo
        fields = [
            *TodoSimplifiedSerializer.Meta.fields,
            "description",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


TODO_LEVELS = Levels(
    {
        None: TodoDefaultSerializer,
        "simplified": TodoSimplifiedSerializer,
        "expanded": TodoExpandedSerializer,
    },
    converts={"expanded": ["simplified"], "simplified": [None]},
)


class ProjectSerializer(serializers.ModelSerializer[Project]):
    class Meta:
        model = Project
        fields = ["id", "name", "owner"]
        read_only_fields = ["id", "owner"]
