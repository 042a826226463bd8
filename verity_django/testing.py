"""Helpers for testing code that produces directives.

    from verity_django.testing import capture_directives

    def test_update_todo(client, todo):
        with capture_directives() as captured:
            client.patch(f"/api/todos/{todo.pk}/", {"title": "New"})
        assert captured == [
            {"op": "refresh_item", "name": "todo", "id": todo.pk},
            {"op": "refresh_collection", "name": "todos"},
        ]

Comparisons ignore the metadata every directive carries (idempotency key,
timestamp, source, seq); ``captured.directives`` keeps it. This module is
also a pytest plugin that provides the ``verity_directives`` fixture, and
that calls :func:`release_database_connections` before pytest-django drops
the test databases.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

METADATA = ("idempotency_key", "timestamp", "source", "seq", "audience")

if TYPE_CHECKING:
    from verity_django.batching import Batch

_ids = itertools.count()


def strip_metadata(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Directive dicts without metadata, e.g. from ``response.json()["directives"]``."""
    out = []
    for item in items:
        bare = {k: v for k, v in item.items() if k not in METADATA}
        if "targets" in bare:
            bare["targets"] = strip_metadata(bare["targets"])
        out.append(bare)
    return out


class CapturedDirectives:
    """Directives committed while capturing, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    @property
    def directives(self) -> list[dict[str, Any]]:
        return [x.to_dict() for b in self.batches for x in b.directives()]

    @property
    def bare(self) -> list[dict[str, Any]]:
        return strip_metadata(self.directives)

    def for_audience(self, audience: str) -> list[dict[str, Any]]:
        items = [x.to_dict() for b in self.batches for x in b.by_audience().get(audience, [])]
        return strip_metadata(items)

    @property
    def audiences(self) -> set[str]:
        return {a for b in self.batches for a in b.by_audience()}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CapturedDirectives):
            return self.bare == other.bare
        if isinstance(other, list):
            return self.bare == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.directives)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.bare)

    def __repr__(self) -> str:
        return f"<CapturedDirectives {self.bare!r}>"


@contextmanager
def capture_directives(*, using: str = "default") -> Iterator[CapturedDirectives]:
    """Record every batch delivered inside the block.

    Inside a test transaction (``TestCase``, ``pytest.mark.django_db``), the
    ``on_commit`` callbacks of atomic blocks in the code under test run when
    the block exits, as they would on a real commit.
    """
    from django.db import connections
    from django.test import TestCase

    from verity_django.signals import directives_committed

    captured = CapturedDirectives()

    def record(sender: Any, batch: Batch, **kwargs: Any) -> None:
        captured.batches.append(batch)

    uid = f"verity_django.testing.capture.{next(_ids)}"
    # A closure has no other reference, so the signal must hold it strongly.
    directives_committed.connect(record, weak=False, dispatch_uid=uid)
    try:
        with ExitStack() as stack:
            if connections[using].in_atomic_block:
                stack.enter_context(TestCase.captureOnCommitCallbacks(using=using, execute=True))
            yield captured
    finally:
        directives_committed.disconnect(dispatch_uid=uid)


def release_database_connections(timeout: float = 5.0) -> bool:
    """Have verity_django's background threads close their database
    connections; True once all have, within ``timeout`` seconds each.

    Each thread keeps its own connection between uses (Django's connections
    are per thread), so with publishing, streams or replay positions running
    outside a test transaction PostgreSQL refuses to drop the test database
    ("being accessed by other users"). The pytest plugin calls this before
    the databases are dropped; with Django's test runner, call it at the
    start of your runner's ``teardown_databases``. A thread reopens its
    connection when it next needs one.
    """
    released = True
    # A module never imported has started no thread: nothing to import here.
    readers = sys.modules.get("verity_django.readers")
    if readers is not None:
        released = readers.release_reader_connections(timeout) and released
    publishing = sys.modules.get("verity_django.publishing")
    if publishing is not None:
        released = publishing.release_connections(timeout) and released
    positions = sys.modules.get("verity_django.positions")
    if positions is not None:
        released = positions.writer.release_connections(timeout) and released
    return released


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed to use the fixture
    pass
else:

    @pytest.fixture
    def verity_directives() -> Iterator[CapturedDirectives]:
        """The directives delivered during the test."""
        with capture_directives() as captured:
            yield captured

    _LAST_TEST = pytest.StashKey[bool]()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
        item.stash[_LAST_TEST] = nextitem is None

    @pytest.fixture(autouse=True)
    def _verity_releases_connections_after_the_last_test(
        request: pytest.FixtureRequest,
    ) -> Iterator[None]:
        # A plugin's autouse fixture is torn down after the test's other
        # function fixtures and before the session's (pytest-django drops
        # the databases there): the last moment nothing reconnects.
        yield
        if request.node.stash.get(_LAST_TEST, False):
            release_database_connections()

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(session: pytest.Session) -> None:
        # A session stopped early (-x, a keyboard interrupt) drops the
        # databases here instead, after no last test.
        release_database_connections()
