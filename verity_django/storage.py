"""django-eventstream storages whose event id *is* the envelope's seq.

An envelope must carry its seq inside its data, but django-eventstream
assigns the id only after it has serialized the data. These storages take
the data in two halves and write ``head + str(id) + tail`` in the same atomic
step that allocates the id, so a stored (and replayed) envelope always says
which seq it is, and ids stay contiguous across every process that shares
the storage. They also speak django-eventstream's ``StorageBase`` API, so its
stream view reads them for catch-up and ``Last-Event-ID`` replay.

Configure one as ``EVENTSTREAM_STORAGE_CLASS``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Protocol, cast

from django.conf import settings
from django.core.signals import setting_changed
from django.db import (
    DatabaseError,
    IntegrityError,
    connections,
    router,
    transaction,
)
from django.db.models import F
from django.utils import timezone
from django_eventstream.event import Event
from django_eventstream.storage import EventDoesNotExist, StorageBase

from verity_django.conf import conf
from verity_django.readers import is_reader_thread, on_reader

_TRIM_EVERY = 60.0
logger = logging.getLogger(__name__)


def configured() -> SequencedStorage:
    """The project's sequenced storage (``EVENTSTREAM_STORAGE_CLASS``).

    One instance per process and class, where django-eventstream makes one
    per thread: ASGI serves each request from a thread of its own, so its
    cache missed on every request (bench W1: 26 Python calls per publish).
    Both storages keep no state of their own per instance.
    """
    name = getattr(settings, "EVENTSTREAM_STORAGE_CLASS", "")
    found = _instances.get(name)
    if found is None:
        found = _instances[name] = _load(name)
    return found


_instances: dict[Any, SequencedStorage] = {}


def _load(name: Any) -> SequencedStorage:
    from django.core.exceptions import ImproperlyConfigured
    from django.utils.module_loading import import_string

    storage = import_string(name)() if isinstance(name, str) and name else None
    if not hasattr(storage, "append_many"):
        raise ImproperlyConfigured(
            "EVENTSTREAM_STORAGE_CLASS must be verity_django.storage.DatabaseStorage or "
            "verity_django.storage.RedisStorage (see check verity_django.E020)."
        )
    return cast("SequencedStorage", storage)


@dataclass(frozen=True)
class Append:
    """One envelope to store: ``head + str(seq) + tail`` on ``channel``.

    ``skip`` seqs are consumed first without an event: envelopes this process
    had to drop, so that readers see the gap instead of a silent hole.
    """

    channel: str
    head: str
    tail: str
    skip: int = 0
    # The same on every attempt to store this envelope. ``retried``: an
    # earlier attempt may have been stored without its answer arriving (a
    # timeout after the server ran it), so a storage that can tell returns
    # that attempt's seq instead of storing the envelope again.
    token: str = ""
    retried: bool = False


class SequencedStorage(Protocol):
    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event: ...

    def append_many(
        self, event_type: str, appends: Sequence[Append]
    ) -> list[Event | Exception]: ...

    def get_current_ids(self, channels: Iterable[str]) -> dict[str, int]: ...

    def get_events(self, channel: str, last_id: int, limit: int = 100) -> list[Event]: ...

    def get_current_id(self, channel: str) -> int: ...

    @property
    def failures(self) -> tuple[type[Exception], ...]:
        """What its reads raise when the storage itself fails."""
        ...


class DatabaseStorage(StorageBase):  # type: ignore[misc]
    """Events in django-eventstream's own tables, one query-light row each.

    The counter row is updated *first*, which takes the write lock (the row
    lock on PostgreSQL, the database lock on SQLite) until the event row is
    committed, so concurrent publishers in any process get ids in commit
    order.
    """

    _last_trim = 0.0
    _trim_lock = threading.Lock()
    shares_the_database = True

    def append_event(self, channel: str, event_type: str, data: Any) -> Event:
        from django_eventstream.models import Event as EventRow

        text = data if isinstance(data, str) else json.dumps(data)
        db = router.db_for_write(EventRow)
        with transaction.atomic(using=db):
            seq = _allocate(db, Append(channel, text, ""), event_type, sequenced=False)
        self._maybe_trim(db)
        return Event(channel, event_type, text, id=seq)

    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event:
        [event] = self.append_many(event_type, [Append(channel, head, tail)])
        if isinstance(event, Exception):
            raise event
        return event

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Event | Exception]:
        """Store envelopes in one transaction: one commit for all of them,
        and a wait for the write lock bounded by ``STORAGE_TIMEOUT``."""
        from django_eventstream.models import Event as EventRow

        db = router.db_for_write(EventRow)
        connection = connections[db]
        events: list[Event | Exception]
        if connection.vendor == "sqlite" and _in_autocommit(connection):
            events = _append_on_sqlite(connection, event_type, appends)
        elif _takes_many_statements(connection):
            events = _append_on_postgresql(connection, db, event_type, appends)
        else:
            events = []
            with bounded_transaction(connection):
                for item in appends:
                    seq = _allocate(db, item, event_type, sequenced=True)
                    data = f"{item.head}{seq}{item.tail}"
                    events.append(Event(item.channel, event_type, data, id=seq))
        self._maybe_trim(db)
        return events

    def get_current_id(self, channel: str) -> int:
        return self.get_current_ids([channel])[channel]

    @property
    def failures(self) -> tuple[type[Exception], ...]:
        return (DatabaseError,)

    def get_current_ids(self, channels: Iterable[str]) -> dict[str, int]:
        return on_reader(_current_ids, list(channels))

    def get_events(self, channel: str, last_id: int, limit: int = 100) -> list[Event]:
        return on_reader(_events_after, channel, last_id, limit)

    def _maybe_trim(self, db: str) -> None:
        now = time.monotonic()
        if now - DatabaseStorage._last_trim < _TRIM_EVERY:
            return
        with DatabaseStorage._trim_lock:
            if now - DatabaseStorage._last_trim < _TRIM_EVERY:
                return
            DatabaseStorage._last_trim = now
        from django_eventstream.models import Event as EventRow

        cutoff = timezone.now() - datetime.timedelta(seconds=conf.EVENT_RETENTION)
        trim(EventRow.objects.using(db).filter(created__lt=cutoff), db, "stored envelopes")


def trim(expired: Any, using: str, what: str) -> None:
    """Delete the ``expired`` rows, housekeeping after a write: a failure (a
    table locked by a reader, a lock timeout) is logged, never raised.

    The write it follows is done (committed, or in the caller's own
    transaction); raising would make it look failed, and the publisher would
    store its envelopes again. The next trim deletes what this one left. Its
    own savepoint keeps an enclosing transaction usable on PostgreSQL.
    """
    try:
        with bounded_transaction(connections[using]):
            expired.delete()
    except DatabaseError as exc:
        logger.warning("verity_django: trimming %s failed (%s); retrying later", what, exc)


def _current_ids(channels: list[str]) -> dict[str, int]:
    """Each channel's current id (0 before its first event).

    Raw SQL because the tailer asks this four times a second in every
    process, idle or not: the ORM spent about 600 Python calls building
    the same query each time (bench W5 ``--by-function``)."""
    from django_eventstream.models import EventCounter

    if not channels:
        return {}
    connection = connections[router.db_for_read(EventCounter)]
    meta = EventCounter._meta
    quote = connection.ops.quote_name
    name = quote(meta.get_field("name").column)
    value = quote(meta.get_field("value").column)
    # A process listening to thousands of audiences would pass SQLite's
    # limit on parameters in one statement.
    step = connection.features.max_query_params or len(channels)
    found: dict[str, int] = {}
    with connection.cursor() as cursor:
        for start in range(0, len(channels), step):
            chunk = channels[start : start + step]
            placeholders = ", ".join(["%s"] * len(chunk))
            cursor.execute(
                f"SELECT {name}, {value} FROM {quote(meta.db_table)} "
                f"WHERE {name} IN ({placeholders})",
                chunk,
            )
            found.update(cursor.fetchall())
    return {c: int(found.get(c, 0)) for c in channels}


def _events_after(channel: str, last_id: int, limit: int) -> list[Event]:
    from django_eventstream.models import Event as EventRow

    current = _current_ids([channel])[channel]
    if last_id == current:
        return []
    if last_id > current:
        raise EventDoesNotExist(f"{channel} has no event {last_id}", current)
    rows = list(
        EventRow.objects.filter(channel=channel, eid__gt=last_id)
        .order_by("eid")
        .values_list("eid", "type", "data")[:limit]
    )
    if not rows or rows[0][0] != last_id + 1:
        raise EventDoesNotExist(f"{channel} no longer stores event {last_id + 1}", current)
    return [Event(channel, kind, data, id=eid) for eid, kind, data in rows]


# Set in an SSE stream's context. django-eventstream re-checks every channel
# (the AUTHORIZE hook, which may query the database) in the stream's own
# thread on each storage re-read; a connection opened there would stay with
# the stream between re-reads, so it is released after each check.
streaming: ContextVar[bool] = ContextVar("verity_streaming", default=False)


def release_stream_connections() -> None:
    if not streaming.get():
        return
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close()


def bound_reader_session(*, connection: Any, **kwargs: Any) -> None:
    """A ``connection_created`` receiver: a PostgreSQL connection of the
    reader threads gets ``STORAGE_TIMEOUT`` as its statement and lock
    timeouts, for its whole session. A read that meets a table lock (a
    migration, ``VACUUM FULL``) then fails instead of holding the reader
    thread, and with it every stream's storage read, for as long as the
    lock lasts. Set once per connection, so a read costs no extra round
    trip; the reader threads run nothing but storage reads."""
    if connection.vendor != "postgresql" or not is_reader_thread():
        return
    milliseconds = int(conf.STORAGE_TIMEOUT * 1000)
    with connection.cursor() as cursor:
        # One statement each: a connection with server-side binding refuses two in one.
        for statement in _postgresql_timeout_settings(milliseconds, scope="SET"):
            cursor.execute(statement)


def _allocate(db: str, item: Append, event_type: str, *, sequenced: bool) -> int:
    """Add ``1 + item.skip`` to the channel's counter and store the event under
    the new value (``head + seq + tail`` when sequenced, else ``head``): on
    PostgreSQL in one statement, else in two."""
    from django_eventstream.models import Event as EventRow
    from django_eventstream.models import EventCounter

    step = 1 + item.skip
    if sequenced and connections[db].vendor == "postgresql":
        found = _append_in_one_statement(db, item, event_type)
        if found is not None:
            return found
    seq = _increment(db, EventCounter, item.channel, step)
    if seq is None:
        try:
            with transaction.atomic(using=db):
                EventCounter.objects.using(db).create(name=item.channel, value=step)
            seq = step
        except IntegrityError:
            seq = _increment(db, EventCounter, item.channel, step)
    assert seq is not None
    data = f"{item.head}{seq}{item.tail}" if sequenced else item.head
    _insert_event(db, EventRow, item.channel, event_type, data, seq)
    return seq


@contextmanager
def bounded_transaction(connection: Any) -> Iterator[None]:
    """One transaction whose wait for the database's write lock is bounded by
    ``STORAGE_TIMEOUT``: PostgreSQL's lock and statement timeouts (SQLite's
    busy timeout: :func:`_append_on_sqlite`).

    Inside someone else's transaction (a TestCase) their settings stand: a
    PostgreSQL ``SET LOCAL`` would outlive the append's savepoint.
    """
    milliseconds = int(conf.STORAGE_TIMEOUT * 1000)
    if connection.in_atomic_block:
        with transaction.atomic(using=connection.alias):
            yield
        return
    with transaction.atomic(using=connection.alias):
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(_postgresql_timeouts(milliseconds))
        yield


def _postgresql_timeouts(milliseconds: int) -> str:
    """The lock and statement timeouts for the rest of the transaction."""
    return "; ".join(_postgresql_timeout_settings(milliseconds, scope="SET LOCAL"))


def _postgresql_timeout_settings(milliseconds: int, *, scope: str) -> list[str]:
    """``SET`` (the session) or ``SET LOCAL`` (the transaction) of the lock
    and statement timeouts."""
    return [f"{scope} {name} = {milliseconds}" for name in ("lock_timeout", "statement_timeout")]


def _in_autocommit(connection: Any) -> bool:
    if connection.in_atomic_block:
        return False
    connection.ensure_connection()
    return bool(connection.get_autocommit())


def _append_on_sqlite(
    connection: Any, event_type: str, appends: Sequence[Append]
) -> list[Event | Exception]:
    """Store envelopes in one ``BEGIN IMMEDIATE`` transaction on a DB-API
    connection of the storage's own (:class:`_SqliteAppenders`).

    Django's ``atomic()`` and cursor wrappers were 280 of the 1,050 Python
    calls verity adds to a PATCH (bench W1, and W5's throughput, which pays
    for every call). These statements bypass Django's query log and
    ``execute_wrapper``s. ``BEGIN IMMEDIATE`` takes the write lock before
    the counter is read, within ``STORAGE_TIMEOUT``, so ids follow commit
    order across processes as with Django's path.
    """
    from django_eventstream.models import Event as EventRow
    from django_eventstream.models import EventCounter

    counter = connection.ops.quote_name(EventCounter._meta.db_table)
    into, created = _event_insert_target(connection, EventRow)
    events: list[Event | Exception] = []
    # Raised as django.db's errors, as from Django's own cursors.
    with connection.wrap_database_errors, _appenders.connection_for(connection) as raw:
        try:
            if raw.isolation_level is None:
                # The caller's own connection, in autocommit (see
                # _SqliteAppenders); the storage's own begin by themselves.
                raw.execute("BEGIN IMMEDIATE")
            for item in appends:
                step = 1 + item.skip
                row = raw.execute(
                    f"UPDATE {counter} SET value = value + ? WHERE name = ? RETURNING value",
                    (step, item.channel),
                ).fetchone()
                if row is None:
                    # The write lock is ours: nobody else can create it meanwhile.
                    raw.execute(
                        f"INSERT INTO {counter} (name, value, updated) VALUES (?, ?, ?)",
                        (item.channel, step, created),
                    )
                    seq = step
                else:
                    seq = int(row[0])
                data = f"{item.head}{seq}{item.tail}"
                raw.execute(
                    f"INSERT INTO {into} VALUES (?, ?, ?, ?, ?)",
                    (item.channel, event_type, data, seq, created),
                )
                events.append(Event(item.channel, event_type, data, id=seq))
            # commit() and rollback() let go of the GIL once, where an
            # execute() does so four times, each a thread switch under
            # concurrent requests (bench W5).
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
    return events


class _SqliteAppenders:
    """DB-API connections that only ever append, one per appending thread at
    a time, kept between appends.

    Under ASGI every request runs in a new thread with a new connection, and
    an append on it paid for preparing its statements again and for setting
    the connection's busy timeout to ``STORAGE_TIMEOUT`` and back: seven
    statements instead of four. Each statement lets go of the GIL several
    times, and under concurrent requests each time hands it to another
    thread: of the 43 GIL releases verity added to a W5 request, 37 were
    SQLite's (bench/README.md, "Stop 22"). A connection kept here has its
    busy timeout set once, and its statements stay prepared.

    It is opened as Django opens the alias's own connections (its OPTIONS,
    ``init_command``), without Django's ``connection_created`` signal, since
    it never runs a query of the project's. An in-memory database (Django's
    SQLite test database) is appended to on the caller's own connection: a
    second connection to its shared cache would meet "table is locked" at
    once, and no busy timeout applies there.

    The lock guards the idle lists only: no connection is opened, used or
    closed under it.
    """

    # Idle connections kept per database; more concurrent appends open more
    # and close them as they finish.
    KEEP = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[tuple[str, str, int], list[Any]] = {}
        self.inherited: list[Any] = []

    @contextmanager
    def connection_for(self, connection: Any) -> Iterator[Any]:
        if connection.is_in_memory_db():
            connection.ensure_connection()
            yield connection.connection
            return
        milliseconds = int(conf.STORAGE_TIMEOUT * 1000)
        key = (connection.alias, str(connection.settings_dict["NAME"]), milliseconds)
        with self.lock:
            idle = self.idle.get(key)
            raw = idle.pop() if idle else None
        if raw is None:
            raw = connection.get_new_connection(connection.get_connection_params())
            # sqlite3 begins before the first statement that writes (the
            # counter's UPDATE), taking the write lock before it is read.
            raw.isolation_level = "IMMEDIATE"
            raw.execute(f"PRAGMA busy_timeout = {milliseconds}")
        try:
            yield raw
        except BaseException:
            # After a failure its state is unknown: the next append opens another.
            raw.close()
            raise
        with self.lock:
            idle = self.idle.setdefault(key, [])
            if len(idle) < self.KEEP:
                idle.append(raw)
                return
        raw.close()

    def close_all(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, {}
        for connections_of_one_database in idle.values():
            for raw in connections_of_one_database:
                raw.close()

    def forget(self) -> None:
        """In a forked child. A SQLite connection must not be used across a
        fork, closing included: the parent's stay referenced, untouched."""
        self.inherited.extend(raw for idle in self.idle.values() for raw in idle)
        self.idle = {}
        self.lock = threading.Lock()


