"""Revocation, in process: ``revoke()``, logout and re-checks cut live streams.

A revocation recorded by *another* process is simulated by writing it to the
storage exactly as ``revoke()`` does there, without this process's shortcut
(which cuts its own streams at once). The live tests
(``tests/live/test_revocation.py``) do the same across two real servers
behind Redis.

- A stream carrying the revoked audience ends with a ``stream-error``
  (``forbidden``) and never receives another envelope; streams of other
  users, other audiences, or opened after the revocation go on.
- Logging out ends that session's streams only.
- With ``REAUTHORIZE_INTERVAL``, a stream whose requester may no longer
  read an audience (AUTHORIZE says no, the session is gone) ends without any
  call to ``revoke()``.
- A reconnect with ``Last-Event-ID: error`` (what an EventSource sends after
  django-eventstream's own ``stream-error``) starts afresh instead of a 400.
- ``revoke()`` inside a transaction takes effect when it commits, and not at
  all when it rolls back.
- The watcher's task never swallows a cancellation (``asyncio.wait_for`` on
  Python 3.11 does, when the awaited read finishes with it).
- For random interleavings of streams opening, revocations stored by
  another process and the watcher reading them, exactly the streams an
  oracle written here names are cut; a match that ignores the audience
  fails the same property.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.test import AsyncClient, Client, override_settings
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import verity_django
from verity_django import directives as d
from verity_django import revocation, subscriptions
from verity_django.publishing import publish_now
from verity_django.storage import configured as storage

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ALLOWED: dict[tuple[Any, str], bool] = {}


def authorize(user: Any, audience: str) -> bool:
    """team-* audiences as ALLOWED says, per user pk; the default otherwise."""
    if audience.startswith("team-"):
        return ALLOWED.get((user.pk, audience), False)
    from verity_django.audiences import default_authorize

    return default_authorize(user, audience)


@pytest.fixture(autouse=True)
def teams() -> Any:
    ALLOWED.clear()
    with override_settings(VERITY={"AUTHORIZE": f"{__name__}.authorize"}):
        yield ALLOWED
    ALLOWED.clear()


async def events(content: AsyncIterator[bytes], n: int, *, timeout: float = 10) -> list[Any]:
    """Up to n events: unnamed ones as their JSON, a stream-error as
    ``{"stream-error": ...}``; fewer if the stream ends first."""
    out: list[Any] = []
    buffer = ""
    async with asyncio.timeout(timeout):
        async for chunk in content:
            buffer += chunk.decode()
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                lines = block.split("\n")
                event = next((x[7:] for x in lines if x.startswith("event: ")), "message")
                data = "\n".join(x[6:] for x in lines if x.startswith("data: "))
                if event == "message" and data:
                    out.append(json.loads(data))
                elif event == "stream-error":
                    assert not any(x.startswith("id:") for x in lines), block
                    out.append({"stream-error": json.loads(data)})
                if len(out) >= n:
                    return out
    return out


async def rest_of(content: AsyncIterator[bytes]) -> list[Any]:
    """Everything until the stream ends (it must end by itself)."""
    return await events(content, 10_000)


async def logged_in(user: Any) -> AsyncClient:
    client = AsyncClient()
    await sync_to_async(client.force_login)(user)
    return client


async def open_stream(client: AsyncClient, query: str, **headers: str) -> AsyncIterator[bytes]:
    response = await client.get(f"/api/events?{query}", headers=headers)
    assert response.status_code == 200, response.content
    stream: AsyncIterator[bytes] = response.streaming_content  # type: ignore[assignment]
    return stream


def record_elsewhere(
    user: Any = None, audience: str | None = None, session: str | None = None
) -> None:
    """What revoke() stores in another process: no local shortcut here."""
    user_key = None if user is None else str(user.pk)
    tail = "," + d.dumps({"user": user_key, "audience": audience, "session": session})[1:]
    storage().append_sequenced(revocation.CHANNEL, revocation.EVENT_TYPE, '{"id":', tail)


async def publish(audience: str, name: str) -> None:
    await sync_to_async(publish_now)(audience, [d.refresh_collection(name)])


async def test_a_revocation_recorded_elsewhere_cuts_the_stream(alice: Any, bob: Any) -> None:
    ALLOWED[(alice.pk, "team-a")] = ALLOWED[(bob.pk, "team-a")] = True
    alice_stream = await open_stream(await logged_in(alice), "audience=team-a&audience=global")
    bob_stream = await open_stream(await logged_in(bob), "audience=team-a")
    assert len(await events(alice_stream, 2)) == 2
    assert len(await events(bob_stream, 1)) == 1

    ALLOWED[(alice.pk, "team-a")] = False
    await sync_to_async(record_elsewhere)(alice, "team-a")
    [cut] = await events(alice_stream, 1)
    assert cut["stream-error"]["condition"] == "forbidden"
    assert cut["stream-error"]["channels"] == ["verity.global", "verity.team-a"]
    await publish("team-a", "after-revocation")
    assert await rest_of(alice_stream) == []  # ended, and nothing after the cut
    # Bob may still read team-a: his stream goes on.
    [envelope] = await events(bob_stream, 1)
    assert envelope["directives"] == [{"op": "refresh_collection", "name": "after-revocation"}]
    await bob_stream.aclose()  # type: ignore[attr-defined]


async def test_revoke_cuts_only_matching_streams(alice: Any, bob: Any) -> None:
    ALLOWED[(alice.pk, "team-a")] = ALLOWED[(alice.pk, "team-b")] = True
    ALLOWED[(bob.pk, "team-a")] = True
    client = await logged_in(alice)
    on_a = await open_stream(client, "audience=team-a")
    on_b = await open_stream(client, "audience=team-b")
    bobs = await open_stream(await logged_in(bob), "audience=team-a")
    for stream in (on_a, on_b, bobs):
        await events(stream, 1)
    ALLOWED[(alice.pk, "team-a")] = False
    await sync_to_async(verity_django.revoke)(alice, "team-a")
    assert "stream-error" in (await events(on_a, 1))[0]
    await publish("team-b", "b")
    await publish("team-a", "a")
    assert (await events(on_b, 1))[0]["directives"][0]["name"] == "b"
    assert (await events(bobs, 1))[0]["directives"][0]["name"] == "a"
    # And revoke(user) with no audience ends all of that user's streams.
    await sync_to_async(verity_django.revoke)(alice.pk)
    assert "stream-error" in (await events(on_b, 1))[0]
    for stream in (on_a, on_b):
        assert await rest_of(stream) == []
    await bobs.aclose()  # type: ignore[attr-defined]


async def test_revoking_an_audience_for_everybody(alice: Any, bob: Any) -> None:
    ALLOWED[(alice.pk, "team-a")] = ALLOWED[(bob.pk, "team-a")] = True
    streams = [
        await open_stream(await logged_in(u), "audience=team-a&audience=global")
        for u in (alice, bob)
    ]
    global_only = await open_stream(await logged_in(bob), "audience=global")
    for stream in [*streams, global_only]:
        await events(stream, 1)
    await sync_to_async(record_elsewhere)(audience="team-a")
    for stream in streams:
        assert "stream-error" in (await events(stream, 10))[-1]
    await publish("global", "still-here")
    assert (await events(global_only, 1))[0]["seq"] == 1
    await global_only.aclose()  # type: ignore[attr-defined]


async def test_a_stream_opened_after_the_revocation_goes_on(alice: Any) -> None:
    ALLOWED[(alice.pk, "team-a")] = True
    client = await logged_in(alice)
    first = await open_stream(client, "audience=team-a")
    await events(first, 1)
    await sync_to_async(record_elsewhere)(alice, "team-a")
    assert "stream-error" in (await events(first, 1))[0]
    # Access given back, the client reconnects: the old revocation is not
    # applied to the new stream.
    second = await open_stream(client, "audience=team-a")
    await events(second, 1)
    await asyncio.sleep(4 * revocation.conf.POLL_INTERVAL)
    await publish("team-a", "welcome-back")
    assert (await events(second, 1))[0]["directives"][0]["name"] == "welcome-back"
    await second.aclose()  # type: ignore[attr-defined]


async def test_logout_ends_that_sessions_streams_only(alice: Any) -> None:
    this, other = AsyncClient(), AsyncClient()
    for client in (this, other):
        assert await sync_to_async(client.login)(username="alice", password="alice-password")
    audience = f"user-{alice.pk}"
    leaving = await open_stream(this, f"audience={audience}")
    staying = await open_stream(other, f"audience={audience}")
    await events(leaving, 1)
    await events(staying, 1)
    response = await this.post("/api/auth/logout/")
    assert response.status_code == 204
    assert "stream-error" in (await events(leaving, 1))[0]
    await publish(audience, "x")
    assert await rest_of(leaving) == []
    assert (await events(staying, 1))[0]["seq"] == 1
    await staying.aclose()  # type: ignore[attr-defined]


async def test_reauthorize_interval_ends_streams_that_lost_access(alice: Any, bob: Any) -> None:
    ALLOWED[(alice.pk, "team-a")] = ALLOWED[(bob.pk, "team-a")] = True
    with override_settings(
        VERITY={"AUTHORIZE": f"{__name__}.authorize", "REAUTHORIZE_INTERVAL": 1}
    ):
        alices = await open_stream(await logged_in(alice), "audience=team-a")
        session = AsyncClient()
        assert await sync_to_async(session.login)(username="bob", password="bob-password")
        bobs = await open_stream(session, "audience=team-a")
        kept = await open_stream(await logged_in(bob), "audience=global")
        for stream in (alices, bobs, kept):
            await events(stream, 1)
        ALLOWED[(alice.pk, "team-a")] = False  # no revoke(): only the re-check sees it
        # Bob's session ends elsewhere (another process, an admin): no signal here.
        key = session.session.session_key
        from django.contrib.sessions.models import Session

        await sync_to_async(Session.objects.filter(session_key=key).delete)()
        assert "stream-error" in (await events(alices, 1))[0]
        assert "stream-error" in (await events(bobs, 1))[0]
        await publish("global", "g")
        assert (await events(kept, 1))[0]["seq"] == 1
        await kept.aclose()  # type: ignore[attr-defined]


async def test_reconnect_after_a_stream_error_starts_afresh(alice: Any) -> None:
    await publish("global", "before")
    client = await logged_in(alice)
    stream = await open_stream(client, "audience=global", **{"Last-Event-ID": "error"})
    assert await events(stream, 1) == [{"type": "hello", "audience": "global", "last_seq": 1}]
    await stream.aclose()  # type: ignore[attr-defined]


async def _swallows_a_cancellation(
    within: Callable[[float, Awaitable[str]], Awaitable[str]],
) -> bool:
    """Whether a task awaiting ``within(timeout, read)`` goes on when it is
    cancelled just as the read finishes."""
    loop = asyncio.get_running_loop()
    read: asyncio.Future[str] = loop.create_future()
    task = loop.create_task(within(5, read))
    await asyncio.sleep(0)  # the task now waits for the read
    read.set_result("rows")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


async def test_the_watcher_never_swallows_a_cancellation() -> None:
    # Its reads finish in a thread at any moment. One that finished as the
    # test's loop shut down kept the watcher polling, and the shutdown waited
    # for it forever (CI hung in this module).
    assert not await _swallows_a_cancellation(subscriptions.within)


def test_the_package_never_bounds_a_wait_with_wait_for() -> None:
    from pathlib import Path

    package = Path(verity_django.__file__).parent
    assert [p.name for p in package.glob("*.py") if "asyncio.wait_for(" in p.read_text()] == []


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="3.12 rebuilt wait_for on asyncio.timeout")
async def test_the_cancellation_check_catches_wait_for_on_python_3_11() -> None:
    assert await _swallows_a_cancellation(lambda timeout, read: asyncio.wait_for(read, timeout))


def test_revoke_inside_a_transaction_waits_for_the_commit(alice: Any) -> None:
    def recorded() -> int:
        return storage().get_current_ids([revocation.CHANNEL])[revocation.CHANNEL]

    with transaction.atomic():
        verity_django.revoke(alice, "team-a")
        assert recorded() == 0
    assert recorded() == 1
    with pytest.raises(RuntimeError), transaction.atomic():
        verity_django.revoke(alice, "team-a")
        raise RuntimeError("rolled back")
    assert recorded() == 1


def test_revoke_needs_a_user_or_an_audience(alice: Any) -> None:
    from django.contrib.auth.models import AnonymousUser

    from verity_django.audiences import InvalidAudience

    with pytest.raises(ValueError, match="a user, an audience"):
        verity_django.revoke()
    with pytest.raises(ValueError, match="saved user"):
        verity_django.revoke(AnonymousUser())
    with pytest.raises(InvalidAudience):
        verity_django.revoke(alice, "team a")


# --------------------------------------------------------------------------
# Which streams a revocation cuts, generated, against an oracle written here
# --------------------------------------------------------------------------
#
# Operations in a random order: streams are noted (their mark taken), begin
# (registered with the watcher, possibly after revocations were stored
# meanwhile), revocations are stored by "another process", and the watcher
# reads the storage. A stream must be cut exactly when a revocation stored
# after its mark names its user (or everybody), one of its audiences (or
# all), and its session (or any).

USERS_ = st.sampled_from(["1", "2"])
AUDIENCES_ = st.sampled_from(["global", "team-a", "team-b"])
SESSIONS_ = st.sampled_from(["s1", "s2", "s3"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("note"), USERS_, SESSIONS_, st.frozensets(AUDIENCES_, min_size=1)),
        st.tuples(st.just("begin")),
        st.tuples(st.just("read")),
        st.tuples(
            st.just("revoke"),
            st.none() | USERS_,
            st.none() | AUDIENCES_,
            st.none() | SESSIONS_,
        ),
    ),
    max_size=25,
)


def oracle_cuts(
    stream: tuple[str, str, frozenset[str], int], revocations: list[tuple[Any, ...]]
) -> bool:
    user, session, audiences, mark = stream
    return any(
        rid > mark
        and (r_user in (None, user))
        and (r_audience is None or r_audience in audiences)
        and (r_session in (None, session))
        for rid, r_user, r_audience, r_session in revocations
    )


class Stored:
    """The storage's revocation channel, as another process fills it."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def add(self, user: Any, audience: Any, session: Any) -> None:
        from django_eventstream.event import Event

        data = {"user": user, "audience": audience, "session": session}
        self.events.append(
            Event(revocation.CHANNEL, "revoke", json.dumps(data), id=len(self.events) + 1)
        )

    def after(self, position: int) -> tuple[list[Any], int | None]:
        return self.events[position : position + 100], None


