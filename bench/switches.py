"""W5's load with the server's CPU time and context switches per request.

``python -m bench.switches [--postgres] [--repetitions N] [--requests N]``

W5's server is CPU-bound through the GIL, so its throughput follows its CPU
time per request, and on this machine much of that time goes to context
switches: every call that lets go of the GIL (a database statement, a socket
write, ``os.urandom``, a thread wake-up) hands it to another request thread
(bench/README.md, "Stop 20"). ``python -m bench.calls`` counts Python calls,
which do not show this. This runs the same load as W5 (8 logged-in clients
PATCHing their own todos through one uvicorn worker, one SSE listener) and
prints, per side, the throughput, the server's CPU time per request (from
``/proc``, all threads, exited ones included) and, when ``perf`` is on the
PATH, its context switches per request (``perf stat -p``, which follows the
threads each request starts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import http_bench

_CLIENTS = 8
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    rate: float
    cpu_ms: float
    switches: float | None


def _cpu_seconds(pid: int) -> float:
    # utime and stime, fields 14 and 15, after the parenthesised command name.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _counting_switches(pid: int) -> subprocess.Popen[str] | None:
    perf = shutil.which("perf")
    if perf is None:
        return None
    counter = subprocess.Popen(
        [perf, "stat", "-x", ",", "-e", "context-switches", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # perf attaches to the threads before the load starts
    return counter


def _switches(counter: subprocess.Popen[str] | None) -> float | None:
    if counter is None:
        return None
    counter.send_signal(signal.SIGINT)
    _, err = counter.communicate(timeout=10)
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("context-switches") and parts[0].isdigit():
            return float(parts[0])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--requests", type=int, default=60, help="per client and run")
    args = parser.parse_args()
    per_run = _CLIENTS * args.requests
    with http_bench.two_servers(
        redis=False, todos=_CLIENTS, listener=True, postgres=args.postgres
    ) as sides:
        pools = {side.name: http_bench.concurrent_clients(side, _CLIENTS) for side in sides}

        def run(side: http_bench.Side) -> Run:
            counter = _counting_switches(side.server.pid)
            cpu = _cpu_seconds(side.server.pid)
            began = time.perf_counter()
            http_bench.patch_concurrently(pools[side.name], args.requests)
            wall = time.perf_counter() - began
            cpu = _cpu_seconds(side.server.pid) - cpu
            switches = _switches(counter)
            return Run(
                per_run / wall,
                cpu / per_run * 1000,
                None if switches is None else switches / per_run,
            )

        baseline, verity = sides
        run(baseline)
        run(verity)  # warm-up
        runs: dict[str, list[Run]] = {baseline.name: [], verity.name: []}
        for rep in range(args.repetitions):
            for side in (baseline, verity) if rep % 2 == 0 else (verity, baseline):
                runs[side.name].append(run(side))
        for pool in pools.values():
            for client, _ in pool[1:]:
                client.close()
    database = "PostgreSQL" if args.postgres else "SQLite"
    print(f"W5 load ({database}), {args.repetitions} runs per side, medians:")
    for name, mine in runs.items():
        known = [r.switches for r in mine if r.switches is not None]
        switches = f"{statistics.median(known):.1f}" if known else "n/a (no perf)"
        print(
            f"  {name:8}  {statistics.median(r.rate for r in mine):6.1f} req/s  "
            f"server CPU {statistics.median(r.cpu_ms for r in mine):5.2f} ms/request  "
            f"context switches {switches}/request"
        )
    paired = [
        (v.rate / b.rate, v.cpu_ms / b.cpu_ms)
        for b, v in zip(runs[baseline.name], runs[verity.name], strict=True)
    ]
    print(
        f"  verity/baseline: throughput {statistics.median(p[0] for p in paired):.3f}, "
        f"CPU per request {statistics.median(p[1] for p in paired):.3f} (medians of pairs)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
