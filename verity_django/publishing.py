"""Envelopes, their seq, and handing them to django-eventstream.

One committed batch becomes one envelope per audience::

    {"type":"directives","seq":N,"audience":A,"source":S,"directives":[...]}

The seq is the event id the storage allocates for the audience's channel
(see ``storage.py``), so it is contiguous per audience across processes and
survives restarts with persistent storage. A failure to publish is logged
and counted; it never reaches the request that caused it.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django_eventstream.event import Event

from verity_django import directives as d
from verity_django.audiences import channel_for
from verity_django.conf import conf
from verity_django.signals import directives_committed, envelope_published

if TYPE_CHECKING:
    from verity_django.batching import Batch
    from verity_django.storage import SequencedStorage

logger = logging.getLogger(__name__)

EVENT_TYPE = "message"
_ENVELOPE_HEAD = '{"type":"directives","seq":'


@dataclass
class Counters:
    envelopes_published: int = 0
    envelopes_failed: int = 0
    envelopes_dropped: int = 0
    batches_delivered: int = 0


counters = Counters()
_counters_lock = threading.Lock()


def _count(name: str) -> None:
    with _counters_lock:
        setattr(counters, name, getattr(counters, name) + 1)


def deliver(batch: Batch) -> None:
    """Called once per committed batch: notify, then push."""
    _count("batches_delivered")
    directives_committed.send(sender=type(batch), batch=batch)
    if conf.PUSH:
        for audience, items in batch.by_audience().items():
            publish(audience, items, source=batch.source)


@dataclass(frozen=True)
class Published:
    audience: str
    seq: int
    data: str


# Envelopes whose publishing failed, retried in order before this process
# publishes anything else, so that a storage outage delays them instead of
# losing them. Bounded: past it the oldest are dropped (and counted).
_RETRY_LIMIT = 10_000
_retry: collections.deque[tuple[str, Sequence[d.Directive], str | None]] = collections.deque()
_retry_lock = threading.Lock()


def publish(
    audience: str, items: Sequence[d.Directive], *, source: str | None = None
) -> Published | None:
    """Store and send one envelope; never raises for a transport failure."""
    with _retry_lock:
        if not _drain_retries():
            _count("envelopes_failed")
            logger.error(
                "verity_django: could not publish %d directive(s) to audience %r "
                "(source %r): %d earlier envelope(s) still wait; will retry",
                len(items),
                audience,
                source,
                len(_retry),
            )
            _queue_for_retry(audience, items, source)
            return None
        published = _attempt(audience, items, source)
        if published is None:
            _queue_for_retry(audience, items, source)
        return published


def _queue_for_retry(audience: str, items: Sequence[d.Directive], source: str | None) -> None:
    if len(_retry) >= _RETRY_LIMIT:
        _retry.popleft()
        _count("envelopes_dropped")
    _retry.append((audience, items, source))


def retry_failed() -> None:
    """Publish what earlier failures left waiting (the tailer calls this)."""
    if _retry:
        with _retry_lock:
            _drain_retries()


def _drain_retries() -> bool:
    """Publish waiting envelopes in order; False if one still fails."""
    while _retry:
        if _attempt(*_retry[0]) is None:
            return False
        _retry.popleft()
    return True


def _attempt(audience: str, items: Sequence[d.Directive], source: str | None) -> Published | None:
    try:
        return publish_or_raise(audience, items, source=source)
    except Exception:
        _count("envelopes_failed")
        logger.exception(
            "verity_django: could not publish %d directive(s) to audience %r (source %r); "
            "will retry",
            len(items),
            audience,
            source,
        )
        return None


def publish_or_raise(
    audience: str, items: Sequence[d.Directive], *, source: str | None = None
) -> Published:
    channel = channel_for(audience)
    if any(x.op == "force_reload_page" for x in items):
        # The originator must reload too, and clients drop envelopes that
        # carry their own id as source.
        source = None
    head, tail = envelope_parts(audience, items, source)
    event = storage().append_sequenced(channel, EVENT_TYPE, head, tail)
    _hand_to_transports(channel, event)
    _count("envelopes_published")
    published = Published(audience, int(event.id), event.data)
    envelope_published.send(
        sender=Published, audience=audience, seq=published.seq, envelope=published.data
    )
    return published


def envelope_parts(
    audience: str, items: Sequence[d.Directive], source: str | None
) -> tuple[str, str]:
    """The envelope's JSON split around its seq, so the storage can insert it."""
    tail = ',"audience":' + d.dumps(audience)
    if source is not None:
        tail += ',"source":' + d.dumps(source)
    tail += ',"directives":' + d.dumps([x.to_dict() for x in items]) + "}"
    return _ENVELOPE_HEAD, tail


def storage() -> SequencedStorage:
    from django_eventstream.utils import get_storage

    found = get_storage()
    if found is None or not hasattr(found, "append_sequenced"):
        from django.core.exceptions import ImproperlyConfigured

        raise ImproperlyConfigured(
            "EVENTSTREAM_STORAGE_CLASS must be verity_django.storage.DatabaseStorage or "
            "verity_django.storage.RedisStorage (see check verity_django.E001)."
        )
    return cast("SequencedStorage", found)


def grip_configured() -> bool:
    return bool(getattr(settings, "GRIP_URL", None) or getattr(settings, "GRIP_PROXIES", None))


def _hand_to_transports(channel: str, event: Event) -> None:
    store: Any = storage()
    if not getattr(store, "publishes_to_listeners", False):
        from verity_django.delivery import offer

        offer(channel, event)
    if grip_configured():
        from django_eventstream.utils import publish_event

        publish_event(
            channel,
            EVENT_TYPE,
            event.data,
            str(event.id),
            str(int(event.id) - 1),
            blocking=True,
        )
