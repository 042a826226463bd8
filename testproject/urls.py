from django.apps import apps
from django.urls import include, path
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.generic import TemplateView
from rest_framework.routers import DefaultRouter

from testproject.todos import api
from verity_django.views import events

router = DefaultRouter()
router.register("todos", api.TodoViewSet, basename="todo")
router.register("projects", api.ProjectViewSet, basename="project")

urlpatterns = [
    path("", ensure_csrf_cookie(TemplateView.as_view(template_name="index.html")), name="index"),
    path("api/auth/me/", api.me, name="me"),
    path("api/auth/login/", api.login_view, name="login"),
    path("api/auth/logout/", api.logout_view, name="logout"),
    path("api/events", events, name="events"),
    path("api/events/", events),
    path("api/", include(router.urls)),
]

if apps.is_installed("drf_spectacular"):
    from drf_spectacular.views import SpectacularAPIView

    urlpatterns.append(path("api/schema/", SpectacularAPIView.as_view(), name="schema"))
