"""Where each client's stream stood, so that a reconnect replays what it missed.

The Verity client reconnects with a brand-new EventSource to the same URL:
the same ``client_id``, no ``Last-Event-ID``. Without help the server can only
answer with a hello at the current seq; the client sees the gap and resyncs,
and its resync refetches collections at their default params only, so its
filtered lists stay stale. This module remembers, per (owner, client id,
audience), how far the client's stream had written, so the events view can
start a reconnect from there and send the missed envelopes instead.

A position is a short history of checkpoints ``(time, seq)``: by that time the
stream had written every envelope up to seq. A reconnect starts each audience
at the newest checkpoint at least ``REPLAY_MARGIN`` seconds old (what was
written just before a cut may never have arrived), announces that start in its
hello, and streams everything after it.

Why any start is safe: the client compares the hello's ``last_seq`` with its
own. Holding less, it sees a gap and resyncs, as it does without replay.
Holding as much or more, it resets its counter silently, receives every
envelope after the start in seq order, and skips the directives it already
applied by their idempotency keys. The margin only decides which case a
reconnect meets, never whether an envelope is lost.

Keys are ``clients.tag_for(request, client_id)`` plus the audience: another
user or session presenting the same client id has another tag, so it can
neither read nor move this position. The events view checks authorization
per audience before it asks for a position, on every connect.

Positions live with the storage in use: a Redis key with a TTL under
``RedisStorage``, a row of ``ReplayPosition`` under ``DatabaseStorage``. A
stream never waits on them: its checkpoints are saved by one writer thread per
process, at most once per ``REPLAY_MARGIN`` seconds per connection and
audience while envelopes flow, once per ``REPLAY_RETENTION / 4`` while it is
idle, and once when it ends.
"""

from __future__ import annotations

import datetime
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from django.http import HttpRequest

from verity_django.clients import tag_for
from verity_django.conf import conf
from verity_django.storage import bounded_transaction
from verity_django.thread_connections import ConnectionRelease

logger = logging.getLogger(__name__)

# A history keeps about two checkpoints per half margin, and one older than the
# margin; this bound only matters for a clock that jumps.
MAX_CHECKPOINTS = 8
_REDIS_PREFIX = "verity:position:"
_TRIM_EVERY = 60.0


@dataclass
class Counters:
    positions_saved: int = 0
    positions_superseded: int = 0
    positions_failed: int = 0
    replays: int = 0


counters = Counters()
_counters_lock = threading.Lock()


def _count(name: str) -> None:
    with _counters_lock:
        setattr(counters, name, getattr(counters, name) + 1)


def key_for(tag: str, audience: str) -> str:
    return f"{tag}:{audience}"


@dataclass
class History:
    """One connection's checkpoints for one audience, oldest first."""

    connection: str
    seen: float  # when the stream last wrote anything, keep-alives included
    checkpoints: list[tuple[float, int]]

    def add(self, now: float, seq: int, margin: float) -> bool:
        """Note that seq was written at ``now``; whether that changed anything."""
        self.seen = now
        if self.checkpoints and seq == self.checkpoints[-1][1]:
            return False
        if self.checkpoints and seq < self.checkpoints[-1][1]:
            # The storage counts again (Redis lost its data): older checkpoints
            # name seqs of another life.
            self.checkpoints = []
        points = self.checkpoints
        points.append((now, seq))
        while len(points) >= 3 and points[-1][0] - points[-3][0] < margin / 2:
            del points[-2]
        # Keep the newest checkpoint older than the margin: a reconnect starts there.
        while len(points) >= 2 and points[1][0] <= now - margin:
            del points[0]
        while len(points) > MAX_CHECKPOINTS:
            # Dropping the second keeps the oldest, which only replays more.
            del points[1]
        return True

    def start(self, now: float, margin: float) -> int:
        """The seq a client of this stream holds for sure, if it lost at most
        what was written in the last ``margin`` seconds."""
        chosen = self.checkpoints[0][1]
        for at, seq in self.checkpoints:
            if at > now - margin:
                break
            chosen = seq
        return chosen

    def encode(self) -> str:
        # Times round up: a checkpoint that claims to be later only replays more.
        points = " ".join(f"{math.ceil(at * 1000)}:{seq}" for at, seq in self.checkpoints)
        return f"{self.connection} {math.floor(self.seen * 1000)} {points}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> History | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            connection, seen, *points = text.split(" ")
            checkpoints = []
            for point in points:
                at, seq = point.split(":")
                checkpoints.append((int(at) / 1000, int(seq)))
            history = cls(connection, int(seen) / 1000, checkpoints)
        except ValueError:
            return None
        return history if checkpoints else None


# --------------------------------------------------------------------------
# The two hooks of the events view
# --------------------------------------------------------------------------