_appenders = _SqliteAppenders()


def _close_appenders(*, setting: str, **kwargs: Any) -> None:
    # Not on VERITY: a connection is kept per STORAGE_TIMEOUT, and a test
    # that toggles ENABLED must not reopen it (bench.profile does so per run).
    if setting == "DATABASES":
        _appenders.close_all()


setting_changed.connect(_close_appenders, dispatch_uid="verity_django.storage.setting_changed")
os.register_at_fork(after_in_child=_appenders.forget)


def _takes_many_statements(connection: Any) -> bool:
    """Whether a PostgreSQL connection in autocommit, through psycopg 3,
    which binds parameters client-side on request and so can send several
    statements in one round trip."""
    if connection.vendor != "postgresql" or not _in_autocommit(connection):
        return False
    return type(connection.connection).__module__.partition(".")[0] == "psycopg"


def _append_on_postgresql(
    connection: Any, db: str, event_type: str, appends: Sequence[Append]
) -> list[Event | Exception]:
    """Store a run of envelopes in one round trip to PostgreSQL.

    The statements go as one simple query, which PostgreSQL runs as one
    implicit transaction: the ``SET LOCAL`` timeouts hold for the run and
    end with it, a failure anywhere stores nothing, and each counter's row
    lock, taken by its ``UPDATE``, orders the ids by commit as in
    :func:`_allocate`. Django's ``atomic()`` path costs four round trips
    (``BEGIN``, the timeouts, the append, ``COMMIT``), each a release of
    the GIL that, under concurrent requests (bench W5), hands it to another
    thread. Like :func:`_append_on_sqlite`, this bypasses Django's query log
    and ``execute_wrapper``s.

    An envelope whose audience has no counter row yet (its first envelope
    ever) stores nothing here; it is stored next, through :func:`_allocate`,
    which creates the row.
    """
    import psycopg

    one, created = _postgresql_append(connection)
    sql = [_postgresql_timeouts(int(conf.STORAGE_TIMEOUT * 1000))]
    params: list[Any] = []
    for item in appends:
        sql.append(one)
        params += _postgresql_append_params(item, event_type, created)
    seqs: list[int | None] = []
    with connection.wrap_database_errors, psycopg.ClientCursor(connection.connection) as cursor:
        cursor.execute("; ".join(sql), params)
        while True:
            # The SETs' results have no rows; each append's has one or none.
            if cursor.description is not None:
                row = cursor.fetchone()
                seqs.append(None if row is None else int(row[0]))
            if not cursor.nextset():
                break
    events: list[Event | Exception] = []
    # After one failure, no later envelope takes a seq: it could be of the
    # same audience, and would take the failed one's place.
    failure: Exception | None = None
    for item, seq in zip(appends, seqs, strict=True):
        if seq is None:
            if failure is not None:
                events.append(failure)
                continue
            try:
                with bounded_transaction(connection):
                    seq = _allocate(db, item, event_type, sequenced=True)
            except Exception as exc:
                failure = exc
                events.append(exc)
                continue
        events.append(Event(item.channel, event_type, f"{item.head}{seq}{item.tail}", id=seq))
    return events


