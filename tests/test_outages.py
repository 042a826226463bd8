"""A failure that a loop retries until it works is logged when it begins and
when it ends, not on every try.

The revocation watcher logged a warning on every failed read while a
database was down, and the tailer a traceback; the Redis listener does
the same against a real Redis in ``tests/live/test_subscriptions.py``, and
the tailer against a stopped PostgreSQL in
``tests/live/test_silent_database.py``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from unittest import mock

import pytest
from django.db import OperationalError
from django.test import override_settings

from verity_django import revocation, tailer
from verity_django.outages import Outage

FAILED_TRIES = 6


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[tuple[str, str]]:
    """(level, message) of every record of ``name`` at WARNING or above."""
    return [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == name and r.levelno >= logging.WARNING
    ]


def failing(times: int, exc: Exception, then: Any) -> Any:
    calls = {"n": 0}

    def call(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc
        return then

    call.calls = calls  # type: ignore[attr-defined]
    return call


async def until(condition: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


@override_settings(VERITY={"POLL_INTERVAL": 0.01})
def test_an_outage_of_revocation_reads_is_logged_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read = failing(FAILED_TRIES, OperationalError("database is down"), ([], None))

    async def play() -> None:
        loop = asyncio.get_running_loop()
        watcher = revocation.Watcher(loop)
        stream = revocation.Stream("1", None, frozenset({"global"}), 3)
        stream.loop = loop
        watcher.register(stream)
        await until(lambda: read.calls["n"] > FAILED_TRIES + 2)
        watcher.unregister(stream)
        assert watcher.task is not None
        async with asyncio.timeout(10):
            await watcher.task
        assert stream.reason == ""

    with (
        mock.patch.object(revocation, "_revocations_after", read),
        mock.patch.object(revocation, "_SAFETY_INTERVAL", 0.02),
        caplog.at_level(logging.DEBUG, "verity_django"),
    ):
        asyncio.run(play())
    assert lines(caplog, "verity_django.revocation") == [
        (
            "WARNING",
            "verity_django: reading revocations failed (database is down); retrying until it works",
        ),
        (
            "WARNING",
            f"verity_django: reading revocations works again, after {FAILED_TRIES} failed tries",
        ),
    ]
    # The tries in between are there for whoever asks for them.
    assert sum("reading revocations failed again" in r.getMessage() for r in caplog.records) == (
        FAILED_TRIES - 1
    )


@override_settings(VERITY={"POLL_INTERVAL": 0.01})
def test_an_outage_of_delivery_from_storage_is_logged_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = failing(FAILED_TRIES, OperationalError("database is down"), None)

    async def failing_step(self: Any) -> None:
        step()

    async def play() -> None:
        follower = tailer.Tailer(asyncio.get_running_loop())
        follower.start()
        await until(lambda: step.calls["n"] > FAILED_TRIES + 2)
        assert follower._task is not None
        follower._task.cancel()

    with (
        mock.patch.object(tailer.Tailer, "_step", failing_step),
        caplog.at_level(logging.DEBUG, "verity_django"),
    ):
        asyncio.run(play())
    assert lines(caplog, "verity_django.tailer") == [
        (
            "WARNING",
            "verity_django: delivery from storage failed (database is down); "
            "retrying until it works",
        ),
        (
            "WARNING",
            f"verity_django: delivery from storage works again, after {FAILED_TRIES} failed tries",
        ),
    ]


def test_a_failure_that_is_not_an_outage_is_an_error_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage(logging.getLogger("verity_django.x"), "reading x", lambda: (OperationalError,))
    with caplog.at_level(logging.DEBUG, "verity_django"):
        try:
            {}["key"]
        except KeyError as exc:
            outage.failed(exc)
        outage.failed(OperationalError("down"))
        outage.worked()
        outage.worked()
        outage.failed(ConnectionRefusedError("refused"))
    assert [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records] == [
        ("ERROR", "verity_django: reading x failed; retrying until it works", True),
        ("DEBUG", "verity_django: reading x failed again (down)", False),
        ("WARNING", "verity_django: reading x works again, after 2 failed tries", False),
        # Any I/O failure is an outage, whatever the loop expects of its storage.
        ("WARNING", "verity_django: reading x failed (refused); retrying until it works", False),
    ]


def test_a_storage_that_cannot_even_say_what_it_raises_gets_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> tuple[type[BaseException], ...]:
        raise ValueError("EVENTSTREAM_STORAGE_CLASS is wrong")

    outage = Outage(logging.getLogger("verity_django.x"), "reading x", broken)
    with caplog.at_level(logging.DEBUG, "verity_django"):
        outage.failed(OperationalError("down"))
    assert [(r.levelname, bool(r.exc_info)) for r in caplog.records] == [("ERROR", True)]
