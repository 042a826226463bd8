"""The events endpoint's checks before the stream starts, and its rewriting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from django.test import Client

from verity_django import directives as d
from verity_django import envelopes
from verity_django.views import _Subscriber

MINE = "a" * envelopes.TAG_LENGTH
OTHER = "b" * envelopes.TAG_LENGTH


@pytest.fixture
def client(alice: Any) -> Client:
    c = Client()
    c.force_login(alice)
    return c


@pytest.mark.parametrize(
    "query",
    [
        "audience=user%201",
        "audience=" + "a" * 101,
        "audience=",
        "audience=global%0aevil",
        "audience=user-1,user-2",
        "audience=%C3%BCser-1",
        "client_id=" + "x" * 201,
        "client_id=bad%20id",
        "client_id=%0a",
    ],
)
def test_bad_query_is_a_clear_400(client: Client, query: str) -> None:
    response = client.get(f"/api/events?{query}")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["detail"]


def test_too_many_audiences(client: Client) -> None:
    query = "&".join(f"audience=team-{i}" for i in range(11))
    response = client.get(f"/api/events?{query}")
    assert response.status_code == 400


@pytest.mark.parametrize("audience", ["user-999", "team-a", "USER-1", "user-01", "user-1x"])
def test_foreign_audience_is_403_before_any_byte(client: Client, alice: Any, audience: str) -> None:
    audience = audience.replace("user-1", f"user-{alice.pk}") if audience == "user-1x" else audience
    response = client.get(f"/api/events?audience=global&audience={audience}")
    assert response.status_code == 403
    assert response.json() == {
        "detail": "You may not read these audiences.",
        "audiences": [audience],
    }


def test_anonymous_gets_403_for_user_audiences(db: Any) -> None:
    response = Client().get("/api/events?audience=user-1")
    assert response.status_code == 403


@pytest.mark.parametrize("value", ["garbage", "verity.global:abc", "x" * 5000])
def test_malformed_last_event_id_is_400(client: Client, value: str) -> None:
    response = client.get("/api/events?audience=global", HTTP_LAST_EVENT_ID=value)
    assert response.status_code == 400


def test_post_is_not_allowed(client: Client) -> None:
    assert client.post("/api/events").status_code == 405


def test_a_stream_whose_storage_fails_is_a_503_to_retry(
    client: Client, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from django.db import connection

    # A real failure of the database: within the test's transaction, which
    # the storage read runs in, the counter table is gone.
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE django_eventstream_eventcounter RENAME TO counter_gone")
    response = client.get("/api/events?audience=global")
    assert response.status_code == 503
    assert response["Retry-After"] == "2"
    assert response.json() == {"detail": "The event storage is not answering; try again shortly."}
    assert "a stream could not open: its storage read failed" in caplog.text


def test_a_stream_whose_redis_storage_never_answers_is_a_503_within_its_timeout(
    client: Client, db: Any
) -> None:
    from django.test import override_settings

    from tests.black_hole import BlackHole

    hole = BlackHole()
    try:
        with override_settings(
            EVENTSTREAM_STORAGE_CLASS="verity_django.storage.RedisStorage",
            EVENTSTREAM_STORAGE_CONNECTION={"host": "127.0.0.1", "port": hole.port},
            VERITY={"REDIS_TIMEOUT": 0.2},
        ):
            response = client.get("/api/events?audience=global")
    finally:
        hole.close()
    assert response.status_code == 503
    assert response["Retry-After"] == "2"


def envelope(seq: int, origin: str | None = None, audience: str = "global") -> str:
    head, tail = envelopes.parts(audience, [d.refresh_collection("todos")], origin)
    return f"event: message\nid: verity.{audience}:{seq}\ndata: {head}{seq}{tail}\n\n"


def test_rewrite_drops_envelopes_already_delivered() -> None:
    subscriber = _Subscriber({"global": 2}, None)
    out = asyncio.run(subscriber.rewrite(envelope(2) + envelope(3) + envelope(3) + envelope(4)))
    seqs = [json.loads(line[6:])["seq"] for line in out.splitlines() if line.startswith("data: ")]
    assert seqs == [3, 4]


def test_rewrite_turns_own_envelope_into_an_empty_one_with_the_same_seq() -> None:
    subscriber = _Subscriber({"global": 0}, MINE)
    out = asyncio.run(subscriber.rewrite(envelope(1, MINE) + envelope(2, OTHER) + envelope(3)))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]
    assert datas[0] == {"type": "directives", "seq": 1, "audience": "global", "directives": []}
    # Nobody is ever shown an origin tag, nor a source.
    todos = [{"op": "refresh_collection", "name": "todos"}]
    assert datas[1:] == [
        {"type": "directives", "seq": 2, "audience": "global", "directives": todos},
        {"type": "directives", "seq": 3, "audience": "global", "directives": todos},
    ]
    assert "id: verity.global:1" in out


def test_a_connection_without_an_owner_tag_blanks_nothing() -> None:
    subscriber = _Subscriber({"global": 0}, None)
    out = asyncio.run(subscriber.rewrite(envelope(1, MINE)))
    [data] = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]
    assert data["directives"] and "origin" not in data


def test_pushed_envelopes_and_directives_carry_no_source() -> None:
    stamped = d.refresh_item("todo", 1, source="client-a", idempotency_key="k")
    nested = d.invalidate([d.refresh_collection("todos", source="client-a")])
    head, tail = envelopes.parts("global", [stamped, nested], MINE)
    data = json.loads(envelopes.public(head + "7" + tail))
    assert data == {
        "type": "directives",
        "seq": 7,
        "audience": "global",
        "directives": [
            {"op": "refresh_item", "name": "todo", "id": 1, "idempotency_key": "k"},
            {"op": "invalidate", "targets": [{"op": "refresh_collection", "name": "todos"}]},
        ],
    }
    assert envelopes.origin_of(head + "7" + tail) == MINE


def test_an_envelope_that_cannot_be_encoded_is_refused_with_its_audience() -> None:
    poison = d.Directive.trusted(op="refresh_collection", name="todos", params={"x": float("nan")})
    with pytest.raises(envelopes.Unencodable, match="audience 'global'"):
        envelopes.parts("global", [poison], None)


def test_rewrite_keeps_keep_alives_and_other_events() -> None:
    subscriber = _Subscriber({"global": 0}, MINE)
    text = "event: keep-alive\ndata:\n\n"
    assert asyncio.run(subscriber.rewrite(text)) == text


def test_rewrite_fills_a_gap_from_storage() -> None:
    fetched: list[tuple[str, int, int]] = []

    async def fetch(audience: str, after: int, before: int) -> list[str]:
        fetched.append((audience, after, before))
        return [envelope(seq).split("data: ", 1)[1].strip() for seq in range(after + 1, before)]

    subscriber = _Subscriber({"global": 1}, None, fetch)
    out = asyncio.run(subscriber.rewrite(envelope(2) + envelope(5)))
    seqs = [json.loads(line[6:])["seq"] for line in out.splitlines() if line.startswith("data: ")]
    assert seqs == [2, 3, 4, 5]
    assert fetched == [("global", 2, 5)]


def test_rewrite_turns_a_restarted_counter_into_a_hello_reset() -> None:
    subscriber = _Subscriber({"global": 0}, None)
    asyncio.run(subscriber.rewrite(envelope(1) + envelope(2) + envelope(3)))
    restarted = envelope(2, OTHER)
    out = asyncio.run(subscriber.rewrite(restarted + envelope(3, OTHER)))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]
    assert datas[0] == {"type": "hello", "audience": "global", "last_seq": 0}
    assert [x["seq"] for x in datas[1:]] == [2, 3]


def test_rewrite_counts_again_from_zero_once_the_storage_lost_its_data() -> None:
    epoch = "before"
    fetched: list[tuple[str, int, int]] = []

    async def fetch(audience: str, after: int, before: int) -> list[str]:
        fetched.append((audience, after, before))
        return [envelope(seq).split("data: ", 1)[1].strip() for seq in range(after + 1, before)]

    async def current_epoch() -> str:
        return epoch

    subscriber = _Subscriber(
        {"global": 0, "user-1": 7}, None, fetch, epoch="before", current_epoch=current_epoch
    )
    asyncio.run(subscriber.rewrite("".join(envelope(seq) for seq in range(1, 41))))
    # An old seq handed over again, storage unchanged: dropped.
    assert asyncio.run(subscriber.rewrite(envelope(3))) == ""
    epoch = "after"
    # Redis came back empty; seq 1 and 2 of the new count went out before
    # this stream subscribed again.
    out = asyncio.run(subscriber.rewrite(envelope(3) + envelope(4)))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]
    assert datas[:2] == [
        {"type": "hello", "audience": "global", "last_seq": 0},
        {"type": "hello", "audience": "user-1", "last_seq": 0},
    ]
    assert [x["seq"] for x in datas[2:]] == [1, 2, 3, 4]
    assert fetched[-1] == ("global", 0, 3)
    assert subscriber.delivered == {"global": 4, "user-1": 0}


def test_rewrite_turns_a_stream_reset_into_hellos_that_force_a_resync() -> None:
    subscriber = _Subscriber({"global": 20, "user-1": 3}, None)
    reset = (
        "event: stream-reset\nid: verity.global:10,verity.user-1:3\n"
        'data: {"channels": ["verity.global"]}\n\n'
    )
    out = asyncio.run(subscriber.rewrite(reset))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith('data: {"type')]
    assert {"type": "hello", "audience": "global", "last_seq": 0} in datas
    assert {"type": "hello", "audience": "global", "last_seq": 10} in datas
    assert subscriber.delivered["global"] == 10


def test_a_stream_reset_sends_hellos_only_for_the_channels_it_reset() -> None:
    subscriber = _Subscriber({"global": 4, "user-1": 3}, None)
    reset = (
        "event: stream-reset\nid: verity.global:4,verity.user-1:9\n"
        'data: {"channels": ["verity.user-1"]}\n\n'
    )
    out = asyncio.run(subscriber.rewrite(reset))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith('data: {"type')]
    assert datas == [
        {"type": "hello", "audience": "user-1", "last_seq": 0},
        {"type": "hello", "audience": "user-1", "last_seq": 9},
    ]
    assert subscriber.delivered == {"global": 4, "user-1": 9}


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("recover=true", {}),
        ("es-meta=garbage", {}),
        ("link=next&es-meta=garbage", {}),
        ("channel=verity.user-999", {}),
        ("channels=verity.user-999", {}),
        (
            "recover=true",
            {"HTTP_GRIP_SIG": "x", "HTTP_GRIP_LAST": "events-verity.global; last-id=zz"},
        ),
    ],
)
def test_transport_parameters_never_reach_django_eventstream(
    client: Client, query: str, headers: dict[str, str]
) -> None:
    response = client.get(f"/api/events?audience=global&{query}", **headers)
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"


# --------------------------------------------------------------------------
# Behind a GRIP proxy with a key: whose request is the proxy's own
# --------------------------------------------------------------------------

GRIP_KEY = "pushpin-test-key-" + "k" * 32


@pytest.fixture
def grip(settings: Any) -> Any:
    settings.GRIP_URL = f"http://127.0.0.1:9?key={GRIP_KEY}"
    settings.MIDDLEWARE = ["django_grip.GripMiddleware", *settings.MIDDLEWARE]
    return settings


def _signed(key: str = GRIP_KEY) -> str:
    import time

    import jwt

    return jwt.encode({"iss": "pushpin", "exp": int(time.time()) + 60}, key)


def _es_meta(user: str, channels: list[str], *, expires_in: int = 3600) -> str:
    import time

    import jwt
    from django.conf import settings

    claims = {"iss": "es", "exp": int(time.time()) + expires_in, "channels": channels}
    return jwt.encode({**claims, "user": user}, settings.SECRET_KEY.encode())


def _recovery(
    user: Any, *, last: bool = True, sig: str | None = None, token: str | None = None
) -> Any:
    """What Pushpin sends to recover a held stream of ``user``'s own audience."""
    audience = f"user-{user.pk}"
    token = token if token is not None else _es_meta(str(user.pk), [f"verity.{audience}"])
    headers = {"HTTP_GRIP_SIG": sig if sig is not None else _signed()}
    if last:
        headers["HTTP_GRIP_LAST"] = f"events-verity.{audience}; last-id=0"
    query = f"audience={audience}&link=next&recover=true&es-meta={token}"
    return Client().get(f"/api/events?{query}", **headers)


