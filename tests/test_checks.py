from __future__ import annotations

from typing import Any

import pytest
from django.core import checks
from django.test import override_settings

from verity_django.checks import check_settings


def ids(**settings: Any) -> list[str]:
    with override_settings(**settings):
        return [e.id for e in check_settings()]


def test_checks_are_registered_in_ready() -> None:
    registered = checks.registry.registry.get_checks()
    names = {f.__module__ + "." + f.__name__ for f in registered}
    assert "verity_django.checks.check_settings" in names
    assert "verity_django.registry.check_rules" in names


def test_project_settings_pass() -> None:
    assert check_settings() == []


@pytest.mark.parametrize(
    ("verity", "error_id"),
    [
        ("yes", "verity_django.E001"),
        ({"COLAPSE_THRESHOLD": 3}, "verity_django.E002"),
        ({"COLLAPSE_THRESHOLD": "3"}, "verity_django.E003"),
        ({"ENABLED": 1}, "verity_django.E003"),
        ({"MAX_AUDIENCES_PER_CONNECTION": True}, "verity_django.E003"),
        ({"AUTHORIZE": "nowhere.module.func"}, "verity_django.E004"),
        ({"COLLAPSE_THRESHOLD": 0}, "verity_django.E005"),
        ({"POLL_INTERVAL": 30}, "verity_django.E006"),
        ({"POLL_INTERVAL": True}, "verity_django.E003"),
        ({"REPLAY_RETENTION": -1}, "verity_django.E008"),
        ({"REPLAY_MARGIN": 0}, "verity_django.E009"),
        ({"AUTHORIZE": 3}, "verity_django.E003"),
    ],
)
def test_bad_settings(verity: Any, error_id: str) -> None:
    assert error_id in ids(VERITY=verity)


def test_callable_hooks_are_accepted() -> None:
    assert ids(VERITY={"AUTHORIZE": lambda user, audience: True}) == []


def test_storage_must_be_sequenced() -> None:
    found = ids(EVENTSTREAM_STORAGE_CLASS="django_eventstream.storage.DjangoModelStorage")
    assert found == ["verity_django.E020"]


def test_channel_manager_must_authorize_audiences() -> None:
    found = ids(
        EVENTSTREAM_CHANNELMANAGER_CLASS="django_eventstream.channelmanager.DefaultChannelManager"
    )
    assert found == ["verity_django.E021"]


def test_redis_pubsub_needs_the_same_redis_storage() -> None:
    found = ids(EVENTSTREAM_REDIS={"host": "127.0.0.1", "port": 1})
    assert found == ["verity_django.E022"]


def test_middleware_is_required(settings: Any) -> None:
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "verity" not in m]
    assert [e.id for e in check_settings()] == ["verity_django.E010"]


@pytest.fixture
def storage_on_postgresql(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The storage's connection, seen by the check as PostgreSQL; its OPTIONS to edit."""
    from django.db import connections

    connection = connections["default"]
    monkeypatch.setattr(connection, "vendor", "postgresql")
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    options: dict[str, Any] = {}
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    return options


@pytest.mark.parametrize(
    ("options", "environment", "warned"),
    [
        ({}, None, True),
        ({"connect_timeout": 0}, None, True),
        ({"connect_timeout": "soon"}, None, True),
        ({"connect_timeout": 5}, None, False),
        ({"connect_timeout": "5"}, None, False),
        ({"connect_timeout": "2.5"}, None, False),
        ({"connect_timeout": "0.5"}, None, True),
        ({}, "5", False),
        ({}, "0", True),
    ],
)
def test_a_postgresql_storage_without_a_connect_timeout_is_warned_about(
    storage_on_postgresql: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    environment: str | None,
    warned: bool,
) -> None:
    storage_on_postgresql.update(options)
    if environment is not None:
        monkeypatch.setenv("PGCONNECT_TIMEOUT", environment)
    found = [m for m in check_settings() if m.id == "verity_django.W024"]
    assert bool(found) is warned
    if found:
        assert found[0].level == checks.WARNING
        assert "DATABASES['default']" in found[0].msg
        assert "'connect_timeout'" in (found[0].hint or "")


def test_the_connect_timeout_check_looks_only_at_a_postgresql_database_storage(
    storage_on_postgresql: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "verity_django.W024" in ids()
    assert "verity_django.W024" not in ids(
        EVENTSTREAM_STORAGE_CLASS="verity_django.storage.RedisStorage"
    )
    from django.db import connections

    monkeypatch.setattr(connections["default"], "vendor", "sqlite")
    assert "verity_django.W024" not in ids()


class _ElsewhereForReads:
    """A router sending storage reads to an alias the project lacks."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return "replica" if model._meta.app_label == "django_eventstream" else None


def test_the_connect_timeout_check_skips_a_routed_alias_the_project_lacks(
    storage_on_postgresql: dict[str, Any],
) -> None:
    """Reads routed elsewhere are checked too, but an alias missing from
    DATABASES is another check's business: this one must not raise."""
    router = f"{__name__}._ElsewhereForReads"
    found = [m for m in _with(DATABASE_ROUTERS=[router]) if m.id == "verity_django.W024"]
    assert [m.msg.split(",")[0] for m in found] == ["DATABASES['default']"]


def _with(**settings: Any) -> list[checks.CheckMessage]:
    from django.db import router

    with override_settings(**settings):
        # Django's router reads DATABASE_ROUTERS once and caches the routers.
        router.__dict__.pop("routers", None)
        try:
            return check_settings()
        finally:
            router.__dict__.pop("routers", None)
