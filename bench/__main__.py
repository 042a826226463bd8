"""Run the benchmark suite: ``python -m bench [--quick] [--only W1,F1]``.

Use ``./scripts/bench``, which raises the open-file limit the fan-out
benchmarks need and uses the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from bench import fanout, http_bench, inproc, result_bench
from bench.report import Result, table, write


@dataclass(frozen=True)
class Benchmark:
    id: str
    run: Callable[[bool], list[Result]]


LISTENER = True  # --no-listener turns it off for W1, W2, W4


def _w1(quick: bool) -> list[Result]:
    return [http_bench.run_patch("W1", redis=False, sizes=_http_sizes(quick))]


def _w1h(quick: bool) -> list[Result]:
    return [http_bench.run_handwritten(_http_sizes(quick))]


def _w5(quick: bool) -> list[Result]:
    requests, repetitions = (10, 8) if quick else (20, 16)
    return [
        http_bench.run_concurrent(
            postgres=postgres, clients=8, requests=requests, repetitions=repetitions
        )
        for postgres in (False, True)
    ]


def _w2(quick: bool) -> list[Result]:
    return [http_bench.run_patch("W2", redis=True, sizes=_http_sizes(quick))]


def _http_sizes(quick: bool) -> http_bench.Sizes:
    if quick:
        return http_bench.Sizes(repetitions=5, requests=30, warmup=20, listener=LISTENER)
    return http_bench.Sizes(repetitions=9, requests=150, warmup=50, listener=LISTENER)


def _r1(quick: bool) -> list[Result]:
    return [result_bench.run_result(_http_sizes(quick))]


def _w3(quick: bool) -> list[Result]:
    results = [inproc.run_w3(repetitions=11 if quick else 41)]
    if not quick:
        # SQLite updates 10,000 rows in a few ms, so fixed costs weigh more
        # there than on a server database; PostgreSQL shows the other end.
        results.append(inproc.run_w3(repetitions=21, postgres=True))
    return results


def _w4(quick: bool) -> list[Result]:
    sizes = (
        http_bench.Sizes(repetitions=5, requests=3, warmup=2, listener=LISTENER)
        if quick
        # Each side's median moves by a third between repetitions on 2 shared
        # cores (43-69 ms): 9 x 10 requests left the ratio anywhere in
        # 1.02-1.20 from one run to the next.
        else http_bench.Sizes(repetitions=15, requests=16, warmup=4, listener=LISTENER)
    )
    return [http_bench.run_save_many(sizes)]


def _f1(quick: bool) -> list[Result]:
    return fanout.run_f1_m1(
        clients=300 if quick else 1000, rounds=6 if quick else 25, raw_view_m1=not quick
    )


def _p1(quick: bool) -> list[Result]:
    return [fanout.run_replay_cost(clients=300 if quick else 1000, rounds=6 if quick else 15)]


def _f2(quick: bool) -> list[Result]:
    return [fanout.run_f2(clients=1000 if quick else 10000, rounds=5 if quick else 12)]


def _f3(quick: bool) -> list[Result]:
    return [inproc.run_f3(repetitions=5 if quick else 9, envelopes=1000 if quick else 3000)]


BENCHMARKS = [
    Benchmark("W1", _w1),
    Benchmark("W1h", _w1h),
    Benchmark("W2", _w2),
    Benchmark("W3", _w3),
    Benchmark("W4", _w4),
    Benchmark("W5", _w5),
    Benchmark("F1", _f1),  # also M1
    Benchmark("P1", _p1),  # F1 and M1 with replay positions on against off
    Benchmark("F2", _f2),
    Benchmark("F3", _f3),
    Benchmark("R1", _r1),
]


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated ids to run (W1,W1h,W2,W3,W4,W5,F1,P1,F2,F3,R1; M1 is F1)",
    )
    parser.add_argument(
        "--no-listener",
        action="store_true",
        help="W1/W2/W4 without the SSE listener on each server (to separate delivery cost)",
    )
    args = parser.parse_args()
    global LISTENER
    LISTENER = not args.no_listener
    wanted = {x.strip().upper() for x in args.only.split(",") if x.strip()}
    if "M1" in wanted:
        wanted.add("F1")
    nofile = _raise_nofile()
    print(f"open-file limit: {nofile}", flush=True)
    began = time.monotonic()
    results: list[Result] = []
    failed: list[str] = []
    for bench in BENCHMARKS:
        if wanted and bench.id.upper() not in wanted:
            continue
        started = time.monotonic()
        load = os.getloadavg()[0]
        print(f"== {bench.id} (load average {load:.2f}) ...", flush=True)
        try:
            found = bench.run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(bench.id)
            continue
        for r in found:
            r.details["load_average_before"] = load
            r.details["load_average_after"] = os.getloadavg()[0]
            r.details["seconds"] = round(time.monotonic() - started, 1)
        results.extend(found)
        for r in found:
            ratio = "" if r.ratio is None else f" ratio {r.ratio:.3f}"
            print(
                f"   {r.id}: baseline {r.baseline} verity {r.verity}{ratio} "
                f"({'pass' if r.passed else 'MISS' if r.passed is False else 'n/a'}) "
                f"in {time.monotonic() - started:.0f}s",
                flush=True,
            )
            for note in r.notes:
                print(f"      {note}", flush=True)
    seconds = time.monotonic() - began
    print()
    print(table(results))
    path = write(results, quick=args.quick, seconds=seconds)
    print(f"\n{len(results)} results in {seconds:.0f}s, written to {path}")
    if failed:
        print(f"benchmarks that crashed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