def remembered(
    request: HttpRequest,
    client_id: str | None,
    channels: Mapping[str, str],
    current: Mapping[str, int],
) -> dict[str, int]:
    """Per channel (``channels`` maps channel to audience), the seq this
    client's stream resumes from; channels without a position worth replaying
    from are left out, and start at the current seq as before."""
    tag = tag_for(request, client_id)
    retention = conf.REPLAY_RETENTION
    if tag is None or retention <= 0:
        return {}
    keys = {channel: key_for(tag, audience) for channel, audience in channels.items()}
    try:
        records = _store().load(list(keys.values()))
    except Exception:
        _count("positions_failed")
        logger.exception("verity_django: could not read replay positions; resyncing instead")
        return {}
    now = time.time()
    out: dict[str, int] = {}
    for channel, key in keys.items():
        history = History.decode(records.get(key))
        if history is None or history.seen < now - retention:
            continue
        start = history.start(now, conf.REPLAY_MARGIN)
        # Above the current seq, the storage counts again from 1 (Redis lost
        # its data): everything it holds now is new to this client.
        out[channel] = start if start <= current[channel] else 0
        _count("replays")
    return out


def track(request: HttpRequest, client_id: str | None, starts: Mapping[str, int]) -> Tracker | None:
    """Start remembering a new connection's position per audience (``starts``
    maps audience to the seq its hello announces). The new connection takes
    the positions over, so one the client left without a FIN (still writing
    into a dead socket) can no longer move them."""
    tag = tag_for(request, client_id)
    if tag is None or conf.REPLAY_RETENTION <= 0:
        return None
    return Tracker(tag, starts)


class Tracker:
    """One connection's positions, saved in the background."""

    def __init__(self, tag: str, starts: Mapping[str, int]) -> None:
        now = time.time()
        self.connection = secrets.token_hex(8)
        self.histories = {
            key_for(tag, audience): (audience, History(self.connection, now, [(now, seq)]))
            for audience, seq in starts.items()
        }
        self.dirty = set(self.histories)
        self._save(claim=True)
        # Connections opened together would otherwise save together, every
        # margin, in one burst that competes with the envelopes they stream.
        self.saved_at = now - random.random() * conf.REPLAY_MARGIN

    def wrote(self, delivered: Mapping[str, int]) -> None:
        """After each chunk written to the connection: ``delivered`` maps each
        audience to the last seq written."""
        now = time.time()
        margin = conf.REPLAY_MARGIN
        for key, (audience, history) in self.histories.items():
            seq = delivered.get(audience)
            if seq is not None and history.add(now, seq, margin):
                self.dirty.add(key)
        since = now - self.saved_at
        if self.dirty and since >= margin:
            self._save()
        elif since >= conf.REPLAY_RETENTION / 4:
            # Idle: keep the positions fresh (their TTL runs from the last save).
            self.dirty = set(self.histories)
            self._save()

    def close(self) -> None:
        now = time.time()
        for _, history in self.histories.values():
            history.seen = now
        self.dirty = set(self.histories)
        self._save()

    def _save(self, *, claim: bool = False) -> None:
        self.saved_at = time.time()
        ttl = conf.REPLAY_RETENTION
        for key in self.dirty:
            history = self.histories[key][1]
            writer.submit(key, history.encode(), self.connection, claim, ttl)
        self.dirty = set()


async def closing(stream: AsyncIterator[bytes], tracker: Tracker | None) -> AsyncIterator[bytes]:
    """``stream``, then a last save of the connection's positions when it ends."""
    try:
        async for chunk in stream:
            yield chunk
    finally:
        if tracker is not None:
            tracker.close()


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Save:
    key: str
    record: str
    connection: str
    claim: bool
    ttl: float


