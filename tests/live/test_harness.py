"""Tests of the live-test harness itself, against real processes.

None of these touch the demo project: a failure here is a harness (or machine)
problem, never an app problem.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from liveservers.processes import (
    AsgiServer,
    PostgresServer,
    RedisServer,
    free_port,
    redis_ping,
    session_members,
)

from .conftest import PushpinFactory
from .sse import SSEEvent, SSEParser, VerityConsumer, parse_stream, read_events

# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------


def test_redis_answers_ping_and_restart_loses_memory(redis_server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    assert client.ping()
    client.set("verity:probe", "1")
    port = redis_server.port

    redis_server.restart()

    assert redis_server.port == port
    assert redis_server.address == f"127.0.0.1:{port}"
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    assert client.ping()
    assert client.get("verity:probe") is None  # --save '' --appendonly no: memory only


def test_redis_stop_frees_port_and_removes_temp_dir() -> None:
    server = RedisServer().start()
    tmp_dir = server.tmp_dir
    assert tmp_dir is not None
    assert tmp_dir.is_dir()
    server.stop()
    assert not redis_ping(server.port)
    assert not tmp_dir.exists()


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def test_postgres_accepts_connections(postgres_server: PostgresServer) -> None:
    assert postgres_server.database_url == (
        f"postgres://postgres@127.0.0.1:{postgres_server.port}/verity"
    )
    with psycopg.connect(postgres_server.database_url, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_database(), current_setting('fsync')").fetchone()
    assert row == ("verity", "off")


def test_postgres_database_fixture_is_isolated(postgres_database: str) -> None:
    with psycopg.connect(postgres_database, connect_timeout=5) as conn:
        conn.execute("CREATE TABLE probe (id int PRIMARY KEY)")
        conn.execute("INSERT INTO probe VALUES (1), (2)")
        row = conn.execute("SELECT count(*) FROM probe").fetchone()
    assert row == (2,)


# --------------------------------------------------------------------------
# Pushpin
# --------------------------------------------------------------------------


class _GripUpstream(BaseHTTPRequestHandler):
    """``/hello`` answers plainly; ``/stream`` asks pushpin to hold an SSE stream."""

    def do_GET(self) -> None:
        if self.path == "/stream":
            body = b"event: stream-open\ndata:\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Grip-Hold", "stream")
            self.send_header("Grip-Channel", "harness")
        else:
            body = f"upstream saw {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def grip_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _GripUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_pushpin_proxies_to_upstream(pushpin_factory: PushpinFactory, grip_upstream: str) -> None:
    first = pushpin_factory(grip_upstream)
    second = pushpin_factory(grip_upstream)  # a second instance must not clash

    for proxy in (first, second):
        response = httpx.get(f"{proxy.http_url}/hello?x=1", timeout=10)
        assert response.status_code == 200
        assert response.text == "upstream saw /hello?x=1"
    assert len({first.http_port, first.control_port, second.http_port, second.control_port}) == 4


def test_pushpin_holds_grip_stream_and_publishes(
    pushpin_factory: PushpinFactory, grip_upstream: str
) -> None:
    proxy = pushpin_factory(grip_upstream)
    received: list[SSEEvent] = []
    reader = threading.Thread(
        target=lambda: received.extend(read_events(f"{proxy.http_url}/stream", 2, timeout=15))
    )
    reader.start()
    item = {"channel": "harness", "formats": {"http-stream": {"content": 'data: {"n": 1}\n\n'}}}
    # Publish until the held stream has subscribed (a publish before that is lost).
    deadline = time.monotonic() + 15
    while reader.is_alive() and time.monotonic() < deadline:
        response = httpx.post(f"{proxy.control_url}/publish/", json={"items": [item]}, timeout=5)
        assert response.status_code == 200, response.text
        reader.join(timeout=0.2)
    reader.join(timeout=1)

    assert [e.event for e in received] == ["stream-open", "message"], proxy.log_text()
    assert received[1].json() == {"n": 1}


def test_pushpin_stop_reaps_children_of_a_crashed_runner(
    pushpin_factory: PushpinFactory, grip_upstream: str
) -> None:
    proxy = pushpin_factory(grip_upstream)
    leader = proxy.pid
    # condure, zurl, proxy and handler each get a process group of their own.
    assert len(session_members(leader)) >= 4

    os.kill(leader, signal.SIGKILL)  # only the runner, as a crash would
    proxy.stop()

    assert session_members(leader) == []


# --------------------------------------------------------------------------
# SSE parser (pure unit tests)
# --------------------------------------------------------------------------

STREAM = (
    b"\xef\xbb\xbf: welcome comment\r\n"
    b"\r\n"
    b"event: stream-open\r\n"
    b"data:\r\n"
    b"\r\n"
    b"id: 7\r\n"
    b'data: {"type": "hello",\r\n'
    b'data:  "last_seq": 3}\r\n'
    b"\r\n"
    b":keep-alive comment\n"
    b"event: keep-alive\n"
    b"data\n"
    b"\n"
    b"data:no space\rdata: caf\xc3\xa9\r\r"
    b"event: ignored-without-data\n"
    b"id: 8\n"
    b"\n"
    b"retry: 1500\n"
    b"unknown: field\n"
    b"data: after id\n"
    b"\n"
    b"data: never terminated\n"
)

EXPECTED = [
    SSEEvent(event="stream-open", data="", id=""),
    SSEEvent(event="message", data='{"type": "hello",\n "last_seq": 3}', id="7"),
    SSEEvent(event="keep-alive", data="", id="7"),
    SSEEvent(event="message", data="no space\ncafé", id="7"),
    SSEEvent(event="message", data="after id", id="8", retry=1500),
]


def test_sse_parser_whole_stream() -> None:
    parser = SSEParser()
    events = parser.feed(STREAM) + parser.close()

    assert events == EXPECTED
    assert parser.comments == ["welcome comment", "keep-alive comment"]
    assert parser.reconnection_time == 1500
    assert events[1].json() == {"type": "hello", "last_seq": 3}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_sse_parser_any_chunking(size: int) -> None:
    # Splits land inside CRLF pairs and inside the two bytes of "é".
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert parse_stream(chunks) == EXPECTED


def test_sse_parser_cr_at_chunk_end_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n\r") == []  # CRLF, then a CR whose LF may follow
    assert parser.feed(b"\n") == [SSEEvent(data="a")]  # CRLF: blank line, one dispatch
    assert parser.close() == []


# --------------------------------------------------------------------------
# AsgiServer and VerityConsumer against a scripted fake server
# --------------------------------------------------------------------------

# A stand-in for the events endpoint: connection N of the process replays
# SCRIPT[N-1] (with {client_id} filled in), then holds with keep-alives.
FAKE_APP = textwrap.dedent(
    """
    import asyncio, json, os, sys
    from urllib.parse import parse_qs

    SCRIPT = json.loads(os.environ["FAKE_SCRIPT"])
    connections = 0
    print("fake verity app starting", flush=True)

    async def send_text(send, status, body, content_type="application/json"):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode())]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def app(scope, receive, send):
        global connections
        if scope["type"] != "http":
            return
        if scope["path"] == "/api/auth/me/":
            return await send_text(send, 200, '{"user": null}')
        query = parse_qs(scope["query_string"].decode())
        if "secret" in query.get("audience", []):
            return await send_text(send, 403, '{"detail": "forbidden"}')
        connections += 1
        client_id = query["client_id"][0]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        chunks = SCRIPT[connections - 1] if connections <= len(SCRIPT) else [None]
        for chunk in chunks:
            if chunk is None:  # hold the stream open
                while True:
                    await send({"type": "http.response.body",
                                "body": b"event: keep-alive\\ndata:\\n\\n", "more_body": True})
                    await asyncio.sleep(0.2)
            body = chunk.replace("{client_id}", client_id).encode()
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    """
)


def _message(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _envelope(seq: int, source: str | None = "someone-else") -> dict[str, object]:
    envelope: dict[str, object] = {
        "type": "directives",
        "seq": seq,
        "audience": "global",
        "directives": [{"op": "refresh_collection", "name": "todos"}],
    }
    if source is not None:
        envelope["source"] = source
    return envelope


@pytest.fixture
def fake_verity_server(tmp_path: Path) -> Iterator[AsgiServer]:
    (tmp_path / "fake_verity.py").write_text(FAKE_APP)
    script = [
        [
            ": opening comment\n\n",
            _message({"type": "hello", "audience": "global", "last_seq": 0}),
            _message(_envelope(1)),
            _message(_envelope(2, source="{client_id}")),  # our own echo
            _message(_envelope(3)),  # looks like a gap: the echo was dropped
            _message(_envelope(3)),  # a duplicate with the same content
            "event: keep-alive\ndata:\n\n",
        ],
        [
            _message({"type": "hello", "audience": "global", "last_seq": 5}),  # missed 4, 5
            _message(_envelope(6, source=None)),
            None,
        ],
    ]
    server = AsgiServer(
        env={"PYTHONPATH": str(tmp_path), "FAKE_SCRIPT": json.dumps(script)},
        app="fake_verity:app",
    )
    with server:
        yield server


@pytest.mark.anyio
async def test_verity_consumer_follows_client_rules(fake_verity_server: AsgiServer) -> None:
    async with VerityConsumer(fake_verity_server.base_url, client_id="me") as consumer:
        await consumer.wait_for(lambda c: 6 in c.received.get("global", []), timeout=15)

    assert consumer.status_codes[:2] == [200, 200]
    assert consumer.received["global"] == [1, 2, 3, 3, 6]
    assert [(e.audience, e.seq) for e in consumer.echo_dropped] == [("global", 2)]
    assert [(g.previous, g.seq, g.reason) for g in consumer.gaps] == [
        (1, 3, "directives"),
        (3, 5, "hello"),
    ]
    assert [r.reason for r in consumer.resyncs] == ["directives", "hello"]
    assert [(d.seq, d.same_content) for d in consumer.duplicates] == [(3, True)]
    assert [(h.connection, h.last_seq, h.previous) for h in consumer.hellos] == [
        (1, 0, None),
        (2, 5, 3),
    ]
    assert consumer.tracked == {"global": 6}
    assert "opening comment" in consumer.comments
    assert "keep-alive" in {r.event.event for r in consumer.named_events}
    assert consumer.errors == []


@pytest.mark.anyio
async def test_verity_consumer_reconnects_after_server_crash(
    fake_verity_server: AsgiServer,
) -> None:
    async with VerityConsumer(fake_verity_server.base_url, client_id="me") as consumer:
        await consumer.wait_for(lambda c: 6 in c.received.get("global", []), timeout=15)
        fake_verity_server.kill()  # blocking is fine: the consumer just sees a dead peer
        fake_verity_server.start()
        await consumer.wait_for(lambda c: len(c.hellos) >= 3, timeout=15)

    # The new process starts its script over: hello with last_seq 0, which is
    # lower than the tracked 6, so the counter resets without a resync.
    assert (consumer.hellos[2].last_seq, consumer.hellos[2].previous) == (0, 6)
    assert [g.reason for g in consumer.gaps].count("hello") == 1
    assert any(e.kind == "transport" for e in consumer.errors)
    assert consumer.status_codes.count(200) >= 3


@pytest.mark.anyio
async def test_verity_consumer_records_refused_connection(
    fake_verity_server: AsgiServer,
) -> None:
    consumer = VerityConsumer(
        fake_verity_server.base_url, audiences=["global", "secret"], stop_on_http_error=True
    )
    await consumer.run()  # returns after the first refusal

    assert consumer.status_codes == [403]
    assert [e.kind for e in consumer.errors] == ["http"]
    assert consumer.received == {}


def test_asgi_server_restart_kill_and_logs(fake_verity_server: AsgiServer) -> None:
    port, first_pid = fake_verity_server.port, fake_verity_server.pid
    assert "fake verity app starting" in fake_verity_server.log_text()

    fake_verity_server.restart()
    assert fake_verity_server.port == port
    assert fake_verity_server.pid != first_pid
    assert httpx.get(f"{fake_verity_server.base_url}/api/auth/me/").status_code == 200

    fake_verity_server.kill()
    assert not fake_verity_server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{fake_verity_server.base_url}/api/auth/me/")
    fake_verity_server.start()
    assert fake_verity_server.log_text().count("fake verity app starting") == 3


def test_asgi_server_stop_does_not_wait_for_open_streams(fake_verity_server: AsgiServer) -> None:
    url = f"{fake_verity_server.base_url}/api/events?client_id=x"
    # The first two connections replay the script; the third is held open.
    for _ in range(2):
        read_events(url, 1)
    opened = threading.Event()

    def hold_stream() -> None:
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=30) as rsp:
            for _ in rsp.iter_bytes():
                opened.set()

    holder = threading.Thread(target=hold_stream, daemon=True)
    holder.start()
    assert opened.wait(10)

    began = time.monotonic()
    fake_verity_server.stop()

    assert time.monotonic() - began < fake_verity_server.stop_timeout + 2
    holder.join(timeout=5)
    assert not holder.is_alive()
    assert "fake verity app starting" in fake_verity_server.log_text()  # kept after stop
