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
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from copy import deepcopy
from typing import Any, Protocol, TypeVar

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.models import F
from django.utils import timezone
from django_eventstream.event import Event
from django_eventstream.storage import EventDoesNotExist, StorageBase

from verity_django.conf import conf

_TRIM_EVERY = 60.0
T = TypeVar("T")


class SequencedStorage(Protocol):
    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event: ...

    def get_current_ids(self, channels: Iterable[str]) -> dict[str, int]: ...

    def get_events(self, channel: str, last_id: int, limit: int = 100) -> list[Event]: ...

    def get_current_id(self, channel: str) -> int: ...


class DatabaseStorage(StorageBase):  # type: ignore[misc]
    """Events in django-eventstream's own tables, one query-light row each.

    The counter row is updated *first*, which takes the write lock (the row
    lock on PostgreSQL, the database lock on SQLite) until the event row is
    committed, so concurrent publishers in any process get ids in commit
    order.
    """

    _last_trim = 0.0
    _trim_lock = threading.Lock()

    def append_event(self, channel: str, event_type: str, data: Any) -> Event:
        text = data if isinstance(data, str) else json.dumps(data)
        return self._append(channel, event_type, lambda _: text)

    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event:
        from django_eventstream.models import Event as EventRow
        from django_eventstream.models import EventCounter

        db = router.db_for_write(EventRow)
        if connections[db].vendor == "postgresql":
            seq = _append_in_one_statement(
                db, EventCounter, EventRow, channel, event_type, head, tail
            )
            if seq is not None:
                self._maybe_trim(db)
                return Event(channel, event_type, f"{head}{seq}{tail}", id=seq)
        return self._append(channel, event_type, lambda seq: f"{head}{seq}{tail}")

    def _append(self, channel: str, event_type: str, render: Any) -> Event:
        from django_eventstream.models import Event as EventRow
        from django_eventstream.models import EventCounter

        db = router.db_for_write(EventRow)
        with transaction.atomic(using=db):
            seq = _increment(db, EventCounter, channel)
            if seq is None:
                try:
                    with transaction.atomic(using=db):
                        EventCounter.objects.using(db).create(name=channel, value=1)
                    seq = 1
                except IntegrityError:
                    seq = _increment(db, EventCounter, channel)
            assert seq is not None
            data = render(seq)
            _insert_event(db, EventRow, channel, event_type, data, seq)
        self._maybe_trim(db)
        return Event(channel, event_type, data, id=seq)

    def get_current_id(self, channel: str) -> int:
        return self.get_current_ids([channel])[channel]

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
        EventRow.objects.using(db).filter(created__lt=cutoff).delete()


def _current_ids(channels: list[str]) -> dict[str, int]:
    from django_eventstream.models import EventCounter

    found = dict(EventCounter.objects.filter(name__in=channels).values_list("name", "value"))
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


# Under ASGI every request runs in a thread of its own, and an SSE request
# keeps that thread for as long as the stream lives. A database connection
# opened there stays with the stream too (about 60 KiB per idle stream on
# SQLite, measured by bench M1), so every stream of a process reads storage
# through these few threads instead, each holding one connection.
_READER_THREADS = 2
_reader: ThreadPoolExecutor | None = None
_reader_lock = threading.Lock()
_READER_PREFIX = "verity-storage"


def reader() -> ThreadPoolExecutor:
    global _reader
    with _reader_lock:
        if _reader is None:
            _reader = ThreadPoolExecutor(_READER_THREADS, thread_name_prefix=_READER_PREFIX)
        return _reader


def on_reader(func: Callable[..., T], *args: Any) -> T:
    """Run a storage read on the shared reader threads and wait for it.

    A caller inside a transaction reads on its own connection: only that
    connection sees what the transaction wrote (and in a TestCase,
    everything the test wrote).
    """
    if any(c.in_atomic_block for c in connections.all(initialized_only=True)):
        return func(*args)
    if threading.current_thread().name.startswith(_READER_PREFIX):
        return _reconnecting(func, *args)
    return reader().submit(_reconnecting, func, *args).result()


def _reconnecting(func: Callable[..., T], *args: Any) -> T:
    try:
        return func(*args)
    except DatabaseError:
        # A failed query may leave this long-lived thread's connection
        # unusable (the database restarted, say): the next read reconnects.
        connections.close_all()
        raise