class Writer:
    """One thread per process saves positions, latest first per connection,
    so that a stream never waits on its storage."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], Save] = {}
        self._busy = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._release = ConnectionRelease(self._cond)

    def submit(self, key: str, record: str, connection: str, claim: bool, ttl: float) -> None:
        with self._cond:
            previous = self._pending.get((key, connection))
            # A newer checkpoint must not turn an unsaved claim into a plain save.
            claim = claim or (previous is not None and previous.claim)
            self._pending[(key, connection)] = Save(key, record, connection, claim, ttl)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="verity-positions", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted position is saved (for tests and shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._pending or self._busy), timeout)

    def release_connections(self, timeout: float) -> bool:
        """Have the thread, if running, close its database connections (it
        reopens them for its next save); True once it has."""
        return self._release.ask(self._thread, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._release.asked:
                    self._cond.wait()
                released = self._release.take()
                batch, self._pending = self._pending, {}
                self._busy = len(batch)
            ConnectionRelease.answer(released)
            if not batch:
                continue
            try:
                self._save_all(batch)
            finally:
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()

    def _save_all(self, batch: dict[tuple[str, str], Save]) -> None:
        store: _Store | None = None
        try:
            store = _store()
            # One round trip (Redis) or one statement and commit (database)
            # for the whole pass: saves arrive together, while envelopes fan out.
            saved = store.save_many(list(batch.values()))
        except Exception:
            _count("positions_failed")
            logger.exception("verity_django: could not save %d replay position(s)", len(batch))
            if store is not None:
                store.recover()
            return
        with _counters_lock:
            counters.positions_saved += saved
            counters.positions_superseded += len(batch) - saved


writer = Writer()


class _Store(Protocol):
    def load(self, keys: list[str]) -> dict[str, str]: ...

    def save_many(self, saves: list[Save]) -> int:
        """Store each record; without ``claim``, only over a record of the same
        connection (or an expired one, or none). How many were stored: the
        others belong to a newer connection."""
        ...

    def recover(self) -> None: ...


def _store() -> _Store:
    from verity_django.storage import RedisStorage, configured

    found = configured()
    if isinstance(found, RedisStorage):
        return _RedisPositions(found.client)
    return _DatabasePositions()


# Writes the record unless, without a claim, another connection owns it.
_SAVE_SCRIPT = """
if ARGV[3] == '0' then
  local current = redis.call('GET', KEYS[1])
  if current and string.sub(current, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. ' ' then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
return 1
"""
_scripts: dict[int, Any] = {}
_scripts_lock = threading.Lock()


class _RedisPositions:
    def __init__(self, client: Any) -> None:
        self.client = client

    def load(self, keys: list[str]) -> dict[str, str]:
        values = self.client.mget([_REDIS_PREFIX + k for k in keys])
        return {
            k: v.decode() if isinstance(v, bytes) else str(v)
            for k, v in zip(keys, values, strict=True)
            if v is not None
        }

    def save_many(self, saves: list[Save]) -> int:
        with _scripts_lock:
            script = _scripts.get(id(self.client))
            if script is None:
                script = _scripts[id(self.client)] = self.client.register_script(_SAVE_SCRIPT)
        pipe = self.client.pipeline(transaction=False)
        for save in saves:
            ttl_ms = max(1, int(save.ttl * 1000))
            args = [save.record, save.connection, "1" if save.claim else "0", ttl_ms]
            script(keys=[_REDIS_PREFIX + save.key], args=args, client=pipe)
        return sum(1 for stored in pipe.execute() if stored)

    def recover(self) -> None:
        pass  # redis-py reconnects by itself


class _DatabasePositions:
    _last_trim = 0.0

    def load(self, keys: list[str]) -> dict[str, str]:
        from verity_django.readers import on_reader

        return on_reader(_load_rows, keys)

    def save_many(self, saves: list[Save]) -> int:
        from django.db import connections, router
        from django.utils import timezone

        from verity_django.models import ReplayPosition

        db = router.db_for_write(ReplayPosition)
        connection = connections[db]
        meta = ReplayPosition._meta
        quote = connection.ops.quote_name
        table = quote(meta.db_table)
        key, record, expires = (quote(column) for column in ("key", "record", "expires"))
        # One upsert per position, conditional on who owns the row: SQLite
        # (3.24+) and PostgreSQL spell it the same way.
        sql = (
            f"INSERT INTO {table} ({key}, {record}, {expires}) VALUES (%s, %s, %s) "
            f"ON CONFLICT ({key}) DO UPDATE SET {record} = excluded.{record}, "
            f"{expires} = excluded.{expires} "
            f"WHERE %s OR {table}.{record} LIKE %s OR {table}.{expires} < %s"
        )
        now = timezone.now()
        field = meta.get_field("expires")
        prepared_now = field.get_db_prep_value(now, connection)
        rows = [
            (
                save.key,
                save.record,
                field.get_db_prep_value(now + datetime.timedelta(seconds=save.ttl), connection),
                save.claim,
                save.connection + " %",
                prepared_now,
            )
            for save in saves
        ]
        stored = 0
        with bounded_transaction(connection), connection.cursor() as cursor:
            for row in rows:
                cursor.execute(sql, row)
                stored += max(cursor.rowcount, 0)
        self._maybe_trim(now)
        return stored

    def _maybe_trim(self, now: datetime.datetime) -> None:
        from django.db import router

        from verity_django.models import ReplayPosition
        from verity_django.storage import trim

        clock = time.monotonic()
        if clock - _DatabasePositions._last_trim < _TRIM_EVERY:
            return
        _DatabasePositions._last_trim = clock
        db = router.db_for_write(ReplayPosition)
        trim(ReplayPosition.objects.using(db).filter(expires__lt=now), db, "replay positions")

    def recover(self) -> None:
        from django.db import connections

        # A failed query may leave this long-lived thread's connection unusable.
        connections.close_all()


def _load_rows(keys: list[str]) -> dict[str, str]:
    from django.utils import timezone

    from verity_django.models import ReplayPosition

    rows = ReplayPosition.objects.filter(key__in=keys, expires__gte=timezone.now())
    return dict(rows.values_list("key", "record"))