async def play(ops: list[tuple[Any, ...]]) -> None:
    loop = asyncio.get_running_loop()
    watcher = revocation.Watcher(loop)
    stored = Stored()
    noted: list[tuple[revocation.Stream, tuple[str, str, frozenset[str], int]]] = []
    waiting: list[revocation.Stream] = []
    with mock.patch.object(revocation, "_revocations_after", stored.after):
        for op in [*ops, ("begin-all",), ("read",)]:
            if op[0] == "note":
                _, user, session, audiences = op
                known = watcher.known_position()
                mark = len(stored.events) if known is None else known
                stream = revocation.Stream(user, session, audiences, mark)
                stream.loop = loop
                noted.append((stream, (user, session, audiences, mark)))
                waiting.append(stream)
            elif op[0] == "begin" and waiting:
                watcher.register(waiting.pop(0))
            elif op[0] == "begin-all":
                for stream in waiting:
                    watcher.register(stream)
            elif op[0] == "read":
                await watcher._catch_up()
            elif op[0] == "revoke":
                stored.add(*op[1:])
    revocations = [(e.id, *json.loads(e.data).values()) for e in stored.events]
    for stream, facts in noted:
        assert bool(stream.reason) == oracle_cuts(facts, revocations), (facts, revocations)


async def _reads_only_when_told(self: Any) -> None:
    """The watcher's task, minus its own reading: the test says when it reads."""
    await asyncio.Event().wait()