def _increment(db: str, counter_model: Any, channel: str, step: int) -> int | None:
    """Add ``step`` to the channel's counter and return it, in one statement."""
    connection = connections[db]
    if connection.vendor not in ("postgresql", "sqlite"):
        counters = counter_model.objects.using(db).filter(name=channel)
        if not counters.update(value=F("value") + step):
            return None
        return int(counters.values_list("value", flat=True).get())
    table = connection.ops.quote_name(counter_model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET value = value + %s WHERE name = %s RETURNING value",
            [step, channel],
        )
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def _append_in_one_statement(db: str, item: Append, event_type: str) -> int | None:
    """Allocate the seq and store the event in one PostgreSQL statement (one
    round trip instead of two); the counter's row lock still orders the ids
    by commit. None when the channel has no counter row yet."""
    connection = connections[db]
    sql, created = _postgresql_append(connection)
    with connection.cursor() as cursor:
        cursor.execute(sql, _postgresql_append_params(item, event_type, created))
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def _postgresql_append(connection: Any) -> tuple[str, Any]:
    """One PostgreSQL statement that adds a step to a channel's counter and
    stores the event under the new value, returning it (no row when the
    channel has no counter yet); and ``created`` for its parameters."""
    from django_eventstream.models import Event as EventRow
    from django_eventstream.models import EventCounter

    into, created = _event_insert_target(connection, EventRow)
    # Built once, as the insert's column list is: it is the same for every
    # append (one per envelope of a run).
    sql = _postgresql_appends.get(into)
    if sql is None:
        quote = connection.ops.quote_name
        counter = quote(EventCounter._meta.db_table)
        sql = _postgresql_appends[into] = (
            f"WITH c AS (UPDATE {counter} SET value = value + %s WHERE name = %s "
            f"RETURNING value) INSERT INTO {into} "
            "SELECT %s, %s, %s || c.value::text || %s, c.value, %s FROM c "
            f"RETURNING {quote(EventRow._meta.get_field('eid').column)}"
        )
    return sql, created


