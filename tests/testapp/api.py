"""Just enough REST API for the tests: todos, projects, a CSRF cookie and logout."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import logout
from django.db.models import QuerySet
from django.views.decorators.csrf import ensure_csrf_cookie
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from tests.testapp.models import Project, Todo


class TodoSerializer(serializers.ModelSerializer[Todo]):
    class Meta:
        model = Todo
        fields = ["id", "title", "status", "description", "project"]


class ProjectSerializer(serializers.ModelSerializer[Project]):
    class Meta:
        model = Project
        fields = ["id", "name", "owner"]
        read_only_fields = ["id", "owner"]


class TodoViewSet(viewsets.ModelViewSet[Todo]):
    serializer_class = TodoSerializer

    def get_queryset(self) -> QuerySet[Todo]:
        return Todo.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: TodoSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


class ProjectViewSet(viewsets.ModelViewSet[Project]):
    serializer_class = ProjectSerializer
    queryset = Project.objects.all()

    def perform_create(self, serializer: ProjectSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


@ensure_csrf_cookie
@api_view(["GET"])
def me(request: Request) -> Response:
    user: Any = request.user
    return Response({"id": user.pk, "username": user.username})


@api_view(["POST"])
def logout_view(request: Request) -> Response:
    logout(request._request)
    return Response(status=status.HTTP_204_NO_CONTENT)
