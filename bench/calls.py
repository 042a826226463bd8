"""W5's load with a count instead of a clock: Python calls per request.

``python -m bench.calls [--postgres] [--requests N] [--by-function]``

W5's throughput ratio spreads over 0.73-1.17 between paired runs on this
machine (bench/README.md), too wide to tell a change of a few percent. This
runs the same load (8 logged-in clients PATCHing their own todos through one
uvicorn worker, one SSE listener) while each server counts every Python and
C call in every thread (``sys.setprofile`` and ``threading.setprofile``), and
prints calls per request, verity on and off. Counting slows the servers
several times over, so the counts say what work verity adds (the request,
the push copy, the tailer and the stream), not how long it takes. What runs
on timers (the tailer's and the revocation watcher's polls) scales with the
run's length, so expect a spread of about ±100 calls per request.

``--by-function`` attributes each call to the innermost verity_django
function on its stack (else to its thread and package) and prints where
verity's side does more.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

# Set by this tool in the environment of the servers it starts; read by
# bench.settings, which then calls install().
ENV = "BENCH_COUNT_CALLS_DIR"
_CLIENTS = 8


def install(directory: str, *, by_function: bool) -> None:
    """Count calls in this process; SIGUSR1 writes the counts so far to
    ``directory/<pid>.json`` and starts the per-function counts afresh."""
    total = [0]
    detail: collections.Counter[str] = collections.Counter()
    # Walking the stack from the hook while Django imports its apps breaks
    # the imports (Python 3.11: AppConfig.create gets no class), so the
    # per-function counts begin with the first SIGUSR1, before the load.
    detailing = [False]

    def where(frame: FrameType) -> str:
        found: FrameType | None = frame
        while found is not None:
            path = found.f_code.co_filename
            if "verity_django" in path:
                return path.rsplit("verity_django/", 1)[1] + ":" + found.f_code.co_name
            found = found.f_back
        thread = threading.current_thread().name.split("-")[0]
        package = frame.f_code.co_filename.rsplit("site-packages/", 1)[-1].split("/")[0]
        return f"({thread} thread) {package}"

    def count(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            total[0] += 1
            if detailing[0]:
                detail[where(frame)] += 1

    def dump(signum: int, frame: FrameType | None) -> None:
        path = Path(directory) / f"{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"total": total[0], "detail": dict(detail)}))
        temporary.replace(path)
        detail.clear()
        detailing[0] = by_function

    sys.setprofile(count)
    threading.setprofile(count)
    signal.signal(signal.SIGUSR1, dump)


def _counts(directory: str, pid: int, timeout: float = 10.0) -> dict[str, Any]:
    path = Path(directory) / f"{pid}.json"
    path.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {pid} wrote no counts within {timeout} s")
        time.sleep(0.05)
    found: dict[str, Any] = json.loads(path.read_text())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calls", description=__doc__)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--requests", type=int, default=40, help="per client (8 clients)")
    parser.add_argument("--by-function", action="store_true")
    parser.add_argument("--rows", type=int, default=40, help="functions listed by --by-function")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        os.environ[ENV] = directory
        if args.by_function:
            os.environ[ENV + "_BY_FUNCTION"] = "1"
        from bench import http_bench

        n = _CLIENTS * args.requests
        per_request: dict[str, float] = {}
        details: dict[str, collections.Counter[str]] = {}
        with http_bench.two_servers(
            redis=False, todos=_CLIENTS, listener=True, postgres=args.postgres
        ) as sides:
            for side in sides:
                pairs = http_bench.concurrent_clients(side, _CLIENTS)
                http_bench.patch_concurrently(pairs, args.requests)  # warm-up
                before = _counts(directory, side.server.pid)
                http_bench.patch_concurrently(pairs, args.requests)
                if side.name == "verity":
                    # The push copies of the last requests reach the listener.
                    delivered = http_bench.wait_until(
                        lambda side=side: side.counter.count() >= 2 * n, timeout=15
                    )
                    if not delivered:
                        raise RuntimeError(f"the listener got {side.counter.count()} of {2 * n}")
                after = _counts(directory, side.server.pid)
                per_request[side.name] = (after["total"] - before["total"]) / n
                details[side.name] = collections.Counter(after["detail"])
                for client, _ in pairs[1:]:
                    client.close()

    base, verity = per_request["baseline"], per_request["verity"]
    database = "PostgreSQL" if args.postgres else "SQLite"
    print(f"W5 load ({database}), server Python calls per request:")
    print(
        f"  baseline {base:,.0f}  verity {verity:,.0f}  "
        f"(+{verity - base:,.0f}, ratio {verity / base:.3f})"
    )
    if args.by_function:
        b, v = details["baseline"], details["verity"]
        rows = sorted(set(b) | set(v), key=lambda k: b[k] - v[k])
        for key in rows[: args.rows]:
            print(f"  {(v[key] - b[key]) / n:8.1f}  {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
