"""The events endpoint's checks before the stream starts, and its rewriting."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from verity_django.views import _Connection


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


def envelope(seq: int, source: str | None = None, audience: str = "global") -> str:
    data: dict[str, Any] = {"type": "directives", "seq": seq, "audience": audience}
    if source is not None:
        data["source"] = source
    data["directives"] = [{"op": "refresh_collection", "name": "todos"}]
    text = json.dumps(data, separators=(",", ":"))
    return f"event: message\nid: verity.{audience}:{seq}\ndata: {text}\n\n"


def test_rewrite_drops_envelopes_already_delivered() -> None:
    connection = _Connection({"global": 2}, None)
    out = connection.rewrite(envelope(2) + envelope(3) + envelope(3) + envelope(4))
    seqs = [json.loads(line[6:])["seq"] for line in out.splitlines() if line.startswith("data: ")]
    assert seqs == [3, 4]


def test_rewrite_turns_own_envelope_into_an_empty_one_with_the_same_seq() -> None:
    connection = _Connection({"global": 0}, "me")
    out = connection.rewrite(envelope(1, source="me") + envelope(2, source="other"))
    datas = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]
    assert datas[0] == {"type": "directives", "seq": 1, "audience": "global", "directives": []}
    assert datas[1]["source"] == "other"
    assert "id: verity.global:1" in out


def test_rewrite_keeps_keep_alives_and_other_events() -> None:
    connection = _Connection({"global": 0}, "me")
    text = "event: keep-alive\ndata:\n\n"
    assert connection.rewrite(text) == text
