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
def _no_retries_across_tests() -> Any:
    from verity_django import publishing

    yield
    publishing._retry.clear()


@pytest.fixture
def alice(db: Any) -> Any:
    return get_user_model().objects.create_user("alice", password="alice-password")


@pytest.fixture
def bob(db: Any) -> Any:
    return get_user_model().objects.create_user("bob", password="bob-password")


@pytest.fixture
def project(alice: Any) -> Project:
    return Project.objects.create(name="Home", owner=alice)


@pytest.fixture
def todo(alice: Any, project: Project) -> Todo:
    return Todo.objects.create(title="Buy milk", owner=alice, project=project)


@pytest.fixture
def api(alice: Any) -> APIClient:
    client = APIClient()
    client.force_login(alice)
    return client
