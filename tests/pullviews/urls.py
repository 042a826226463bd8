"""Views of every DRF style (and plain Django) for the pull-path tests."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from rest_framework import generics
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from tests.testapp.api import ProjectSerializer
from tests.testapp.models import Project
from tests.testapp.urls import urlpatterns as project_urls
from verity_django.contrib.rest_framework import DirectivesMixin


def _touch(request: Any) -> Project:
    return Project.objects.create(name="p", owner=request.user)


class ProjectCreate(generics.CreateAPIView[Project]):
    serializer_class = ProjectSerializer

    def perform_create(self, serializer: ProjectSerializer) -> None:  # type: ignore[override]
        serializer.save(owner=self.request.user)


class PlainAPIView(APIView):
    def post(self, request: Request) -> Response:
        _touch(request)
        return Response({"ok": True})


class ListBody(APIView):
    def post(self, request: Request) -> Response:
        _touch(request)
        return Response([1, 2])


class OptedIn(DirectivesMixin, APIView):
    def post(self, request: Request) -> Response:
        _touch(request)
        return Response({"ok": True})


@api_view(["POST"])
def function_view(request: Request) -> Response:
    _touch(request)
    return Response({"ok": True})


def plain_json(request: HttpRequest) -> JsonResponse:
    Project.objects.create(name="plain", owner=request.user)  # type: ignore[misc]
    return JsonResponse({"ok": True})


def plain_delete(request: HttpRequest) -> HttpResponse:
    Project.objects.filter(owner=request.user.pk).delete()
    return HttpResponse(status=204)


urlpatterns = [
    path("t/generic/", ProjectCreate.as_view()),
    path("t/apiview/", PlainAPIView.as_view()),
    path("t/list/", ListBody.as_view()),
    path("t/optin/", OptedIn.as_view()),
    path("t/function/", function_view),
    path("t/plain/", plain_json),
    path("t/plain-delete/", plain_delete),
    path("", include(project_urls)),
]