_postgresql_appends: dict[str, str] = {}


def _postgresql_append_params(item: Append, event_type: str, created: Any) -> list[Any]:
    """The parameters of :func:`_postgresql_append`'s statement for ``item``."""
    return [1 + item.skip, item.channel, item.channel, event_type, item.head, item.tail, created]


def _insert_event(
    db: str, event_model: Any, channel: str, event_type: str, data: str, seq: int
) -> None:
    """One INSERT: django-eventstream's ``Event.save()`` would look the
    counter up again."""
    connection = connections[db]
    into, created = _event_insert_target(connection, event_model)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {into} VALUES (%s, %s, %s, %s, %s)",
            [channel, event_type, data, seq, created],
        )


def _event_insert_target(connection: Any, event_model: Any) -> tuple[str, Any]:
    """``table (channel, type, data, eid, created)`` for an INSERT of one
    event, and ``created`` (now) as that database stores it."""
    key = (connection.vendor, event_model)
    target = _insert_targets.get(key)
    if target is None:
        meta = event_model._meta
        quote = connection.ops.quote_name
        names = ("channel", "type", "data", "eid", "created")
        columns = ", ".join(quote(meta.get_field(name).column) for name in names)
        target = _insert_targets[key] = f"{quote(meta.db_table)} ({columns})"
    # What DateTimeField.get_db_prep_value gives for timezone.now(), without
    # its checks for naive values (bench W1: 30 Python calls down to 16).
    created = connection.ops.adapt_datetimefield_value(timezone.now())
    return target, created


