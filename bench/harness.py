"""Servers, databases, HTTP sessions and subprocesses shared by the benchmarks.

The real-process harness of the live tests (``liveservers/processes.py``) starts
and stops every server; this module only adds what benchmarks need on top:
the bench settings module, a prepared SQLite database, and a logged-in client.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from liveservers.processes import (
    PYTHON,
    REPO_ROOT,
    AsgiServer,
    PostgresServer,
    ServerError,
    child_env,
    run_manage,
)

BENCH_SETTINGS = "bench.settings"
USERNAME = "alice"
PASSWORD = "alice-password"
CLIENT_ID = "bench-client"
DIRECTIVE_HEADERS = {
    "X-Verity-Directive-Request": "send me directives",
    "X-Client-ID": CLIENT_ID,
}


def bench_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bench process: bench settings, DEBUG off, ``env`` on top."""
    merged = child_env({"DJANGO_DEBUG": "0", **(env or {})})
    merged["DJANGO_SETTINGS_MODULE"] = BENCH_SETTINGS
    # BENCH_PUBLISH_INLINE=0 runs every bench server with the publisher
    # thread only (the A/B of docs/reliability.md's design choice).
    inline = os.environ.get("BENCH_PUBLISH_INLINE")
    if inline is not None:
        merged["VERITY_PUBLISH_INLINE"] = inline
    return merged


class BenchAsgiServer(AsgiServer):
    """The demo project under uvicorn, routed through ``bench.urls``."""

    def __init__(self, env: Mapping[str, str] | None = None, port: int | None = None) -> None:
        # Access logs would cost both sides alike, but fill the log during fan-out.
        # A benchmark's clients idle while the other side runs: past uvicorn's
        # default 5 s keep-alive the server closes their connections, and a
        # request sent as it does so is reset (a W5 full run crashed so).
        super().__init__(
            env=env,
            port=port,
            extra_args=["--no-access-log", "--backlog", "4096", "--timeout-keep-alive", "300"],
        )

    def _process_env(self) -> dict[str, str]:
        return bench_env(self.env)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    if match is None:
        raise ServerError(f"no VmRSS for pid {pid}")
    return int(match.group(1))


def run_bench_module(
    module: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300.0
) -> str:
    """Run ``python -m <module> <args>`` with bench settings; return its stdout."""
    result = subprocess.run(
        [PYTHON, "-m", module, *args],
        cwd=REPO_ROOT,
        env=bench_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )
    if result.returncode != 0:
        raise ServerError(
            f"python -m {module} {' '.join(args)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result.stdout


def prepare_database(env: Mapping[str, str], todos: int) -> None:
    """migrate, seed_demo, and at least ``todos`` todos for alice."""
    run_manage("migrate", "--noinput", env=env, check=True)
    run_manage("seed_demo", env=env, check=True)
    if todos:
        run_bench_module("bench.seed", "--todos", str(todos), env=env)


@contextlib.contextmanager
def sqlite_database(todos: int = 0) -> Iterator[Path]:
    """A migrated, seeded SQLite file (alice owns at least ``todos`` todos), removed after."""
    directory = Path(tempfile.mkdtemp(prefix="verity-bench-db-"))
    path = directory / "db.sqlite3"
    try:
        prepare_database({"VERITY_SQLITE_PATH": str(path)}, todos)
        yield path
    finally:
        for leftover in directory.iterdir():
            leftover.unlink()
        directory.rmdir()


@contextlib.contextmanager
def postgres_database(todos: int = 0) -> Iterator[str]:
    """A throw-away PostgreSQL cluster with a prepared database; yields its URL."""
    with PostgresServer() as server:
        env = {"VERITY_DATABASE_URL": server.database_url}
        prepare_database(env, todos)
        yield server.database_url


def login(base_url: str, *, timeout: float = 30.0) -> httpx.Client:
    """An httpx client logged in as alice, sending the CSRF token and directive headers."""
    client = httpx.Client(base_url=base_url, timeout=timeout)
    try:
        client.get("/api/auth/me/")
        token = client.cookies.get("csrftoken")
        if not token:
            raise ServerError(f"GET {base_url}/api/auth/me/ set no csrftoken cookie")
        response = client.post(
            "/api/auth/login/",
            json={"username": USERNAME, "password": PASSWORD},
            headers={"X-CSRFToken": token},
        )
        if response.status_code != 200:
            raise ServerError(f"login failed: {response.status_code} {response.text[:300]}")
        client.headers.update(DIRECTIVE_HEADERS)
        client.headers["X-CSRFToken"] = client.cookies["csrftoken"]
    except BaseException:
        client.close()
        raise
    return client


class EnvelopeCounter:
    """One SSE connection in a thread, counting the envelopes it receives.

    It proves that the push path really delivered while a benchmark measured
    it, and keeps the server's delivery work (one listener) in the measurement.
    """

    _ENVELOPE = re.compile(rb'"type":"directives","seq":(\d+)')

    def __init__(self, port: int, path: str, cookies: Mapping[str, str] | None = None) -> None:
        self.port = port
        self.path = path
        self.cookies = dict(cookies or {})
        self.envelopes = 0
        self.hello = False
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="sse-counter", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> EnvelopeCounter:
        cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Accept: text/event-stream\r\nCookie: {cookie}\r\n\r\n"
        )
        sock.sendall(request.encode())
        sock.settimeout(None)
        self._sock = sock
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.hello:
            if time.monotonic() > deadline:
                raise ServerError(f"no hello on {self.path}")
            time.sleep(0.01)
        return self

    def _run(self) -> None:
        assert self._sock is not None
        tail = b""
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            text = tail + chunk
            if b'"type":"hello"' in text:
                self.hello = True
            found = len(self._ENVELOPE.findall(text))
            # Keep an unfinished line for the next read, but never count twice.
            cut = text.rfind(b"\n")
            tail = text[cut + 1 :] if cut >= 0 else text
            found -= len(self._ENVELOPE.findall(tail))
            with self._lock:
                self.envelopes += found

    def count(self) -> int:
        with self._lock:
            return self.envelopes

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        self._thread.join(timeout=5)


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def python_json(stdout: str) -> Any:
    """The last line of a bench subprocess's stdout, which is its JSON result."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ServerError("the subprocess printed no result")
    return json.loads(lines[-1])


def sequence_arg(values: Sequence[str]) -> str:
    return ",".join(values)


def python_version() -> str:
    return sys.version.split()[0]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