def _grip_channels(response: Any) -> list[str]:
    return [c.split(";")[0].strip() for c in response.get("Grip-Channel", "").split(",") if c]


def test_the_proxys_own_recovery_streams_as_the_user_its_token_names(grip: Any, alice: Any) -> None:
    from verity_django.revocation import grip_channel

    response = _recovery(alice)
    assert response.status_code == 200
    assert response["Grip-Hold"] == "stream"
    channels = _grip_channels(response)
    assert f"events-verity.user-{alice.pk}" in channels
    assert grip_channel(f"user:{alice.pk}") in channels
    assert grip_channel("every-stream") in channels


@pytest.mark.parametrize(
    "hop",
    [
        {"last": False},  # a client replaying a logged token: Pushpin drops its Grip-Last
        {"sig": "not-a-signature"},
        {"sig": "wrong-key"},
        {"token": "garbage"},
        {"token": "expired"},
    ],
    ids=["replayed-by-a-client", "unsigned", "signed-with-another-key", "garbage", "expired"],
)
def test_no_other_request_streams_as_the_user_of_an_es_meta_token(
    grip: Any, alice: Any, hop: dict[str, Any]
) -> None:
    if hop.get("sig") == "wrong-key":
        hop = {"sig": _signed("another-key-" + "x" * 32)}
    if hop.get("token") == "expired":
        hop = {"token": _es_meta(str(alice.pk), [f"verity.user-{alice.pk}"], expires_in=-10)}
    response = _recovery(alice, **hop)
    assert "Grip-Hold" not in response
    body = b"".join(response) if response.streaming else response.content
    assert b'"type"' not in body  # no hello, no envelope
    assert response.status_code in (200, 403)
    if response.status_code == 200:
        assert body.decode().startswith("event: stream-error\n")