def _cuts_agree(ops: list[tuple[Any, ...]]) -> None:
    with mock.patch.object(revocation.Watcher, "_run", _reads_only_when_told):
        asyncio.run(play(ops))


@settings(max_examples=400, deadline=None)
@given(ops=operations)
def test_revocations_cut_exactly_the_streams_they_name(ops: list[tuple[Any, ...]]) -> None:
    _cuts_agree(ops)


def test_the_revocation_oracle_catches_a_match_that_ignores_the_audience() -> None:
    def too_wide(self: revocation.Revocation, stream: revocation.Stream) -> bool:
        return self.user is None or self.user == stream.user

    # The same search as the property's; finding a wrong cut is enough, so it
    # is not shrunk.
    @settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate])
    @given(ops=operations)
    def search(ops: list[tuple[Any, ...]]) -> None:
        _cuts_agree(ops)

    with (
        mock.patch.object(revocation.Revocation, "matches", too_wide),
        pytest.raises(AssertionError),
    ):
        search()


def test_revocations_gone_from_storage_cut_every_stream() -> None:
    """Trimmed, or a storage that started over: what was revoked meanwhile is
    unknown, so every stream of the process ends and reconnects."""

    async def play_gone() -> list[str]:
        loop = asyncio.get_running_loop()
        watcher = revocation.Watcher(loop)
        streams = [revocation.Stream(u, None, frozenset({"global"}), 3) for u in ("1", "2")]
        for stream in streams:
            stream.loop = loop
            watcher.register(stream)
        with mock.patch.object(revocation, "_revocations_after", return_value=([], 9)):
            await watcher._catch_up()
        assert watcher.known_position() == 9
        return [s.reason for s in streams]

    with mock.patch.object(revocation.Watcher, "_run", _reads_only_when_told):
        reasons = asyncio.run(play_gone())
    assert all(reasons), reasons


