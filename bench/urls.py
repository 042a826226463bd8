"""The demo project's URLs plus the endpoints only benchmarks use."""

from __future__ import annotations

from django.urls import path

from bench import views
from testproject.urls import urlpatterns as demo_urlpatterns

urlpatterns = [
    path("bench/save-many/", views.save_many),
    path(
        "bench/handwritten/todos/<int:pk>/",
        views.HandwrittenTodoViewSet.as_view({"patch": "partial_update"}),
    ),
    path("bench/publish/<str:mode>/", views.publish),
    path("bench/stats/", views.stats),
    path("bench/raw-events", views.raw_events),
    path("bench/idle-stream", views.idle_stream),
    *demo_urlpatterns,
]
