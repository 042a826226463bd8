from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate, login, logout
from django.db.models import QuerySet
from django.views.decorators.csrf import ensure_csrf_cookie
from rest_framework import status, viewsets
from rest_framework.decorators import api_view, permission_classes
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from testproject.todos.models import Project, Todo
from testproject.todos.serializers import (
    LEVELS,
    ProjectSerializer,
    TodoSerializer,
    todo_at_level,
)
from verity_django.audiences import GLOBAL, user_audience


def _level(request: Request) -> str | None:
    level = request.query_params.get("level") or None
    if level is not None and level not in LEVELS:
        raise ValidationError({"level": f"Use one of: {', '.join(LEVELS)}."})
    return level


def _collection(queryset: QuerySet[Any]) -> Response:
    ids = list(queryset.values_list("id", flat=True))
    return Response({"ids": ids, "count": len(ids)})


class TodoViewSet(viewsets.ModelViewSet[Todo]):
    serializer_class = TodoSerializer

    def get_queryset(self) -> QuerySet[Todo]:
        return Todo.objects.filter(owner=self.request.user)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        queryset = self.get_queryset()
        status_filter = request.query_params.get("status")
        if status_filter:
            if status_filter not in Todo.Status.values:
                raise ValidationError({"status": "Use active or done."})
            queryset = queryset.filter(status=status_filter)
        project = request.query_params.get("project")
        if project:
            if not project.isdigit():
                raise ValidationError({"project": "Use a project id."})
            queryset = queryset.filter(project_id=int(project))
        return _collection(queryset)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return Response(todo_at_level(self.get_object(), _level(request)))

    def perform_create(self, serializer: TodoSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


class ProjectViewSet(viewsets.ModelViewSet[Project]):
    serializer_class = ProjectSerializer
    queryset = Project.objects.all()

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return _collection(self.get_queryset())

    def perform_create(self, serializer: ProjectSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


def _me(user: Any) -> dict[str, Any]:
    return {"id": user.pk, "username": user.username, "audiences": [user_audience(user), GLOBAL]}


@api_view(["GET"])
@permission_classes([AllowAny])
def me(request: Request) -> Response:
    if not request.user.is_authenticated:
        return Response({"detail": "Not logged in."}, status=status.HTTP_403_FORBIDDEN)
    return Response(_me(request.user))


me = ensure_csrf_cookie(me)


@api_view(["POST"])
@permission_classes([AllowAny])
def login_view(request: Request) -> Response:
    username = request.data.get("username")
    password = request.data.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return Response({"detail": "username and password are required."}, status=400)
    user = authenticate(request._request, username=username, password=password)
    if user is None:
        return Response({"detail": "Wrong username or password."}, status=400)
    login(request._request, user)
    return Response(_me(user))


@api_view(["POST"])
def logout_view(request: Request) -> Response:
    logout(request._request)
    return Response(status=status.HTTP_204_NO_CONTENT)
