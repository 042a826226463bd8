"""Start and stop real server processes on free loopback ports.

Plain Python (no pytest import at module level) so that scripts and benchmarks
can reuse it. Every server:

- runs in its own session (``start_new_session=True``), so stopping it signals
  every process of that session and never leaves children (uvicorn, pushpin's
  condure/zurl/proxy/handler, postgres backends) behind, even if the leader
  crashed first;
- keeps its files in a ``tempfile.mkdtemp`` directory that ``stop()`` removes;
- is a context manager, and ``start()`` cleans up after itself when it fails.

Nothing here listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Self, TypedDict

REPO_ROOT: Path = Path(__file__).resolve().parents[1]

# The interpreter running the tests is the project's virtualenv python, and it
# is the one that has uvicorn, Django and the app's dependencies installed.
PYTHON: str = sys.executable

LOOPBACK = "127.0.0.1"

# Django settings always come from the demo project; the VERITY_* variables of
# the shell running the tests must not leak into a server that a test
# configures explicitly, or two developers would see different results.
DJANGO_SETTINGS_MODULE = "testproject.settings"
_ENV_PREFIXES_NOT_INHERITED = ("VERITY_",)


class ServerError(RuntimeError):
    """A server did not start, or died, with its log attached to the message."""


# --------------------------------------------------------------------------
# Ports, binaries, environment
# --------------------------------------------------------------------------

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now.

    The kernel picks the port; we remember the ones handed out in this process
    so that two servers started back to back (before either binds) never get
    the same one.
    """
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((LOOPBACK, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise ServerError("could not find a free loopback port")


def postgres_bindir() -> Path | None:
    """Where initdb/postgres live: Debian keeps them off PATH, per major version."""
    override = os.environ.get("VERITY_PG_BINDIR")
    if override:
        return Path(override)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out and (Path(out) / "postgres").exists():
                return Path(out)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def find_binary(name: str) -> str | None:
    """Search PATH, then the PostgreSQL bin directory."""
    found = shutil.which(name)
    if found:
        return found
    bindir = postgres_bindir()
    if bindir is not None and (bindir / name).exists():
        return str(bindir / name)
    return None


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test when it is missing.

    On CI (``CI=true``) a missing binary is a broken runner, not a reason to
    quietly skip the live tests, so it fails instead.
    """
    path = find_binary(name)
    if path is not None:
        return path
    import pytest  # lazily: this module must stay importable without pytest

    message = f"required binary {name!r} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``os.environ`` without inherited VERITY_* variables, with ``env`` on top."""
    merged = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_ENV_PREFIXES_NOT_INHERITED)
    }
    # Server logs are read while the server runs; block buffering would hide them.
    merged["PYTHONUNBUFFERED"] = "1"
    if env:
        merged.update(env)
    merged["DJANGO_SETTINGS_MODULE"] = DJANGO_SETTINGS_MODULE
    return merged


