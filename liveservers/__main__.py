"""``python -m liveservers postgres -- COMMAND [ARG...]``

Runs COMMAND with ``VERITY_DATABASE_URL`` naming a throw-away PostgreSQL
cluster on loopback, started before COMMAND and removed after it, and exits
with COMMAND's status. Django reads its settings when COMMAND starts, which
is why the cluster comes from outside (a pytest fixture would be too late).

Without PostgreSQL installed it runs nothing and exits 0, saying so, as a
live test skips; under ``CI=true`` that is a failure (exit 1).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from liveservers.processes import PostgresServer, postgres_bindir

USAGE = "usage: python -m liveservers postgres -- COMMAND [ARG...]"


def _missing_postgres(command: Sequence[str]) -> int:
    message = "liveservers: PostgreSQL (initdb, postgres) is not installed"
    if os.environ.get("CI", "").lower() == "true":
        print(f"{message} (CI=true, so this fails instead of skipping)", file=sys.stderr)
        return 1
    print(f"{message}; skipped: {shlex.join(command)}", file=sys.stderr)
    return 0


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds through the with-block, which stops the cluster;
    # the default action would leave it running in its own session.
    raise SystemExit(128 + signum)


def run_with_postgres(command: Sequence[str]) -> int:
    bindir = postgres_bindir()
    if bindir is None or not all((bindir / name).exists() for name in ("initdb", "postgres")):
        return _missing_postgres(command)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with PostgresServer(bindir=bindir) as server:
        print(f"liveservers: PostgreSQL at {server.database_url}", file=sys.stderr, flush=True)
        env = {**os.environ, "VERITY_DATABASE_URL": server.database_url}
        return subprocess.run(command, env=env, check=False).returncode


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[0] != "postgres" or argv[1] != "--":
        print(USAGE, file=sys.stderr)
        return 2
    return run_with_postgres(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