# The column list is the same for every append (bench W1: the insert's 53
# Python calls down to 30).
_insert_targets: dict[tuple[str, Any], str] = {}


# One script call stores a whole run of envelopes: allocating each id,
# storing the event and publishing it to django-eventstream's cross-process
# pub/sub, which Redis runs atomically, so the publish order is the id order
# for every listener in every process. The run travels as one JSON argument
# (bench F3: 64 calls of 15 arguments each spent most of a run's time in
# redis-py's command packing).
#
# ARGV: event type, retention (s), pub/sub channel ('' for none), epoch
# candidate, token TTL (s), the run ([[channel, head, tail, skip, token,
# retried, sequenced], ...]), then the counter, event and token key prefixes.
# Returns the seqs, in the run's order.
#
# Redis does not roll a script back: one that fails midway (a counter key
# holding something that is not an integer) leaves the envelopes before the
# failure stored and published. The caller retries the whole run with
# ``retried`` set, and each stored envelope's token answers with its earlier
# seq, so a retry stores nothing twice. Under ``maxmemory`` a script is
# refused at its first write, before it changed anything, and is never cut
# off after one.
#
# The counter, event and token keys are built here, not passed in KEYS (as
# django-eventstream's own Redis storage does, this storage is for one
# Redis node, never a cluster).
_APPEND_SCRIPT = """
local event_type, retention, pubsub = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local token_ttl = tonumber(ARGV[5])
redis.call('SET', KEYS[1], ARGV[4], 'NX')
local seqs = {}
for i, item in ipairs(cjson.decode(ARGV[6])) do
  local channel, head, tail, skip, token, retried, sequenced = unpack(item)
  local earlier = false
  if retried == 1 and token ~= '' then earlier = redis.call('GET', ARGV[9] .. token) end
  if earlier then
    seqs[i] = tonumber(earlier)
  else
    local id = redis.call('INCRBY', ARGV[7] .. channel, 1 + skip)
    local data = head
    if sequenced == 1 then data = head .. id .. tail end
    redis.call('SET', ARGV[8] .. channel .. ':' .. id,
      cjson.encode({type=event_type, data=data}), 'EX', retention)
    if pubsub ~= '' then
      redis.call('PUBLISH', pubsub, cjson.encode(
        {channel=channel, event_type=event_type, data=data, pub_id=tostring(id)}))
    end
    if token ~= '' then
      redis.call('SET', ARGV[9] .. token, id, 'EX', token_ttl)
    end
    seqs[i] = id
  end
end
return seqs
"""