def test_a_recovery_for_a_user_no_longer_allowed_is_a_cut_without_a_hold(
    grip: Any, alice: Any
) -> None:
    alice.is_active = False
    alice.save()
    response = _recovery(alice)
    assert response.status_code == 200
    assert "Grip-Hold" not in response and "Grip-Link" not in response
    event = response.content.decode()
    assert event.startswith("event: stream-error\n")
    assert json.loads(event.split("data: ", 1)[1])["condition"] == "forbidden"


def test_a_held_stream_carries_its_session_into_the_proxys_next_links(
    grip: Any, client: Client, alice: Any
) -> None:
    from verity_django.revocation import grip_channel, session_tag

    response = client.get(f"/api/events?audience=user-{alice.pk}", HTTP_GRIP_SIG=_signed())
    assert response["Grip-Hold"] == "stream"
    tag = session_tag(client.session.session_key)
    assert f"verity-session={tag}" in response["Grip-Link"]
    assert grip_channel(f"session:{tag}") in _grip_channels(response)
    # A client naming a session tag of its own gets its real one instead.
    forged = client.get(
        f"/api/events?audience=user-{alice.pk}&verity-session={'0' * 32}", HTTP_GRIP_SIG=_signed()
    )
    assert f"verity-session={tag}" in forged["Grip-Link"]


def test_grip_without_a_key_is_a_warning(settings: Any) -> None:
    from verity_django.checks import check_settings

    settings.GRIP_URL = "http://127.0.0.1:5561"
    assert "verity_django.W023" in {m.id for m in check_settings()}
    settings.GRIP_URL = f"http://127.0.0.1:5561?key={GRIP_KEY}"
    assert "verity_django.W023" not in {m.id for m in check_settings()}


def test_behind_the_proxy_a_remembered_start_replays_at_most_one_page() -> None:
    from verity_django.views import _starts

    current = {"verity.a": 500, "verity.b": 7}
    remembered = {"verity.a": 100, "verity.b": 3}
    # Direct streams replay everything remembered.
    assert _starts({}, remembered, current) == {"verity.a": 100, "verity.b": 3}
    # Behind the proxy, at most a page per channel: no next link to refuse.
    assert _starts({}, remembered, current, page=50) == {"verity.a": 450, "verity.b": 3}
    # A Last-Event-ID is the client's own word, as before.
    assert _starts({"verity.a": 10}, remembered, current, page=50)["verity.a"] == 10
