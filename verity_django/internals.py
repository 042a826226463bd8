"""Django's private transaction state, and every use verity_django makes of it.

Batching needs two things Django's public ``on_commit`` cannot give: a
callback that no savepoint rollback discards (the flush of an implicit
per-transaction batch), kept *after* every other callback so that it runs
last; and knowing whether a change made inside a ``TestCase`` will ever
commit. Snapshots (``tracking``) need to know, when an instance is saved
again, whether its last save's savepoint rolled back: they register a
public ``on_commit`` marker per savepoint level and ask
:func:`still_registered` whether Django dropped it. These read attributes Django
does not document:

- ``BaseDatabaseWrapper.run_on_commit``: a list of
  ``(savepoint_ids: set[str], func, robust: bool)`` tuples; Django drops the
  entries tagged with a savepoint when that savepoint rolls back. It drops
  or runs entries only by replacing the list (savepoint rollback, rollback,
  commit, close), so while the list is the one an entry was appended to,
  the entry is still in it;
- ``BaseDatabaseWrapper.savepoint_ids``: the open savepoints, innermost last;
- ``BaseDatabaseWrapper.atomic_blocks``: the open ``Atomic`` blocks;
- ``Atomic._from_testcase``: set on the blocks ``TestCase`` opens itself.

Publishing once a response has been sent uses one more:

- ``HttpResponseBase._resource_closers``: callables that ``close()`` runs,
  before it sends ``request_finished``; every server calls ``close()`` once
  the body is written (Django's ``FileResponse`` uses the list the same way).

Checked against Django 5.2 (5.2.19, tested here) and 6.1.3 (read, not run:
Django 6 needs Python 3.12). :func:`verify` fails loudly if the shape
changes; ``tests/test_internals.py`` calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ENTRY_SIZE = 3
CHECKED_VERSIONS = "Django 5.2 and 6.1"


class UnsupportedDjango(RuntimeError):
    pass


def open_savepoints(connection: Any) -> list[str]:
    """A copy of the open savepoints' ids, for :func:`savepoints_are`."""
    return list(connection.savepoint_ids)


def savepoints_are(connection: Any, savepoints: list[str]) -> bool:
    """Whether ``savepoints`` (from :func:`open_savepoints`) are the open ones."""
    open_ids: list[str] = connection.savepoint_ids
    # A list compared with a list: no copy, on every save (bench W4).
    return open_ids == savepoints


def is_registered(connection: Any, func: Callable[[], Any]) -> bool:
    """Whether ``func`` still waits for the commit (a rollback drops it)."""
    return any(entry[1] is func for entry in connection.run_on_commit)


def still_registered(connection: Any, func: Callable[[], Any], seen_in: list[Any]) -> bool:
    """Whether ``func``, last seen in the list ``seen_in``, still waits for
    the commit; without a search while the list is the same one."""
    entries = connection.run_on_commit
    return entries is seen_in or any(entry[1] is func for entry in entries)


def commit_callbacks(connection: Any) -> list[Any]:
    """The list ``on_commit`` appends to now (see :func:`still_registered`)."""
    entries: list[Any] = connection.run_on_commit
    return entries


def register_unscoped(connection: Any, func: Callable[[], Any]) -> None:
    """Run ``func`` on commit whatever savepoints roll back before it."""
    connection.run_on_commit.append((set(), func, False))


def move_to_end(connection: Any, func: Callable[[], Any]) -> None:
    entries = connection.run_on_commit
    for index, entry in enumerate(entries):
        if entry[1] is func:
            if index != len(entries) - 1:
                entries.append(entries.pop(index))
            return


def on_response_close(response: Any, func: Callable[[], Any]) -> None:
    """Run ``func`` when the server closes ``response``, after sending it."""
    response._resource_closers.append(func)


def commit_is_ahead(connection: Any) -> bool:
    """Whether a commit is still to come for changes made now.

    A ``TestCase``'s own atomic blocks never commit, so inside a test a
    change counts as committed unless a block of the code under test can
    still roll it back on its own: blocks opened with ``savepoint=False``
    (model deletes, ``bulk_create``) commit or fail with their enclosing block.
    """
    if not connection.in_atomic_block:
        return False
    in_testcase = False
    # Loops, not any() over generators: this runs on every save (bench W4).
    for block in connection.atomic_blocks:
        if getattr(block, "_from_testcase", False):
            in_testcase = True
        elif block.savepoint:
            return True
    return not in_testcase


def verify(connection: Any) -> None:
    """Raise :class:`UnsupportedDjango` unless the private state looks as
    this module expects; call it inside an atomic block with one
    ``on_commit`` callback registered."""
    import django

    problems: list[str] = []
    for name in ("run_on_commit", "savepoint_ids", "atomic_blocks"):
        if not isinstance(getattr(connection, name, None), list):
            problems.append(f"connection.{name} is not a list")
    entries = getattr(connection, "run_on_commit", None) or []
    if not entries:
        problems.append("no on_commit entry was found in connection.run_on_commit")
    for entry in entries:
        if not (
            isinstance(entry, tuple)
            and len(entry) == _ENTRY_SIZE
            and isinstance(entry[0], set)
            and callable(entry[1])
            and isinstance(entry[2], bool)
        ):
            problems.append(
                f"a run_on_commit entry is {entry!r}, not (savepoint_ids, func, robust)"
            )
            break
    from django.http import HttpResponse

    if not isinstance(getattr(HttpResponse(), "_resource_closers", None), list):
        problems.append("HttpResponse._resource_closers is not a list")
    if problems:
        raise UnsupportedDjango(
            f"verity_django.internals was checked against {CHECKED_VERSIONS}; Django "
            f"{django.get_version()} differs: {'; '.join(problems)}. Batching would "
            "misplace directives: update verity_django/internals.py."
        )
