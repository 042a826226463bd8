"""W3 and F3: benchmarks that run inside one Django process.

The orchestrator (``run_w3``/``run_f3``) starts ``python -m bench.inproc`` in
a subprocess, because each needs its own settings (SQLite file, Redis) at
``django.setup()`` time. The subprocess interleaves baseline and verity
repetitions and prints one JSON line.

- W3: ``QuerySet.update()`` of 10,000 rows through the opted-in
  ``Todo.objects`` (a ``DirectiveManager``) against ``models.QuerySet(Todo)``,
  both inside ``capture_directives()`` to count what is emitted. The timing
  includes publishing the envelope (SQLite storage).
- F3: envelopes published per second from one process with Redis storage and
  pub/sub: ``publishing.publish()`` against ``django_eventstream.send_event``
  of the same envelope. A loop of bare redis-py ``PUBLISH`` calls of the same
  payload is measured too, as the floor one round trip sets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.harness import postgres_database, python_json, run_bench_module, sqlite_database
from bench.report import Result, median
from liveservers.processes import RedisServer

W3_ROWS = 10_000
# Issue 11: envelopes per second one process sustains with Redis.
F3_TARGET = 5_000

# --------------------------------------------------------------------------
# Orchestrator side (no Django here)
# --------------------------------------------------------------------------


def run_w3(repetitions: int, *, postgres: bool = False) -> Result:
    with contextlib.ExitStack() as stack:
        if postgres:
            env = {"VERITY_DATABASE_URL": stack.enter_context(postgres_database(todos=W3_ROWS))}
        else:
            env = {"VERITY_SQLITE_PATH": str(stack.enter_context(sqlite_database(todos=W3_ROWS)))}
        out = python_json(
            run_bench_module("bench.inproc", "w3", "--repetitions", str(repetitions), env=env)
        )
    base = median(out["baseline_ms"])
    ver = median(out["verity_ms"])
    ratio = ver / base
    directives = max(out["verity_directives"])
    envelopes = max(out["verity_envelopes"])
    passed = ratio <= 1.05 and directives <= 3 and not any(out["baseline_directives"])
    return Result(
        id="W3" + (" (PostgreSQL)" if postgres else ""),
        what=f"QuerySet.update() of {W3_ROWS:,} rows, median time "
        + ("(PostgreSQL, same machine)" if postgres else "(SQLite)"),
        unit="ms",
        baseline=base,
        verity=ver,
        ratio=ratio,
        target="ratio ≤ 1.05, ≤ 3 directives",
        passed=passed,
        notes=[f"{directives} directives in {envelopes} envelope(s) per update()"],
        details=out,
    )


def run_f3(repetitions: int, envelopes: int) -> Result:
    with RedisServer() as redis_server, sqlite_database() as db:
        out = python_json(
            run_bench_module(
                "bench.inproc",
                "f3",
                "--repetitions",
                str(repetitions),
                "--envelopes",
                str(envelopes),
                env={"VERITY_SQLITE_PATH": str(db), "VERITY_REDIS": redis_server.address},
            )
        )
    raw_rate = median(out["raw_per_s"])
    verity_rate = median(out["verity_per_s"])
    ratio = raw_rate / verity_rate
    notes = [
        f"bare redis-py PUBLISH floor: {median(out['floor_per_s']):,.0f}/s",
        "ratio = raw envelopes/s ÷ verity envelopes/s (time per envelope, verity ÷ raw)",
    ]
    if out["failed"]:
        notes.append(f"{out['failed']} verity publishes failed")
    return Result(
        id="F3",
        what="sustained publish rate, one process, Redis (median envelopes/s)",
        unit="envelopes/s",
        baseline=raw_rate,
        verity=verity_rate,
        ratio=ratio,
        target=f"≥ {F3_TARGET:,}/s, ratio ≤ 1.3",
        passed=verity_rate >= F3_TARGET and ratio <= 1.3 and not out["failed"],
        notes=notes,
        details=out,
    )


# --------------------------------------------------------------------------
# Subprocess side
# --------------------------------------------------------------------------


def _interleave(
    repetitions: int, sides: dict[str, Callable[[], float]], warmup: int = 2
) -> dict[str, list[float]]:
    """Run each side ``warmup`` times, then ``repetitions`` times in alternating order."""
    for run in sides.values():
        for _ in range(warmup):
            run()
    names = list(sides)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        for name in names if rep % 2 == 0 else reversed(names):
            out[name].append(sides[name]())
    return out


def _w3(repetitions: int) -> dict[str, Any]:
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection, models

    from testproject.todos.models import Todo
    from verity_django.testing import capture_directives

    alice = get_user_model().objects.get(username="alice")
    opted = Todo.objects.filter(owner=alice)
    plain = models.QuerySet(Todo).filter(owner=alice)
    if opted.count() != W3_ROWS:
        raise SystemExit(f"alice has {opted.count()} todos, expected {W3_ROWS}")
    counts: dict[str, list[int]] = {"baseline": [], "verity": []}
    envelopes: list[int] = []
    statuses = iter(["done", "active"] * 1000)

    def settle() -> None:
        # On PostgreSQL every update leaves 10,000 dead tuples; vacuum between
        # runs (untimed) so that each starts from the same table.
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"VACUUM ANALYZE {Todo._meta.db_table}")

    def timed(name: str, queryset: Any) -> Callable[[], float]:
        def run() -> float:
            status = next(statuses)
            settle()
            with capture_directives() as captured:
                began = time.perf_counter()
                updated = queryset.update(status=status)
                elapsed = time.perf_counter() - began
            if updated != W3_ROWS:
                raise SystemExit(f"update() changed {updated} rows")
            counts[name].append(len(captured.directives))
            if name == "verity":
                envelopes.append(len(captured.audiences))
            return elapsed * 1000

        return run

    times = _interleave(
        repetitions, {"baseline": timed("baseline", plain), "verity": timed("verity", opted)}
    )
    sample: list[dict[str, Any]] = []
    with capture_directives() as captured:
        opted.update(status="active")
    sample = captured.bare
    return {
        "baseline_ms": times["baseline"],
        "verity_ms": times["verity"],
        "baseline_directives": counts["baseline"],
        "verity_directives": counts["verity"],
        "verity_envelopes": envelopes,
        "sample_directives": sample,
    }


def _f3(repetitions: int, envelopes: int) -> dict[str, Any]:
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django_eventstream import send_event

    from verity_django import directives as d
    from verity_django import envelopes as verity_envelopes
    from verity_django.publishing import counters, flush, publish

    stamp = {"timestamp": d.now_ms()}
    items = [
        d.refresh_item("project", 1).with_metadata(idempotency_key=uuid.uuid4().hex, **stamp),
        d.refresh_collection("projects").with_metadata(idempotency_key=uuid.uuid4().hex, **stamp),
    ]
    head, tail = verity_envelopes.parts("global", items, None)
    payload = json.loads(f"{head}0{tail}")
    floor_client = redis.Redis(**settings.EVENTSTREAM_REDIS)
    floor_message = json.dumps(
        {"channel": "verity.global", "event_type": "message", "data": head + "0" + tail}
    )

    def rate(loop: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            began = time.perf_counter()
            loop()
            return envelopes / (time.perf_counter() - began)

        return run

    def verity() -> None:
        for _ in range(envelopes):
            publish("global", items)
        assert flush(30)

    def raw() -> None:
        for _ in range(envelopes):
            send_event("verity.global", "message", payload)

    def floor() -> None:
        for _ in range(envelopes):
            floor_client.publish("events_channel", floor_message)

    failed_before = counters.failed
    rates = _interleave(
        repetitions, {"raw": rate(raw), "verity": rate(verity), "floor": rate(floor)}, warmup=1
    )
    return {
        "envelopes_per_repetition": envelopes,
        "raw_per_s": rates["raw"],
        "verity_per_s": rates["verity"],
        "floor_per_s": rates["floor"],
        "failed": counters.failed - failed_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("benchmark", choices=["w3", "f3"])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--envelopes", type=int, default=3000)
    args = parser.parse_args()
    if args.benchmark == "w3":
        result = _w3(args.repetitions)
    else:
        result = _f3(args.repetitions, args.envelopes)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
