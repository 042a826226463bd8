from __future__ import annotations

import os
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.test import APIClient

from tests.testapp.models import Project, Todo

DIRECTIVE_HEADERS = {
    "HTTP_X_VERITY_DIRECTIVE_REQUEST": "send me directives",
    "HTTP_X_CLIENT_ID": "client-a",
}


@pytest.fixture(autouse=True, scope="session")
def _database_vendor_as_asked() -> None:
    # A run meant for PostgreSQL must not pass quietly on SQLite.
    expected = os.environ.get("VERITY_TEST_EXPECT_VENDOR")
    assert expected in (None, connection.vendor), (expected, connection.vendor)


@pytest.fixture(autouse=True)
def _background_work_stays_in_its_test() -> Any:
    # Collected responses' batches, publisher runs and position saves land
    # before the next test's database exists; a retry is never carried into
    # it. Storage reads a closed loop left running in the reader threads
    # finish first too: on the shared-cache test database one still reading
    # made the flush of a transactional test fail ("database table is locked").
    from verity_django import batching, positions, publishing
    from verity_django.readers import release_reader_connections

    yield
    batching.deliver_collected(timeout=5)
    positions.writer.flush(timeout=5)
    publishing.reset()
    release_reader_connections(timeout=5)


@pytest.fixture
def alice(db: Any) -> Any:
    return get_user_model().objects.create_user("alice", password="alice-password")


@pytest.fixture
def bob(db: Any) -> Any:
    return get_user_model().objects.create_user("bob", password="bob-password")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests of the demo's own API ask for it with the "demo" mark.
    for item in items:
        if item.get_closest_marker("demo") and not item.get_closest_marker("urls"):
            item.add_marker(pytest.mark.urls("testproject.urls"))
    # A session on PostgreSQL (scripts/test's second pass) runs only the tests
    # marked for it: the rest are about code that does not touch the database
    # vendor, or read SQLite files, and have run in the first pass already.
    # Deselecting here, not with -m, leaves -m to whoever runs the suite.
    if connection.vendor == "postgresql":
        kept = [item for item in items if item.get_closest_marker("postgresql")]
    else:
        kept = [item for item in items if not item.get_closest_marker("postgresql_only")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept


def _models(request: pytest.FixtureRequest) -> Any:
    if request.node.get_closest_marker("demo"):
        from testproject.todos import models

        return models
    from tests.testapp import models as testapp_models

    return testapp_models


@pytest.fixture
def project(request: pytest.FixtureRequest, alice: Any) -> Project:
    return _models(request).Project.objects.create(name="Home", owner=alice)  # type: ignore[no-any-return]


@pytest.fixture
def todo(request: pytest.FixtureRequest, alice: Any, project: Project) -> Todo:
    return _models(request).Todo.objects.create(  # type: ignore[no-any-return]
        title="Buy milk", owner=alice, project=project
    )


@pytest.fixture
def api(alice: Any) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client
