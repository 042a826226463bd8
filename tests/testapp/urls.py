from django.urls import include, path
from rest_framework.routers import DefaultRouter

from tests.testapp import api
from verity_django.views import events

router = DefaultRouter()
router.register("todos", api.TodoViewSet, basename="todo")
router.register("projects", api.ProjectViewSet, basename="project")

urlpatterns = [
    path("api/auth/me/", api.me, name="me"),
    path("api/auth/logout/", api.logout_view, name="logout"),
    path("api/events", events, name="events"),
    path("api/events/", events),
    path("api/", include(router.urls)),
]