def run_manage(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python manage.py <args>`` in the repository root and capture its output.

    With ``check=True`` a non-zero exit raises ``ServerError`` carrying the output,
    which reads better in a test failure than ``CalledProcessError``.
    """
    result = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )
    if check and result.returncode != 0:
        raise ServerError(
            f"manage.py {' '.join(args)} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


_HAVE_PROC = Path("/proc/self/stat").exists()


def session_members(session_id: int) -> list[int]:
    """Pids of the live processes in a session (Linux /proc; empty elsewhere)."""
    members: list[int] = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which is in parentheses and may contain
        # spaces: state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == session_id and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def descendants(pids: list[int]) -> list[int]:
    """``pids`` and every live process below them (Linux /proc), parents
    first: PostgreSQL's backends, for one, leave the postmaster's session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop(0)
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


class _Identity(TypedDict, total=False):
    user: int
    group: int
    extra_groups: list[int]


def _identity_kwargs(user_name: str | None) -> _Identity:
    """Popen arguments that drop root privileges to ``user_name`` (uid and gids)."""
    if user_name is None:
        return {}
    entry = pwd.getpwnam(user_name)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def port_answers_tcp(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET path``, or None when nothing answers with HTTP.

    Only the headers are read, so this also works on a response that streams.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# --------------------------------------------------------------------------
# The process wrapper all servers share
# --------------------------------------------------------------------------


class ManagedProcess:
    """One long-running process with a temp dir, a log file and a clean stop.

    Subclasses implement ``_command()`` and ``_wait_ready()``, and may override
    ``_prepare()`` (runs once per temp dir, before the first launch).
    """

    name = "process"
    startup_timeout = 30.0
    stop_timeout = 5.0
    stop_signal = signal.SIGTERM
    # Set to a user name to run the process as that user (needs root).
    run_as: str | None = None
    # Servers that put unix sockets in their temp dir need a short path to it.
    needs_short_tmp_path = False

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env: dict[str, str] = dict(env or {})
        self.tmp_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        # Kept after stop() removes the temp dir, so a failing test can still show it.
        self._final_log: str = ""
        self.startup_seconds: float | None = None

    # -- subclass hooks --------------------------------------------------

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time setup in ``self.tmp_dir`` (config files, initdb, ...)."""

    def _process_env(self) -> dict[str, str]:
        return child_env(self.env)

    def _tmp_parent(self) -> str | None:
        # A unix socket path holds at most 107 bytes; a long $TMPDIR (macOS,
        # CI runners) plus pushpin's socket names can exceed it.
        if self.needs_short_tmp_path and len(tempfile.gettempdir()) > 40:
            return "/tmp"
        return None

    def _cwd(self) -> Path | None:
        return self.tmp_dir

    # -- lifecycle --------------------------------------------------------

    @property
    def log_path(self) -> Path:
        assert self.tmp_dir is not None, f"{self.name} has no temp dir (not started)"
        return self.tmp_dir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and not self._exited()

    def start(self) -> Self:
        if self.running:
            raise ServerError(f"{self.name} is already running")
        began = time.monotonic()
        try:
            if self.tmp_dir is None:
                self.tmp_dir = Path(
                    tempfile.mkdtemp(prefix=f"verity-{self.name}-", dir=self._tmp_parent())
                )
                self._prepare()
            self._launch()
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _launch(self) -> None:
        # Append: after restart() the log keeps what the previous run said.
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate()
        self.process = subprocess.Popen(
            self._command(),
            cwd=self._cwd(),
            env=self._process_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_identity_kwargs(self.run_as),
        )

    def _exited(self) -> bool:
        """Whether the leader has exited, without reaping it.

        An exited but unreaped leader keeps its pid, and so its process group id,
        reserved: signalling the group can then never hit an unrelated process
        that reused the number. Only ``_terminate()`` reaps.
        """
        process = self.process
        if process is None or process.returncode is not None:
            return True
        try:
            status = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return status is not None

    def _wait_exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        """Signal every process of the session this server leads."""
        assert self.process is not None
        if self.process.returncode is not None:
            return  # reaped: its ids may belong to someone else by now
        # The child leads its own session and process group (start_new_session).
        # The group is not enough: pushpin's runner puts each of its children in
        # a process group of its own, but they all stay in the session. Each
        # process gets the signal once: a second SIGTERM makes uvicorn skip its
        # graceful shutdown.
        if not _HAVE_PROC:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            return
        for pid in session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _terminate(self, sig: signal.Signals, timeout: float) -> None:
        """Signal the session, escalate to SIGKILL, sweep leftovers, reap, close the log."""
        if self.process is not None:
            if not self._exited():
                self._signal_group(sig)
                if not self._wait_exited(timeout):
                    self._signal_group(signal.SIGKILL)
                    self._wait_exited(10)
            # Children that outlive the leader (or a leader that crashed) are still
            # in the session; the unreaped leader keeps its ids ours until wait().
            deadline = time.monotonic() + 5
            while True:
                self._signal_group(signal.SIGKILL)
                if not session_members(self.process.pid) or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            self.process.wait(timeout=10)
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def stop(self) -> None:
        """Stop gracefully (SIGKILL after ``stop_timeout``) and remove the temp dir."""
        try:
            self._terminate(self.stop_signal, self.stop_timeout)
        finally:
            if self.tmp_dir is not None:
                self._final_log = self._read_logs()
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
                self.tmp_dir = None

    def kill(self) -> None:
        """SIGKILL every process of the server, keeping the temp dir (``start()`` may follow)."""
        self._terminate(signal.SIGKILL, 10)

    def pause(self) -> None:
        """SIGSTOP every process of the server and below it: it keeps its
        connections open and answers nothing on them, as a hung server or a
        lost host does (the kernel still acknowledges what is sent)."""
        self._signal_tree(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what ``pause()`` stopped."""
        self._signal_tree(signal.SIGCONT)

    def _signal_tree(self, sig: signal.Signals) -> None:
        assert self.process is not None, f"{self.name} is not running"
        for pid in descendants(session_members(self.process.pid) or [self.process.pid]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def restart(self) -> Self:
        """Stop and start again on the same port(s), keeping the temp dir."""
        self._terminate(self.stop_signal, self.stop_timeout)
        return self.start()

    def _read_logs(self) -> str:
        if self.tmp_dir is None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        return self._read_logs()

    def _check_alive(self) -> None:
        if self.process is not None and self._exited():
            raise ServerError(f"{self.name} exited while starting\n--- log ---\n{self.log_text()}")

    def _poll_until(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Call ``ready()`` until it is true; fail fast if the process dies."""
        while True:
            self._check_alive()
            if ready():
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"{self.name}: timed out waiting for {what}\n--- log ---\n{self.log_text()}"
                )
            time.sleep(0.05)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort if a caller forgot stop(): never leave an orphan process.
        process = getattr(self, "process", None)
        if process is not None and process.returncode is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------


def redis_ping(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """True when a RESP ``PING`` gets ``+PONG`` (no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(ManagedProcess):
    """A memory-only redis-server; ``restart()`` therefore loses every key."""

    name = "redis"
    startup_timeout = 15.0

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.binary = binary or find_binary("redis-server") or "redis-server"

    @property
    def address(self) -> str:
        """``host:port``, the format of the demo project's ``VERITY_REDIS``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        assert self.tmp_dir is not None
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.tmp_dir),
            "--daemonize",
            "no",
        ]

    def _wait_ready(self, deadline: float) -> None:
        self._poll_until(lambda: redis_ping(self.port), deadline, "PING")

    def ping(self) -> bool:
        return redis_ping(self.port)


class SmallDisk:
    """A small tmpfs of one server's own, for tests of a full disk.

    It is mounted in a user and mount namespace of the server's own
    (``unshare``), so no root is needed and no mount outlives the server: the
    server's command is wrapped to mount it first. The kernel shows the mount
    to other processes under the server's ``/proc/<pid>/root``, where
    :meth:`fill` writes a file until the disk is full and :meth:`free`
    removes it.
    """

    def __init__(self, mount_point: Path, size: str) -> None:
        self.mount_point = mount_point
        self.size = size
        self.unshare = find_binary("unshare") or "unshare"

    def wrap(self, command: Sequence[str], copy: Sequence[tuple[Path, str]] = ()) -> list[str]:
        """``command`` run on the mounted disk, with each ``(source, name)`` of
        ``copy`` copied onto it first (it starts empty)."""
        script = f'mount -t tmpfs -o size={self.size} verity-small-disk "$1"'
        for source, name in copy:
            target = self.mount_point / name
            script += f" && cp {shlex.quote(str(source))} {shlex.quote(str(target))}"
        script += ' && shift && exec "$@"'
        return [
            self.unshare,
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(self.mount_point),
            *command,
        ]

    def _filler(self, pid: int) -> Path:
        return Path(f"/proc/{pid}/root") / str(self.mount_point).lstrip("/") / "filler"

    def fill(self, pid: int) -> None:
        """Write until the disk has no room left; again to take up whatever
        the server freed since."""
        with open(self._filler(pid), "ab") as filler:
            block = b"\0" * 65536
            with contextlib.suppress(OSError):
                while True:
                    filler.write(block)
                    filler.flush()

    def free(self, pid: int) -> None:
        self._filler(pid).unlink()


class OnSmallDisk(ManagedProcess):
    """A server on a :class:`SmallDisk` of ``disk_size`` in its temp dir;
    its ``_command`` wraps the server's in ``self.disk.wrap``."""

    disk_size = "4m"

    @property
    def disk(self) -> SmallDisk:
        assert self.tmp_dir is not None
        return SmallDisk(self.tmp_dir / "disk", self.disk_size)

    def _prepare(self) -> None:
        super()._prepare()
        self.disk.mount_point.mkdir()


class RedisOnSmallDisk(OnSmallDisk, RedisServer):
    """A redis-server that keeps an append-only file on a :class:`SmallDisk`,
    which ``fill_disk()`` fills and ``free_disk()`` frees again.

    While the disk is full, Redis refuses every write with ``MISCONF Errors
    writing to the AOF file: No space left on device``, as a production Redis
    does, and keeps what it already holds; it retries the file every second
    once there is room.
    """

    name = "redis-small-disk"

    def _command(self) -> list[str]:
        server = super()._command()
        # --dir on the new disk, and an append-only file to write there.
        at = server.index("--dir")
        server[at + 1] = str(self.disk.mount_point)
        at = server.index("--appendonly")
        server[at + 1] = "yes"
        return self.disk.wrap(server)

    def _persistence(self) -> str:
        """The ``INFO persistence`` section (a RESP bulk string: ``$<length>``, then the text)."""
        with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as sock:
            sock.sendall(b"INFO persistence\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ServerError(f"{self.name} closed the connection during INFO")
                reply += chunk
            header, _, body = reply.partition(b"\r\n")
            length = int(header[1:])
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ServerError(f"{self.name} closed the connection during INFO")
                body += chunk
        return body[:length].decode()

    def aof_writes_fail(self) -> bool:
        return "aof_last_write_status:err" in self._persistence()

    def fill_disk(self, timeout: float = 10.0) -> None:
        """Fill the disk, then write until Redis reports its file unwritable."""
        self.disk.fill(self.pid)
        # The file's last page may still have room; one larger write needs more.
        deadline = time.monotonic() + timeout
        value = b"x" * 16384
        while not self.aof_writes_fail():
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name}: the append-only file still writes on a full disk")
            with socket.create_connection((LOOPBACK, self.port), timeout=2.0) as sock:
                key = b"full-disk-filler"
                sock.sendall(
                    b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                    % (len(key), key, len(value), value)
                )
                sock.recv(256)
            time.sleep(0.05)

    def free_disk(self, timeout: float = 10.0) -> None:
        """Remove the filler; return once Redis writes its file again."""
        self.disk.free(self.pid)
        self._poll_until(
            lambda: not self.aof_writes_fail(), time.monotonic() + timeout, "AOF writes again"
        )


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


class PostgresServer(ManagedProcess):
    """A throw-away cluster (``initdb`` + ``postgres``) with trust auth on loopback.

    As root the binaries run as the ``postgres`` user (postgres refuses root);
    otherwise they run as the current user.
    """

    name = "postgres"
    needs_short_tmp_path = True
    startup_timeout = 60.0
    stop_timeout = 10.0
    # SIGTERM is "smart" shutdown, which waits for every client to disconnect;
    # SIGINT ("fast") rolls them back and exits, which is what a test wants.
    stop_signal = signal.SIGINT

    superuser = "postgres"

    def __init__(
        self,
        port: int | None = None,
        database: str = "verity",
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.port = port or free_port()
        self.database = database
        found = bindir or postgres_bindir()
        if found is None:
            raise ServerError("PostgreSQL binaries not found (set VERITY_PG_BINDIR)")
        self.bindir: Path = found
        self.settings: dict[str, str] = {
            # Durability is irrelevant for a test cluster, start-up speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            **(settings or {}),
        }
        # postgres refuses to run as root.
        self.run_as = self.superuser if os.geteuid() == 0 else None

    def _tmp_parent(self) -> str | None:
        parent = super()._tmp_parent()
        if parent is None and self.run_as and not os.stat(tempfile.gettempdir()).st_mode & 0o001:
            # The postgres user must be able to reach its data directory.
            return "/tmp"
        return parent

    @property
    def data_dir(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "sock"

    def url_for(self, database: str) -> str:
        return f"postgres://{self.superuser}@{LOOPBACK}:{self.port}/{database}"

    @property
    def database_url(self) -> str:
        return self.url_for(self.database)

    def _prepare(self) -> None:
        assert self.tmp_dir is not None
        self.socket_dir.mkdir()
        if self.run_as:
            # initdb creates data/ inside tmp_dir, and postgres its socket and
            # lock files: the cluster owner must own both directories.
            for path in (self.tmp_dir, self.socket_dir):
                shutil.chown(path, user=self.run_as, group=pwd.getpwnam(self.run_as).pw_gid)
        initdb = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                self.superuser,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            start_new_session=True,
            env=child_env(),
            check=False,
            timeout=120,
            **_identity_kwargs(self.run_as),
        )
        if initdb.returncode != 0:
            raise ServerError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")

    def _command(self) -> list[str]:
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
        ]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _wait_ready(self, deadline: float) -> None:
        import psycopg  # lazily: only postgres users need it

        def accepts_connections() -> bool:
            try:
                with psycopg.connect(
                    host=LOOPBACK,
                    port=self.port,
                    user=self.superuser,
                    dbname="postgres",
                    connect_timeout=2,
                ):
                    return True
            except psycopg.OperationalError:
                return False

        self._poll_until(accepts_connections, deadline, "a connection")
        if not self._database_exists(self.database):
            self.create_database(self.database)

    def _database_exists(self, name: str) -> bool:
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            return row is not None

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# --------------------------------------------------------------------------
# The demo project under uvicorn
# --------------------------------------------------------------------------


class AsgiServer(ManagedProcess):
    """``testproject.asgi:application`` under uvicorn, one worker.

    ``env`` is merged over ``os.environ`` (minus inherited VERITY_*), and
    DJANGO_SETTINGS_MODULE is always the demo project's.
    """

    name = "asgi"
    startup_timeout = 60.0
    # uvicorn gets --timeout-graceful-shutdown 1, but open SSE streams can still
    # hold it up; after this many seconds it is SIGKILLed.
    stop_timeout = 4.0
    ready_path = "/api/auth/me/"

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        app: str = "testproject.asgi:application",
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(env)
        self.port = port or free_port()
        self.app = app
        self.extra_args = list(extra_args)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _cwd(self) -> Path:
        return REPO_ROOT

    def _command(self) -> list[str]:
        return [
            PYTHON,
            "-m",
            "uvicorn",
            self.app,
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--lifespan",
            "off",
            "--timeout-graceful-shutdown",
            "1",
            *self.extra_args,
        ]

    def _wait_ready(self, deadline: float) -> None:
        self._poll_until(
            lambda: http_status(LOOPBACK, self.port, self.ready_path) is not None,
            deadline,
            f"GET {self.ready_path}",
        )


class AsgiServerWithEventsOnSmallDisk(OnSmallDisk, AsgiServer):
    """An :class:`AsgiServer` whose stored envelopes live in a SQLite
    database of their own (``VERITY_EVENTS_SQLITE_PATH``, routed by
    ``testproject.routers``) on a :class:`SmallDisk`, while the project's
    own database stays on a disk with room: a full disk fails the storage's
    writes and nothing else. ``events_template``, a migrated events
    database, is copied onto the disk at each start (a restart mounts a new,
    empty disk).
    """

    name = "asgi-small-disk"
    disk_size = "2m"

    def __init__(
        self,
        events_template: Path,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        super().__init__(env, port)
        self.events_template = events_template

    def _prepare(self) -> None:
        super()._prepare()
        self.env["VERITY_EVENTS_SQLITE_PATH"] = str(self.disk.mount_point / "events.sqlite3")

    def _command(self) -> list[str]:
        return self.disk.wrap(super()._command(), copy=[(self.events_template, "events.sqlite3")])

    def fill_disk(self) -> None:
        self.disk.fill(self.pid)

    def free_disk(self) -> None:
        self.disk.free(self.pid)


# --------------------------------------------------------------------------
# Pushpin (GRIP proxy)
# --------------------------------------------------------------------------

_PUSHPIN_CONFIG = """\
# Generated by liveservers/processes.py. Every zmq socket is an ipc socket in
# {{rundir}} (this instance's temp dir), and every TCP port is on loopback, so
# instances never clash with each other or with a system-wide pushpin.
[global]
include={{libdir}}/internal.conf
rundir={rundir}
ipc_prefix=pp-
port_offset=0
stats_connection_ttl=120

[runner]
# zurl (outgoing HTTP to the upstream) runs per instance: Debian's
# internal.conf points at a system-wide zurl under /var/run/zurl instead.
services=condure,zurl,pushpin-proxy,pushpin-handler
http_port={loopback}:{http_port}
logdir={logdir}
log_level={log_level}
client_buffer_size=8192
client_maxconn=10000
condure_bin=condure
zurl_bin=zurl

[proxy]
routesfile={routesfile}
zurl_out_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in
zurl_out_stream_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-in-stream
zurl_in_specs=ipc://{{rundir}}/{{ipc_prefix}}zurl-out
debug=true
auto_cross_origin=false
accept_x_forwarded_protocol=false
set_x_forwarded_protocol=proto-only
x_forwarded_for=
x_forwarded_for_trusted=
orig_headers_need_mark=
accept_pushpin_route=false
log_from=false
log_user_agent=false
sig_iss=pushpin
sig_key={sig_key}
upstream_key=
updates_check=off
organization_name=

[handler]
push_in_spec=ipc://{{rundir}}/{{ipc_prefix}}push-in
push_in_sub_specs=ipc://{{rundir}}/{{ipc_prefix}}push-in-sub
push_in_sub_connect=false
push_in_http_addr={loopback}
push_in_http_port={control_port}
push_in_http_max_headers_size=10000
push_in_http_max_body_size=1000000
stats_spec=ipc://{{rundir}}/{{ipc_prefix}}stats
command_spec=ipc://{{rundir}}/{{ipc_prefix}}command
message_rate=2500
message_hwm=25000
message_wait=5000
id_cache_ttl=60
connection_subscription_max=20
subscription_linger=60
stats_subscription_ttl=60
stats_report_interval=10
stats_format=tnetstring
"""


class _GripProbeHandler(BaseHTTPRequestHandler):
    """Answers like a GRIP upstream holding a stream, for pushpin's readiness check."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Grip-Hold", "stream")
        self.send_header("Grip-Channel", "verity-harness-probe")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class Pushpin(ManagedProcess):
    """A private pushpin instance proxying every path to one upstream.

    ``http_url`` is what clients talk to; ``control_url`` is the GRIP publish
    endpoint (Django's ``GRIP_URL`` / the demo's ``VERITY_GRIP_URL``).
    ``overrides`` replaces or adds config keys, per section, e.g.
    ``{"handler": {"message_rate": "100000"}}``.

    Requests under ``PROBE_PATH`` go to a probe upstream that only runs while
    ``start()`` waits (see ``_wait_ready``); afterwards they answer 502.
    """

    PROBE_PATH = "/.verity-harness-probe"

    name = "pushpin"
    needs_short_tmp_path = True
    startup_timeout = 30.0
    stop_timeout = 5.0

    def __init__(
        self,
        upstream: str,
        http_port: int | None = None,
        control_port: int | None = None,
        binary: str | None = None,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        log_level: int = 2,
    ) -> None:
        super().__init__()
        self.upstream = upstream
        self.http_port = http_port or free_port()
        self.control_port = control_port or free_port()
        self.binary = binary or find_binary("pushpin") or "pushpin"
        self.overrides = {section: dict(keys) for section, keys in (overrides or {}).items()}
        self.log_level = log_level
        self.sig_key = os.urandom(16).hex()
        self.probe_port = free_port()

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def control_url(self) -> str:
        return f"http://{LOOPBACK}:{self.control_port}"

    @property
    def grip_url(self) -> str:
        """``control_url`` with the key this instance signs requests with
        (``sig_key``), as Django's ``GRIP_URL`` takes it: Django then trusts
        only requests this instance signed."""
        return f"{self.control_url}?key={self.sig_key}"

    @property
    def config_path(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "pushpin.conf"

    @property
    def routes_path(self) -> Path:
        assert self.tmp_dir is not None
        return self.tmp_dir / "routes"

    def _prepare(self) -> None:
        assert self.tmp_dir is not None
        rundir = self.tmp_dir / "run"
        logdir = self.tmp_dir / "log"
        rundir.mkdir()
        logdir.mkdir()
        text = _PUSHPIN_CONFIG.format(
            rundir=rundir,
            logdir=logdir,
            routesfile=self.routes_path,
            loopback=LOOPBACK,
            http_port=self.http_port,
            control_port=self.control_port,
            sig_key=self.sig_key,
            log_level=self.log_level,
        )
        self.config_path.write_text(_apply_overrides(text, self.overrides))
        self.set_upstream(self.upstream)

    def set_upstream(self, upstream: str) -> None:
        """Point every path at ``host:port``.

        Pushpin notices the changed routes file by itself, about a second later
        (measured 1.1 s); poll for the new upstream rather than sleeping.
        """
        self.upstream = upstream
        # First match wins, so the probe route comes first.
        self.routes_path.write_text(
            f"*,path_beg={self.PROBE_PATH} {LOOPBACK}:{self.probe_port}\n* {upstream}\n"
        )

    def _command(self) -> list[str]:
        return [self.binary, "--config", str(self.config_path), "--merge-output"]

    def _wait_ready(self, deadline: float) -> None:
        self._poll_until(
            lambda: http_status(LOOPBACK, self.control_port, "/") is not None,
            deadline,
            "the control port",
        )
        # Both ports answer ~100 ms before the proxy's zmq link to the handler is
        # up; until then a GRIP hold fails with "500 Accept service unavailable".
        # So wait until a GRIP stream hold really works, through a probe upstream.
        probe = ThreadingHTTPServer((LOOPBACK, self.probe_port), _GripProbeHandler)
        probe.daemon_threads = True
        thread = threading.Thread(target=probe.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            self._poll_until(
                # A request that reaches condure before the proxy has connected to
                # it can hang, so give up on each attempt quickly and try again.
                lambda: http_status(LOOPBACK, self.http_port, self.PROBE_PATH, timeout=0.5) == 200,
                deadline,
                "a GRIP stream hold through the client port",
            )
        finally:
            probe.shutdown()
            probe.server_close()

    def _read_logs(self) -> str:
        if self.tmp_dir is None:
            return self._final_log
        parts = [super()._read_logs()]
        for path in sorted((self.tmp_dir / "log").glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')}")
        return "\n".join(parts)


def _apply_overrides(config: str, overrides: Mapping[str, Mapping[str, str]]) -> str:
    """Set ``key=value`` inside ``[section]`` of an INI text, appending missing keys."""
    if not overrides:
        return config
    lines = config.splitlines()
    pending = {section: dict(keys) for section, keys in overrides.items()}
    out: list[str] = []
    section: str | None = None

    def flush(current: str | None) -> None:
        for key, value in pending.pop(current, {}).items() if current else ():
            out.append(f"{key}={value}")

    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            flush(section)
            section = stripped[1:-1]
        elif section in pending and "=" in stripped and not stripped.startswith("#"):
            key = stripped.split("=", 1)[0].strip()
            if key in pending[section]:
                out.append(f"{key}={pending[section].pop(key)}")
                continue
        out.append(line)
    flush(section)
    for name, keys in pending.items():
        out.append(f"[{name}]")
        out.extend(f"{key}={value}" for key, value in keys.items())
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Convenience
# --------------------------------------------------------------------------


@contextlib.contextmanager
def running(*servers: ManagedProcess) -> Iterator[tuple[ManagedProcess, ...]]:
    """Start several servers in order; stop them in reverse, whatever happens."""
    started: list[ManagedProcess] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        yield servers
    finally:
        for server in reversed(started):
            server.stop()