# --------------------------------------------------------------------------
# Streams a GRIP proxy holds (the live test runs a real Pushpin)
# --------------------------------------------------------------------------


@pytest.fixture
def grip_publishes(settings: Any) -> Any:
    """Every GRIP publish revocation makes: (channel, what it sends, meta)."""
    settings.GRIP_URL = "http://127.0.0.1:9"
    sent: list[tuple[str, Any, dict[str, str]]] = []

    def publish(channel: str, formats: Any, meta: dict[str, str]) -> None:
        exported = formats.export()
        sent.append((channel, exported.get("content") or exported.get("action"), meta))

    with mock.patch("verity_django.publishing.publish_to_grip", side_effect=publish) as patched:
        patched.sent = sent
        yield patched


def _cut(channel: str, meta: dict[str, str]) -> list[tuple[str, Any, dict[str, str]]]:
    return [(channel, mock.ANY, meta), (channel, "close", meta)]


def test_revoke_cuts_the_held_streams_it_names(grip_publishes: Any, alice: Any) -> None:
    grip = revocation.grip_channel
    verity_django.revoke(alice)
    verity_django.revoke(alice, "team-ops")
    verity_django.revoke(audience="global")
    assert grip_publishes.sent == [
        *_cut(grip(f"user:{alice.pk}"), {}),
        *_cut(grip(f"user:{alice.pk}"), {"require_sub": "events-verity.team-ops"}),
        *_cut(grip("every-stream"), {"require_sub": "events-verity.global"}),
    ]
    event = grip_publishes.sent[2][1]
    assert event.startswith("event: stream-error\ndata: ") and "\nid:" not in event
    assert json.loads(event.split("data: ", 1)[1]) == {
        "condition": "forbidden",
        "text": "Access to this stream was revoked.",
        "channels": ["verity.team-ops"],
    }
    # No control channel is an audience's: django-eventstream's are events-*.
    assert all(c.startswith("verity-cut.") for c, _, _ in grip_publishes.sent)
    assert revocation.counters.grip_cuts_sent >= 3