# How long an append's token is kept: longer than a retry can follow the
# attempt whose answer was lost (the publisher's longest backoff plus a
# timeout). About 100 bytes of Redis memory per envelope of that window.
APPEND_TOKEN_TTL = 60

# Every process's Redis subscription (tailer.supervise_redis_listener) reads
# this pub/sub channel, django-eventstream's name for it.
PUBSUB_CHANNEL = "events_channel"
EPOCH_KEY = "verity:epoch"
COUNTER_PREFIX = "verity:counter:"
EVENT_PREFIX = "verity:event:"
TOKEN_PREFIX = "verity:appended:"


def bounded_redis(details: dict[str, Any]) -> dict[str, Any]:
    """redis-py waits forever on a server that accepts and never answers, and
    retries a timed-out command three times: give every command one bounded
    try unless the project's connection settings say otherwise."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    details.setdefault("socket_timeout", conf.REDIS_TIMEOUT)
    details.setdefault("socket_connect_timeout", conf.REDIS_TIMEOUT)
    details.setdefault("retry", Retry(NoBackoff(), 0))
    return details


class RedisStorage(StorageBase):  # type: ignore[misc]
    """Events in Redis; also the cross-process publisher when
    ``EVENTSTREAM_REDIS`` points at the same server."""

    # django-eventstream makes a storage per thread, and ASGI serves each
    # request (each SSE connection) from a thread of its own: share one
    # thread-safe client per process instead of a connection pool per thread.
    _clients: dict[str, tuple[Any, Any]] = {}
    _clients_lock = threading.Lock()
    shares_the_database = False

    @property
    def client(self) -> Any:
        return self._client_and_script()[0]

    @property
    def failures(self) -> tuple[type[Exception], ...]:
        import redis

        return (redis.RedisError,)

    def _client_and_script(self) -> tuple[Any, Any]:
        details = getattr(settings, "EVENTSTREAM_STORAGE_CONNECTION", None)
        if not isinstance(details, dict):
            from django.core.exceptions import ImproperlyConfigured

            raise ImproperlyConfigured(
                "verity_django.storage.RedisStorage needs EVENTSTREAM_STORAGE_CONNECTION "
                "(a dict of redis.Redis keyword arguments)."
            )
        key = repr(sorted(details.items()))
        found = RedisStorage._clients.get(key)
        if found is None:
            import redis

            with RedisStorage._clients_lock:
                found = RedisStorage._clients.get(key)
                if found is None:
                    client = redis.Redis(**bounded_redis(deepcopy(details)))
                    found = (client, client.register_script(_APPEND_SCRIPT))
                    RedisStorage._clients[key] = found
        return found

    @staticmethod
    def _counter_key(channel: str) -> str:
        return f"{COUNTER_PREFIX}{channel}"

    @staticmethod
    def _event_prefix(channel: str) -> str:
        return f"{EVENT_PREFIX}{channel}:"

    def _publishes(self) -> bool:
        return getattr(settings, "EVENTSTREAM_REDIS", None) is not None

    def append_event(self, channel: str, event_type: str, data: Any) -> Event:
        text = data if isinstance(data, str) else json.dumps(data)
        [seq] = self._append(event_type, [Append(channel, text, "")], sequenced=False)
        return Event(channel, event_type, text, id=seq)

    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event:
        [event] = self.append_many(event_type, [Append(channel, head, tail)])
        if isinstance(event, Exception):
            raise event
        return event

    def append_many(self, event_type: str, appends: Sequence[Append]) -> list[Event | Exception]:
        """Store envelopes in one round trip and one atomic script; raises
        when the script fails (see ``_APPEND_SCRIPT`` for what a retry of
        the same appends then does)."""
        seqs = self._append(event_type, appends, sequenced=True)
        return [
            Event(item.channel, event_type, f"{item.head}{seq}{item.tail}", id=seq)
            for item, seq in zip(appends, seqs, strict=True)
        ]

    def _append(self, event_type: str, appends: Sequence[Append], *, sequenced: bool) -> list[int]:
        script = self._client_and_script()[1]
        run = [
            [
                item.channel,
                item.head,
                item.tail,
                item.skip,
                item.token,
                1 if item.retried and item.token else 0,
                1 if sequenced else 0,
            ]
            for item in appends
        ]
        seqs = script(
            keys=[EPOCH_KEY],
            args=[
                event_type,
                conf.EVENT_RETENTION,
                PUBSUB_CHANNEL if self._publishes() else "",
                os.urandom(16).hex(),
                APPEND_TOKEN_TTL,
                json.dumps(run, ensure_ascii=False, separators=(",", ":")),
                COUNTER_PREFIX,
                EVENT_PREFIX,
                TOKEN_PREFIX,
            ],
        )
        return [int(seq) for seq in seqs]

    @property
    def publishes_to_listeners(self) -> bool:
        return self._publishes()

    def epoch(self) -> str:
        """A token that changes whenever Redis lost its data.

        A Redis restarted without persistence starts every counter again at 1,
        and a stream opened before cannot tell a new seq 1 from an old one it
        already delivered. Every append creates the token when it is missing,
        so any write after a data loss leaves a new one.
        """
        pipe = self.client.pipeline()
        pipe.set(EPOCH_KEY, os.urandom(16).hex(), nx=True)
        pipe.get(EPOCH_KEY)
        value = pipe.execute()[1]
        return value.decode() if isinstance(value, bytes) else str(value)

    def get_current_id(self, channel: str) -> int:
        return self.get_current_ids([channel])[channel]

    def get_current_ids(self, channels: Iterable[str]) -> dict[str, int]:
        wanted = list(channels)
        if not wanted:
            return {}
        values = self.client.mget([self._counter_key(c) for c in wanted])
        return {c: int(v) if v else 0 for c, v in zip(wanted, values, strict=True)}

    def get_events(self, channel: str, last_id: int, limit: int = 100) -> list[Event]:
        current = self.get_current_id(channel)
        if last_id == current:
            return []
        if last_id > current:
            raise EventDoesNotExist(f"{channel} has no event {last_id}", current)
        ids = list(range(last_id + 1, min(last_id + limit, current) + 1))
        prefix = self._event_prefix(channel)
        raw = self.client.mget([f"{prefix}{i}" for i in ids])
        if not raw or raw[0] is None:
            raise EventDoesNotExist(f"{channel} no longer stores event {last_id + 1}", current)
        out: list[Event] = []
        for event_id, value in zip(ids, raw, strict=True):
            if value is None:
                break
            stored = json.loads(value)
            out.append(Event(channel, stored["type"], stored["data"], id=event_id))
        return out
