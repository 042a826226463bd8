"""Gather directives per transaction and per request, deduplicate them, and
hand each finished batch on once its changes are committed.

A change registers its directives with ``transaction.on_commit``, so Django
itself drops what a rolled-back transaction or savepoint added. Committed
directives land in the *current batch*: the request's (opened by the
middleware), an explicit ``with batch():``, or, outside both, one implicit
batch per outermost transaction. A batch publishes when it closes.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections

from verity_django import directives as d
from verity_django import internals
from verity_django.audiences import GLOBAL, validate_audience
from verity_django.conf import conf
from verity_django.rules import PlainChange, Routed

if TYPE_CHECKING:
    from verity_django.registry import ModelRules

logger = logging.getLogger(__name__)

_current: ContextVar[Batch | None] = ContextVar("verity_batch", default=None)
_disabled: ContextVar[bool] = ContextVar("verity_disabled", default=False)


@dataclass
class _Entry:
    directive: d.Directive
    audiences: set[str]
    collapse_to: tuple[str, ...]
    result_audiences: frozenset[str] | None = None

    def for_audience(self, audience: str) -> d.Directive:
        if self.directive.result is None or self.result_audiences is None:
            return self.directive
        if audience in self.result_audiences:
            return self.directive
        return self.directive.with_metadata(result=None)


@dataclass
class Batch:
    """Deduplicated directives waiting to be delivered together."""

    source: str | None = None
    closed: bool = False
    # Who caused the batch: clients.tag_for(request, source), asked for only
    # when there is something to publish.
    origin_of: Callable[[], str | None] | None = None
    _entries: dict[tuple[Any, ...], _Entry] = field(default_factory=dict)
    # What crowded items collapsed into, kept so that every reading of the
    # batch (pull, then push) shows the same idempotency keys.
    _collapsed: dict[str, _Entry] = field(default_factory=dict)
    # Item names already known to be crowded (``Routed.crowds``).
    _crowded: set[str] = field(default_factory=set)
    # _final_entries() until the next add(): the pull and the push copy read
    # the same batch one after the other.
    _final: list[_Entry] | None = None
    # Set by close_after(): closes the batch if its response is collected unclosed.
    _finalizer: weakref.finalize[Any, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Checked once here, so that stamping it on every directive need not.
        if self.source is not None:
            d.validate_source(self.source)

    def add(self, routed: Iterable[Routed]) -> None:
        self._final = None
        for item in routed:
            if item.crowds is not None:
                self._crowded.add(item.crowds)
            key = item.directive.identity
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(
                    item.directive,
                    set(item.audiences),
                    item.collapse_to,
                    item.result_audiences,
                )
                continue
            entry.audiences |= item.audiences
            if item.directive.result is not None:
                entry.result_audiences = item.result_audiences
                # The newest state wins, under the key clients may already know.
                if entry.directive.idempotency_key is not None:
                    entry.directive = item.directive.with_metadata(
                        idempotency_key=entry.directive.idempotency_key
                    )
                else:
                    entry.directive = item.directive

    @classmethod
    def for_request(cls, request: Any) -> Batch:
        from verity_django import clients

        source = clients.from_headers(request)
        return cls(source=source, origin_of=lambda: clients.tag_for(request, source))

    @property
    def origin(self) -> str | None:
        return None if self.origin_of is None else self.origin_of()

    def __bool__(self) -> bool:
        return bool(self._entries)

    def _final_entries(self) -> list[_Entry]:
        if self._final is not None:
            return self._final
        entries = list(self._entries.values())
        threshold = conf.COLLAPSE_THRESHOLD
        items: dict[str, int] = {}
        variants: dict[str, int] = {}
        for e in entries:
            name = e.directive.name or ""
            if e.directive.op == "refresh_item" and e.collapse_to:
                items[name] = items.get(name, 0) + 1
            elif _is_params_variant(e.directive):
                variants[name] = variants.get(name, 0) + 1
        crowded = {name for name, n in items.items() if n > threshold} | self._crowded
        crowded_params = {name for name, n in variants.items() if n > threshold}
        if crowded or crowded_params:
            entries = self._collapse(entries, crowded, crowded_params)
        # Metadata is stamped only on what survives collapsing, once per
        # distinct directive: stamping fills only what is missing, so every
        # later reading of the batch keeps the same keys.
        now = d.now_ms()
        for e in entries:
            e.directive = _stamp(e.directive, self.source, now)
        self._final = entries
        return entries

    def _collapse(
        self, entries: list[_Entry], crowded: set[str], crowded_params: set[str]
    ) -> list[_Entry]:
        """Many items of one name become their collections, and many params
        variants of one collection become the whole collection, told to
        every audience the collapsed ones had."""
        kept: list[_Entry] = []
        replacements: dict[str, _Entry] = {}

        def replace(target: str, audiences: set[str]) -> None:
            repl = replacements.get(target)
            if repl is None:
                repl = self._collapsed.get(target)
                if repl is None:
                    repl = _Entry(d.refresh_collection(target), set(), ())
                    self._collapsed[target] = repl
                repl.audiences = set()
                replacements[target] = repl
            repl.audiences |= audiences

        for e in entries:
            x = e.directive
            if x.op == "refresh_item" and x.name in crowded and e.collapse_to:
                for target in e.collapse_to:
                    replace(target, e.audiences)
            elif x.name in crowded_params and _is_params_variant(x):
                replace(x.name or "", e.audiences)
            else:
                kept.append(e)
        merged = {e.directive.identity: e for e in kept}
        for repl in replacements.values():
            existing = merged.get(repl.directive.identity)
            if existing is not None:
                existing.audiences |= repl.audiences
            else:
                merged[repl.directive.identity] = repl
        return list(merged.values())

    def directives(self, readable: Callable[[str], bool] | None = None) -> list[d.Directive]:
        """Every directive of the batch once, as the pull path returns them.

        With ``readable`` (may the requester read this audience?), only the
        directives of an audience the requester may read, each with its
        ``result`` only when the requester may read one of the object's
        current audiences. Without it, all of them (``capture_directives``).
        """
        answers: dict[str, bool] = {}
        seen = [_readable_copy(e, readable, answers) for e in self._final_entries()]
        shown = [x for x in seen if x is not None]
        # Only what the requester sees may subsume: a whole collection of
        # someone else's must not hide the params version of their own.
        return _without_subsumed(shown)

    def by_audience(self) -> dict[str, list[d.Directive]]:
        """The directives of each audience, as the push path publishes them."""
        out: dict[str, list[d.Directive]] = {}
        for e in self._final_entries():
            for audience in sorted(e.audiences):
                out.setdefault(audience, []).append(e.for_audience(audience))
        for audience, items in out.items():
            out[audience] = _without_subsumed(items)
        return out

    def close(self) -> None:
        """Deliver the batch (once)."""
        if self.closed:
            return
        self.closed = True
        if self._finalizer is not None:
            _collected.forget(self._finalizer)
            self._finalizer = None
        if self._entries:
            from verity_django.publishing import deliver

            deliver(self)

    def close_after(self, response: Any) -> bool:
        """Close once the server has sent ``response``; False if it must be
        closed now (nothing to wait for, or a response that streams).

        The requester gets its response, pull copy included, without waiting
        for the push copy's storage and transports (bench W1). Should the
        response never be closed (an ASGI client that left before it was
        sent), the batch is closed in the background when the response is
        collected, or at exit.
        """
        if self.closed or not self._entries or getattr(response, "streaming", True):
            return False
        internals.on_response_close(response, self.close)
        _collected.start()
        self._finalizer = weakref.finalize(response, _put_collected, self, os.getpid())
        _collected.watch(self._finalizer)
        return True


class _CollectedBatches:
    """Delivers the batches of responses collected without being closed.

    The garbage collector runs finalizers in whichever thread allocates, at
    any point, possibly while that thread holds a lock that delivering takes
    (the publisher's backlog lock is not reentrant): delivering there could
    deadlock the thread, and would run ``directives_committed`` receivers
    at a random point. So the finalizer only puts the batch on a queue
    (``SimpleQueue.put`` is safe there) and this thread delivers it.

    A response still alive at exit would be finalized by ``weakref``'s own
    exit hook, which may run after this one has delivered what was queued
    (hooks run in the reverse order of their registration, and any library
    may have registered weakref's first). So these finalizers are taken off
    weakref's exit list, kept in ``watched`` until their batch closes, and
    run by :meth:`_at_exit` before it delivers.
    """

    def __init__(self) -> None:
        # Batches, and events a waiter puts behind them (see deliver_all).
        self.queue: queue.SimpleQueue[Batch | threading.Event] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()
        self.watched: set[weakref.finalize[Any, Any]] = set()

    def start(self) -> None:
        # Started by the request, never by the finalizer: starting a thread
        # takes locks too.
        if self.thread is not None:
            return
        with self.lock:
            if self.thread is None:
                thread = threading.Thread(
                    target=self._run, name="verity-collected-batches", daemon=True
                )
                thread.start()
                self.thread = thread
                atexit.register(self._at_exit)

    def watch(self, finalizer: weakref.finalize[Any, Any]) -> None:
        finalizer.atexit = False
        with self.lock:
            self.watched.add(finalizer)

    def forget(self, finalizer: weakref.finalize[Any, Any]) -> None:
        finalizer.detach()
        with self.lock:
            self.watched.discard(finalizer)

    def put(self, batch: Batch) -> None:
        if not batch.closed:
            self.queue.put(batch)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._close(item)
            try:
                # Rarely needed, so the thread keeps no connection between
                # batches (a test database could not be dropped while it did).
                connections.close_all()
            except Exception:
                logger.exception("verity_django: closing a database connection failed")

    def deliver_all(self, timeout: float) -> bool:
        """Deliver what is queued now; True once it is, within ``timeout``."""
        thread = self.thread
        if thread is not None and thread.is_alive():
            # In order: once the thread reaches this, it has delivered what
            # was queued before, the batch it was delivering included.
            reached = threading.Event()
            self.queue.put(reached)
            return reached.wait(timeout)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return True
            if not isinstance(item, threading.Event):
                self._close(item)

    def _at_exit(self) -> None:
        from verity_django import publishing

        if os.getpid() != self.pid:
            return  # a forked child's copy of the parent's queue: the parent delivers it
        with self.lock:
            alive, self.watched = self.watched, set()
        for finalizer in alive:
            finalizer()  # queues the batch of a response nobody closed
        if not self.deliver_all(conf.FLUSH_TIMEOUT):
            logger.error("verity_django: exiting with collected responses' batches not delivered")
        # publishing's own exit flush may have run already.
        publishing.flush()

    @staticmethod
    def _close(batch: Batch) -> None:
        try:
            batch.close()
        except BaseException:
            # Even a receiver's SystemExit must not end the thread: every
            # later batch would wait for it.
            logger.exception("verity_django: delivering a collected response's batch failed")


_collected = _CollectedBatches()


def _put_collected(batch: Batch, pid: int) -> None:
    # A forked child collecting its copy of a parent's response: the parent
    # delivers that batch.
    if pid == os.getpid():
        _collected.put(batch)


def deliver_collected(timeout: float) -> bool:
    """Deliver the batches of collected, never closed responses that still
    wait (tests, before the next test's database); True once delivered."""
    return _collected.deliver_all(timeout)


def _forget_after_fork() -> None:
    # The thread does not survive a fork; a child starts its own when needed.
    global _collected
    _collected = _CollectedBatches()


os.register_at_fork(after_in_child=_forget_after_fork)


def _is_params_variant(x: d.Directive) -> bool:
    return x.op == "refresh_collection" and bool(x.params) and x.result is None


def _readable_copy(
    entry: _Entry, readable: Callable[[str], bool] | None, answers: dict[str, bool]
) -> d.Directive | None:
    """The entry's directive as a requester who may read what ``readable``
    allows sees it: None when it is of no audience of theirs. ``answers``
    keeps what ``readable`` said, for the batch's other entries."""
    if readable is None:
        return entry.directive
    if not _reads_any(readable, answers, entry.audiences):
        return None
    directive = entry.directive
    if directive.result is None or entry.result_audiences is None:
        return directive
    if _reads_any(readable, answers, entry.result_audiences):
        return directive
    return directive.with_metadata(result=None)


def _reads_any(
    readable: Callable[[str], bool], answers: dict[str, bool], audiences: Collection[str]
) -> bool:
    # In a fixed order, so that the hook is asked the same questions on every
    # run; a loop, not any() over a generator: this runs for every directive
    # of every response (bench W1).
    for audience in sorted(audiences) if len(audiences) > 1 else audiences:
        answer = answers.get(audience)
        if answer is None:
            answer = answers[audience] = readable(audience)
        if answer:
            return True
    return False


def _without_subsumed(items: list[d.Directive]) -> list[d.Directive]:
    """``items`` without the params variants of collections they also hold
    whole (the whole collection covers them)."""
    # Tests inline, not helper calls: this runs twice per request (bench W5).
    whole = {x.name for x in items if x.op == "refresh_collection" and not x.params}
    if not whole:
        return items
    return [x for x in items if not (x.op == "refresh_collection" and x.params and x.name in whole)]


def current() -> Batch | None:
    return _current.get()


@contextmanager
def activate(opened: Batch) -> Iterator[Batch]:
    """Make ``opened`` the current batch inside the block (the middleware's
    per-request batch); closing it is the caller's call."""
    token = _current.set(opened)
    try:
        yield opened
    finally:
        _current.reset(token)


@contextmanager
def batch(*, source: str | None = None) -> Iterator[Batch]:
    """Deliver everything committed inside the block as one batch at its end.

    Nested blocks join the outermost one.
    """
    outer = _current.get()
    if outer is not None:
        yield outer
        return
    opened = Batch(source=source)
    try:
        with activate(opened):
            yield opened
    finally:
        opened.close()


@contextmanager
def disabled() -> Iterator[None]:
    """Produce no directive inside the block (data migrations, imports)."""
    token = _disabled.set(True)
    try:
        yield
    finally:
        _disabled.reset(token)


def is_disabled() -> bool:
    return _disabled.get()


def emit(
    directive: d.Directive,
    audience: str | Iterable[str] = GLOBAL,
    *,
    using: str | None = None,
) -> None:
    """Send a hand-written directive, batched and delivered like the others."""
    if not isinstance(directive, d.Directive):
        raise TypeError(f"emit() takes a Directive, got {type(directive).__name__}")
    audiences = [audience] if isinstance(audience, str) else list(audience)
    for a in audiences:
        validate_audience(a)
    if not conf.ENABLED or is_disabled():
        return
    collect([Routed(directive, frozenset(audiences))], using=using)


def collect(routed: list[Routed], *, using: str | None = None) -> None:
    """Add directives of a change; they count once the change is committed."""
    if not routed:
        return
    connection = connections[using or DEFAULT_DB_ALIAS]
    if not internals.commit_is_ahead(connection):
        _add_committed(_current.get(), routed)
        return
    _part_for(connection).items.extend(routed)


def collect_plain(rules: ModelRules, change: PlainChange, connection: Any) -> None:
    """Add a change of rules that route by values alone, made through
    ``connection``: it is routed when it commits, together with the others
    of its savepoint level (one ``route_plain`` for a loop of saves, bench W4)."""
    part: _Part | None = getattr(connection, _PART_ATTR, None)
    if part is not None and part.still_open(connection, _current.get()):
        # The part of the open batch at this savepoint level: the commit it
        # waits for is still ahead (the next save of a loop, bench W4).
        part.add_plain(rules, change, connection.alias)
        return
    if not internals.commit_is_ahead(connection):
        _add_committed(_current.get(), rules.route_plain([change], connection.alias))
        return
    _part_for(connection).add_plain(rules, change, connection.alias)


def _part_for(connection: Any) -> _Part:
    batch = _current.get()
    if batch is not None:
        return _open_part(connection, batch)
    part = _open_part(connection, _transaction_batch(connection))
    _keep_flush_last(connection)
    return part


class _Plain:
    """Consecutive plain changes of one set of rules, routed at commit."""

    __slots__ = ("changes", "rules", "using")

    def __init__(self, rules: ModelRules, using: str, change: PlainChange) -> None:
        self.rules = rules
        self.using = using
        self.changes = [change]


class _Part:
    """The directives of one savepoint level, delivered on commit.

    Django discards an ``on_commit`` callback when a savepoint it was
    registered under rolls back, so every change made at the same savepoint
    level can share one callback: they commit or roll back together.
    """

    __slots__ = ("batch", "items", "last_plain", "savepoints", "seen_in")

    def __init__(self, batch: Batch, savepoints: list[str]) -> None:
        self.batch = batch
        self.savepoints = savepoints
        self.seen_in: list[Any] = []
        self.last_plain: _Plain | None = None
        # In the order the changes were made, which is the batch's order.
        self.items: list[Routed | _Plain] = []

    def still_open(self, connection: Any, batch: Batch | None) -> bool:
        """Whether changes made now through ``connection`` for ``batch`` join
        this part: the same batch and savepoint level, and still registered
        (a rollback of its savepoint or transaction drops it)."""
        return (
            self.batch is batch
            and internals.savepoints_are(connection, self.savepoints)
            and internals.still_registered(connection, self, self.seen_in)
        )

    def add_plain(self, rules: ModelRules, change: PlainChange, using: str) -> None:
        items = self.items
        last = self.last_plain
        # An identity test, not isinstance(): this runs on every save (bench W4).
        if items and items[-1] is last and last.rules is rules and last.using == using:
            last.changes.append(change)
        else:
            self.last_plain = _Plain(rules, using, change)
            items.append(self.last_plain)

    def __call__(self) -> None:
        routed: list[Routed] = []
        for item in self.items:
            if isinstance(item, _Plain):
                routed += item.rules.route_plain(item.changes, item.using)
            else:
                routed.append(item)
        _add_committed(self.batch, routed)


_PART_ATTR = "_verity_open_part"


def _open_part(connection: Any, batch: Batch) -> _Part:
    part: _Part | None = getattr(connection, _PART_ATTR, None)
    if part is not None and part.still_open(connection, batch):
        return part
    part = _Part(batch, internals.open_savepoints(connection))
    setattr(connection, _PART_ATTR, part)
    connection.on_commit(part)
    part.seen_in = internals.commit_callbacks(connection)
    return part


def _stamp(directive: d.Directive, source: str | None, now: int) -> d.Directive:
    changes: dict[str, Any] = {}
    if directive.idempotency_key is None:
        changes["idempotency_key"] = d.new_idempotency_key()
    if directive.timestamp is None:
        changes["timestamp"] = now
    if source is not None and directive.source is None and directive.op != "force_reload_page":
        changes["source"] = source
    return directive.with_trusted_metadata(**changes) if changes else directive


def _add_committed(batch: Batch | None, routed: list[Routed]) -> None:
    """Committed directives join the open batch, or go out as a batch of their
    own (after the batch they belonged to has already published)."""
    if batch is not None and not batch.closed:
        batch.add(routed)
        return
    alone = Batch() if batch is None else Batch(source=batch.source, origin_of=batch.origin_of)
    alone.add(routed)
    alone.close()


# An implicit batch collects one outermost transaction outside any batch. Its
# flush callback is registered with no savepoint ids, so a savepoint rollback
# never discards it (Django drops only callbacks tagged with that savepoint),
# and it is kept after every directive callback so that it runs last.
_FLUSH_ATTR = "_verity_transaction_batch"


def _transaction_batch(connection: Any) -> Batch:
    state = getattr(connection, _FLUSH_ATTR, None)
    if state is not None and internals.is_registered(connection, state[1]):
        return state[0]  # type: ignore[no-any-return]
    implicit = Batch()
    flush = partial(_flush_transaction_batch, connection, implicit)
    setattr(connection, _FLUSH_ATTR, (implicit, flush))
    internals.register_unscoped(connection, flush)
    return implicit


def _keep_flush_last(connection: Any) -> None:
    state = getattr(connection, _FLUSH_ATTR, None)
    if state is not None:
        internals.move_to_end(connection, state[1])


def _flush_transaction_batch(connection: Any, implicit: Batch) -> None:
    state = getattr(connection, _FLUSH_ATTR, None)
    if state is not None and state[0] is implicit:
        setattr(connection, _FLUSH_ATTR, None)
    implicit.close()