def test_logout_cuts_that_sessions_held_streams(grip_publishes: Any, alice: Any) -> None:
    client = Client()
    assert client.login(username="alice", password="alice-password")
    tag = revocation.session_tag(client.session.session_key)
    assert client.post("/api/auth/logout/").status_code == 204
    assert grip_publishes.sent == _cut(revocation.grip_channel(f"session:{tag}"), {})


def test_a_proxy_that_cannot_be_told_is_counted_logged_and_raised(
    grip_publishes: Any, alice: Any, caplog: Any
) -> None:
    grip_publishes.side_effect = ConnectionError("pushpin is down")
    failed = revocation.counters.grip_cuts_failed
    with pytest.raises(ConnectionError):
        verity_django.revoke(alice)
    assert revocation.counters.grip_cuts_failed == failed + 1
    assert "the streams it holds go on" in caplog.text
    # Recorded all the same: the other processes' streams are cut.
    assert storage().get_current_ids([revocation.CHANNEL])[revocation.CHANNEL] >= 1
    # A logout never fails for it.
    client = Client()
    assert client.login(username="alice", password="alice-password")
    assert client.post("/api/auth/logout/").status_code == 204
    assert revocation.counters.grip_cuts_failed == failed + 2


def test_waking_other_processes_gives_up_on_a_redis_that_never_answers(caplog: Any) -> None:
    """``revoke()`` and every logout wake the other processes through Redis;
    one that accepts and never answers must cost one ``REDIS_TIMEOUT``, not
    redis-py's default retries (about a minute)."""
    import threading

    from django.test import override_settings

    from tests.black_hole import BlackHole

    hole = BlackHole()
    try:
        with override_settings(
            EVENTSTREAM_REDIS={"host": "127.0.0.1", "port": hole.port},
            VERITY={"REDIS_TIMEOUT": 0.2},
        ):
            waker = threading.Thread(target=revocation._wake_other_processes, daemon=True)
            waker.start()
            # Far more than one try (0.2 s), far less than the retries took.
            waker.join(10)
            assert not waker.is_alive(), "still waiting for the Redis that never answers"
    finally:
        hole.close()
    assert "could not wake other processes for a revocation" in caplog.text
