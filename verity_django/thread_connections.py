"""The database connections of verity_django's own long-lived threads (the
storage readers, the publisher thread, the positions writer).

Django's connections are per thread, so only the thread that holds one can
close it: these threads close theirs when asked (a test database cannot be
dropped while they stay open) and after a failure that may have broken them.
"""

from __future__ import annotations

import logging
import threading

from django.db import connections

logger = logging.getLogger(__name__)


def in_open_transaction() -> bool:
    """Whether this thread has a transaction open on any database."""
    return any(c.in_atomic_block for c in connections.all(initialized_only=True))


def close_connections() -> None:
    """Close this thread's connections; it reopens them as it needs them."""
    try:
        connections.close_all()
    except Exception:
        # A connection already broken may fail to close; it is dropped anyway.
        logger.warning("verity_django: a thread could not close a connection", exc_info=True)


class ConnectionRelease:
    """Asks a long-lived thread to close its database connections, which
    only that thread can do, and lets the thread answer when it next wakes.
    ``wake`` is the condition the thread waits on."""

    def __init__(self, wake: threading.Condition) -> None:
        self.wake = wake
        self.asked: list[threading.Event] = []

    def ask(self, thread: threading.Thread | None, timeout: float) -> bool:
        """True once ``thread`` has closed its connections (or is not running)."""
        released = threading.Event()
        with self.wake:
            if thread is None or not thread.is_alive():
                return True
            self.asked.append(released)
            self.wake.notify_all()
        return released.wait(timeout)

    def take(self) -> list[threading.Event]:
        """In the thread, holding ``wake``: what was asked since last time."""
        taken, self.asked = self.asked, []
        return taken

    @staticmethod
    def answer(taken: list[threading.Event]) -> None:
        """In the thread, without ``wake`` held (closing is I/O)."""
        if not taken:
            return
        close_connections()
        for released in taken:
            released.set()