def _increment(db: str, counter_model: Any, channel: str) -> int | None:
    """Add one to the channel's counter and return it, in one statement."""
    connection = connections[db]
    if connection.vendor not in ("postgresql", "sqlite"):
        counters = counter_model.objects.using(db).filter(name=channel)
        if not counters.update(value=F("value") + 1):
            return None
        return int(counters.values_list("value", flat=True).get())
    table = connection.ops.quote_name(counter_model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET value = value + 1 WHERE name = %s RETURNING value",
            [channel],
        )
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def _append_in_one_statement(
    db: str,
    counter_model: Any,
    event_model: Any,
    channel: str,
    event_type: str,
    head: str,
    tail: str,
) -> int | None:
    """Allocate the seq and store the event in one PostgreSQL statement: in
    autocommit that is one round trip instead of four (BEGIN, UPDATE, INSERT,
    COMMIT), and the counter's row lock still orders the ids by commit.
    None when the channel has no counter row yet."""
    connection = connections[db]
    quote = connection.ops.quote_name
    into, created = _event_insert_target(connection, event_model)
    counter = quote(counter_model._meta.db_table)
    sql = (
        f"WITH c AS (UPDATE {counter} SET value = value + 1 WHERE name = %s RETURNING value) "
        f"INSERT INTO {into} "
        "SELECT %s, %s, %s || c.value::text || %s, c.value, %s FROM c "
        f"RETURNING {quote(event_model._meta.get_field('eid').column)}"
    )
    params = [channel, channel, event_type, head, tail, created]
    # Inside someone's transaction, a savepoint keeps a failure from breaking it.
    block = transaction.atomic(using=db) if connection.in_atomic_block else nullcontext()
    with block, connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else int(row[0])


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
    meta = event_model._meta
    quote = connection.ops.quote_name
    names = ("channel", "type", "data", "eid", "created")
    columns = ", ".join(quote(meta.get_field(name).column) for name in names)
    created = meta.get_field("created").get_db_prep_value(timezone.now(), connection)
    return f"{quote(meta.db_table)} ({columns})", created


# Allocating the id, storing the event and publishing it to django-eventstream's
# cross-process pub/sub happen in one script, which Redis runs atomically: the
# publish order is the id order for every listener in every process.
_APPEND_SCRIPT = """
redis.call('SET', KEYS[2], ARGV[9], 'NX')
local id = redis.call('INCR', KEYS[1])
local data = ARGV[3]
if ARGV[7] == '1' then data = ARGV[3] .. id .. ARGV[4] end
redis.call('SET', ARGV[5] .. id, cjson.encode({type=ARGV[2], data=data}), 'EX', tonumber(ARGV[6]))
if ARGV[8] ~= '' then
  local message = {channel=ARGV[1], event_type=ARGV[2], data=data, pub_id=tostring(id)}
  redis.call('PUBLISH', ARGV[8], cjson.encode(message))
end
return id
"""

# django-eventstream's RedisListener subscribes to this pub/sub channel.
PUBSUB_CHANNEL = "events_channel"
EPOCH_KEY = "verity:epoch"


class RedisStorage(StorageBase):  # type: ignore[misc]
    """Events in Redis; also the cross-process publisher when
    ``EVENTSTREAM_REDIS`` points at the same server."""

    # django-eventstream makes a storage per thread, and ASGI serves each
    # request (each SSE connection) from a thread of its own: share one
    # thread-safe client per process instead of a connection pool per thread.
    _clients: dict[str, tuple[Any, Any]] = {}
    _clients_lock = threading.Lock()

    @property
    def client(self) -> Any:
        return self._client_and_script()[0]

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
                    client = redis.Redis(**deepcopy(details))
                    found = (client, client.register_script(_APPEND_SCRIPT))
                    RedisStorage._clients[key] = found
        return found

    @staticmethod
    def _counter_key(channel: str) -> str:
        return f"verity:counter:{channel}"

    @staticmethod
    def _event_prefix(channel: str) -> str:
        return f"verity:event:{channel}:"

    def _publishes(self) -> bool:
        return getattr(settings, "EVENTSTREAM_REDIS", None) is not None

    def append_event(self, channel: str, event_type: str, data: Any) -> Event:
        text = data if isinstance(data, str) else json.dumps(data)
        return self._append(channel, event_type, text, "", sequenced=False)

    def append_sequenced(self, channel: str, event_type: str, head: str, tail: str) -> Event:
        return self._append(channel, event_type, head, tail, sequenced=True)

    def _append(
        self, channel: str, event_type: str, head: str, tail: str, *, sequenced: bool
    ) -> Event:
        client, script = self._client_and_script()
        seq = int(
            script(
                keys=[self._counter_key(channel), EPOCH_KEY],
                args=[
                    channel,
                    event_type,
                    head,
                    tail,
                    self._event_prefix(channel),
                    conf.EVENT_RETENTION,
                    "1" if sequenced else "0",
                    PUBSUB_CHANNEL if self._publishes() else "",
                    uuid.uuid4().hex,
                ],
                client=client,
            )
        )
        data = f"{head}{seq}{tail}" if sequenced else head
        return Event(channel, event_type, data, id=seq)

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
        pipe.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
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
