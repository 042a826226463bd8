"""Logging a failure that a loop retries until it works: one line when it
begins and one when it ends, however long it lasts.

The tailer, the revocation watcher and the Redis listener each retry at
their own pace while a database or Redis is down. Logged on every try, a
ten-minute outage buried the log under hundreds of identical lines (a
traceback each, for the tailer) and hid when it had begun and ended. Each
loop keeps one :class:`Outage` instead: its first failure is a warning, or
an error with the traceback when the exception is not one its I/O is known
to raise (that is a bug, not an outage); the tries after it are debug lines;
the first success says how many tries failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

Failures = tuple[type[BaseException], ...]

# What any I/O may raise, whatever the client library: a refused or reset
# connection, a timeout.
_ANY_IO: Failures = (OSError, TimeoutError)


def _none() -> Failures:
    return ()


class Outage:
    """The state of one retrying loop: how many tries failed since it last
    worked. Used by one task or thread only."""

    def __init__(
        self, logger: logging.Logger, what: str, expected: Callable[[], Failures] = _none
    ) -> None:
        self.logger = logger
        self.what = what
        # Asked at the first failure, not before: a storage's exceptions are
        # known only once its settings are.
        self.expected = expected
        self.failures = 0

    def failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures > 1:
            self.logger.debug("verity_django: %s failed again (%s)", self.what, exc)
        elif self._expected(exc):
            self.logger.warning(
                "verity_django: %s failed (%s); retrying until it works", self.what, exc
            )
        else:
            self.logger.error(
                "verity_django: %s failed; retrying until it works", self.what, exc_info=exc
            )

    def worked(self) -> None:
        if self.failures:
            self.logger.warning(
                "verity_django: %s works again, after %d failed %s",
                self.what,
                self.failures,
                "try" if self.failures == 1 else "tries",
            )
            self.failures = 0

    def _expected(self, exc: Exception) -> bool:
        try:
            known = self.expected()
        except Exception:  # what cannot even be configured: that is the failure logged
            return False
        return isinstance(exc, _ANY_IO + known)
