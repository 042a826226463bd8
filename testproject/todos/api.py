from __future__ import annotations

from typing import Any

from django.contrib.auth import authenticate, login, logout
from django.db.models import QuerySet
from django.views.decorators.csrf import ensure_csrf_cookie
from rest_framework import serializers, status
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from testproject.todos.models import Project, Todo
from testproject.todos.serializers import TODO_LEVELS, ProjectSerializer, TodoSerializer
from verity_django.audiences import GLOBAL, user_audience

try:
    from drf_spectacular.utils import extend_schema
except ImportError:  # the demo runs without drf-spectacular too

    def extend_schema(**kwargs: Any) -> Any:
        return lambda view: view


from verity_django.contrib.rest_framework import VerityModelViewSet


class TodoViewSet(VerityModelViewSet):
    queryset = Todo.objects.all()
    serializer_class = TodoSerializer
    levels = TODO_LEVELS

    def get_queryset(self) -> QuerySet[Todo]:
        return Todo.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: TodoSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


class ProjectViewSet(VerityModelViewSet):
    serializer_class = ProjectSerializer
    queryset = Project.objects.all()

    def perform_create(self, serializer: ProjectSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


class MeSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    username = serializers.CharField()
    audiences = serializers.ListField(child=serializers.CharField())


class LoginSerializer(serializers.Serializer[Any]):
    username = serializers.CharField()
    password = serializers.CharField()


def _me(user: Any) -> dict[str, Any]:
    return {"id": user.pk, "username": user.username, "audiences": [user_audience(user), GLOBAL]}


@extend_schema(responses={200: MeSerializer})
@api_view(["GET"])
@permission_classes([AllowAny])
def me(request: Request) -> Response:
    if not request.user.is_authenticated:
        return Response({"detail": "Not logged in."}, status=status.HTTP_403_FORBIDDEN)
    return Response(_me(request.user))


me = ensure_csrf_cookie(me)


@extend_schema(request=LoginSerializer, responses={200: MeSerializer})
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


@extend_schema(request=None, responses={204: None})
@api_view(["POST"])
def logout_view(request: Request) -> Response:
    logout(request._request)
    return Response(status=status.HTTP_204_NO_CONTENT)
