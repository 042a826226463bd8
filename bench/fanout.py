"""F1, M1, F2: fan-out latency to many SSE clients, and memory per connection.

The clients live in a separate process (``bench.sse_load``), so that their
own work does not run on the server's event loop; both share the machine's
two cores, as the brief's loopback setup implies.

- F1/M1: 1,000 clients on ``/api/events?audience=global`` of one uvicorn
  worker (in-process delivery, SQLite storage). Publish rounds alternate a
  verity envelope (a Project update, committed) and the same envelope sent
  with raw ``django_eventstream.send_event``. M1 is the server's RSS growth
  over those connections. In a full run, the same is measured on
  django-eventstream's own view (``/bench/raw-events``) with raw sends only,
  to show what is django-eventstream's own cost, and on an async view that
  streams nothing (``/bench/idle-stream``): the floor of Django + uvicorn.
- F2: 10,000 clients held by Pushpin, Django publishing through GRIP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from bench.harness import (
    BenchAsgiServer,
    login,
    python_json,
    run_bench_module,
    sqlite_database,
)
from bench.report import Result, median, percentile
from liveservers.processes import Pushpin, free_port, session_members

WARMUP_ROUNDS = 2  # per mode; dropped from the statistics


def _sse_load(
    *,
    port: int,
    path: str,
    clients: int,
    publish_port: int,
    rounds: int,
    modes: Sequence[str],
    rss_pids: Sequence[int] = (),
    ready: str = "hello",
    connect_budget: float = 120,
    concurrency: int = 50,
    gap: float = 0.5,
    timeout: float = 600,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    stdout = run_bench_module(
        "bench.sse_load",
        "--port",
        str(port),
        "--path",
        path,
        "--clients",
        str(clients),
        "--publish-port",
        str(publish_port),
        "--rounds",
        str(rounds + WARMUP_ROUNDS if rounds else 0),
        "--modes",
        ",".join(modes),
        "--rss-pids",
        ",".join(str(p) for p in rss_pids),
        "--ready",
        ready,
        "--connect-budget",
        str(connect_budget),
        "--concurrency",
        str(concurrency),
        "--gap",
        str(gap),
        *extra,
        timeout=timeout,
    )
    out: dict[str, Any] = python_json(stdout)
    return out


def _by_mode(out: dict[str, Any], mode: str, warmup: int = WARMUP_ROUNDS) -> dict[str, Any]:
    """Statistics of one mode's rounds, warm-up rounds dropped.

    ``all`` is the latency until every client had the envelope (the round's
    maximum); ``p50``/``p99`` are taken over rounds. ``client`` pools the
    per-client p50 of each round.
    """
    rounds = [r for r in out["rounds"] if r["mode"] == mode][warmup:]
    complete = [r for r in rounds if r["received"] == r["expected"]]
    every = [r["max"] for r in complete]
    return {
        "rounds": len(rounds),
        "incomplete_rounds": len(rounds) - len(complete),
        "missing_deliveries": sum(r["expected"] - r["received"] for r in rounds),
        "all_p50_ms": median(every) if every else float("nan"),
        "all_p99_ms": percentile(every, 99),
        "all_max_ms": max(every) if every else float("nan"),
        "client_p50_ms": median([r["p50"] for r in complete]) if complete else float("nan"),
        "client_p99_ms": median([r["p99"] for r in complete]) if complete else float("nan"),
    }


def _connected_note(out: dict[str, Any]) -> str:
    note = (
        f"{out['clients_connected']:,}/{out['clients_wanted']:,} clients connected "
        f"in {out['connect_seconds']:.1f}s"
    )
    if out["connect_errors"]:
        note += f", failed attempts (retried up to 3 times): {out['connect_errors']}"
    if out.get("lost_connections"):
        note += f", {out['lost_connections']} closed by the server side after connecting"
    return note


def run_f1_m1(*, clients: int, rounds: int, raw_view_m1: bool) -> list[Result]:
    with sqlite_database() as db, BenchAsgiServer(env={"VERITY_SQLITE_PATH": str(db)}) as server:
        out = _sse_load(
            port=server.port,
            path="/api/events?audience=global",
            clients=clients,
            publish_port=server.port,
            rounds=rounds,
            modes=("raw", "verity"),
            rss_pids=[server.pid],
        )
    raw = _by_mode(out, "raw")
    verity = _by_mode(out, "verity")
    ratio = verity["all_p50_ms"] / raw["all_p50_ms"]
    complete = out["clients_connected"] == clients and not (
        raw["incomplete_rounds"] or verity["incomplete_rounds"]
    )
    f1 = Result(
        id="F1",
        what=(
            f"commit → envelope at every one of {out['clients_connected']:,} SSE clients, "
            "one uvicorn (p50 over rounds; ratio of p50s)"
        ),
        unit="ms",
        baseline=raw["all_p50_ms"],
        verity=verity["all_p50_ms"],
        ratio=ratio,
        target="p99 ≤ 250 ms, ratio ≤ 1.20",
        passed=complete and verity["all_p99_ms"] <= 250 and ratio <= 1.2,
        notes=[
            f"p99 over {verity['rounds']} rounds: verity {verity['all_p99_ms']:.0f} ms, "
            f"raw send_event {raw['all_p99_ms']:.0f} ms",
            f"per-client median latency: verity {verity['client_p50_ms']:.0f} ms, "
            f"raw {raw['client_p50_ms']:.0f} ms",
            _connected_note(out),
        ],
        details={"raw": raw, "verity": verity, "load": out},
    )
    per_connection = float(out.get("rss_per_connection_kib", float("nan")))
    m1 = Result(
        id="M1",
        what=f"server RSS per idle SSE connection ({out['clients_connected']:,} connections)",
        unit="KiB",
        baseline=None,
        verity=per_connection,
        target="≤ 64 KiB",
        passed=per_connection <= 64,
        notes=[
            f"RSS {out['rss_before_kib'] / 1024:.0f} → {out['rss_after_kib'] / 1024:.0f} MiB, "
            f"threads {out.get('threads_before')} → {out.get('threads_after')}",
        ],
        details={k: v for k, v in out.items() if k.startswith(("rss", "threads"))},
    )
    if raw_view_m1:
        _references(f1, m1, clients=clients, rounds=max(rounds // 2, 5))
    return [f1, m1]


def _references(f1: Result, m1: Result, *, clients: int, rounds: int) -> None:
    """The same load on django-eventstream's own view (raw sends only), and
    the memory floor of any held-open Django response under uvicorn."""
    with sqlite_database() as db, BenchAsgiServer(env={"VERITY_SQLITE_PATH": str(db)}) as server:
        out = _sse_load(
            port=server.port,
            path="/bench/raw-events",
            clients=clients,
            publish_port=server.port,
            rounds=rounds,
            modes=("raw",),
            rss_pids=[server.pid],
            ready="stream-open",
        )
    # A fresh server: one that already held 1,000 connections reuses their memory.
    with sqlite_database() as db, BenchAsgiServer(env={"VERITY_SQLITE_PATH": str(db)}) as server:
        floor = _sse_load(
            port=server.port,
            path="/bench/idle-stream",
            clients=clients,
            publish_port=server.port,
            rounds=0,
            modes=(),
            rss_pids=[server.pid],
            ready="stream-open",
        )
    raw = _by_mode(out, "raw")
    per_connection = float(out.get("rss_per_connection_kib", float("nan")))
    floor_kib = float(floor.get("rss_per_connection_kib", float("nan")))
    m1.baseline = per_connection
    m1.notes.append(
        f"baseline = django-eventstream's own view alone: {per_connection:.0f} KiB per connection"
    )
    m1.notes.append(
        f"floor: an async Django view streaming nothing, no database: {floor_kib:.0f} KiB "
        f"per connection ({floor.get('threads_after', 0) - floor.get('threads_before', 0)} "
        f"threads for {floor['clients_connected']} connections)"
    )
    m1.details["eventstream_view"] = {k: v for k, v in out.items() if k != "rounds"}
    m1.details["idle_stream_floor"] = floor
    f1.notes.append(
        f"django-eventstream's own view + raw send_event (no verity code at all): "
        f"p50 {raw['all_p50_ms']:.0f} ms, p99 {raw['all_p99_ms']:.0f} ms over {raw['rounds']} "
        f"rounds; {_connected_note(out)}"
    )
    f1.details["eventstream_view"] = {"raw": raw, "load": out}


def run_f2(*, clients: int, rounds: int) -> Result:
    port = free_port()
    overrides = {
        # Pushpin's default of 2,500 messages/s would alone spread one message
        # to 10,000 connections over 4 s; the baseline gets the same setting.
        "handler": {"message_rate": "1000000", "message_hwm": "1000000"},
        "runner": {"client_maxconn": str(clients + 2000)},
    }
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(Pushpin(f"127.0.0.1:{port}", overrides=overrides, log_level=1))
        db = stack.enter_context(sqlite_database())
        server = stack.enter_context(
            BenchAsgiServer(
                env={"VERITY_SQLITE_PATH": str(db), "VERITY_GRIP_URL": proxy.control_url},
                port=port,
            )
        )
        out = _sse_load(
            port=proxy.http_port,
            path="/api/events?audience=global",
            clients=clients,
            publish_port=server.port,
            rounds=rounds,
            modes=("raw", "verity"),
            rss_pids=session_members(proxy.pid),
            connect_budget=300,
            concurrency=100,
            gap=0.5,
            timeout=900,
        )
    raw = _by_mode(out, "raw")
    verity = _by_mode(out, "verity")
    complete = out["clients_connected"] == clients and not (
        raw["incomplete_rounds"] or verity["incomplete_rounds"]
    )
    per_connection = out.get("rss_per_connection_kib")
    return Result(
        id="F2",
        what=(
            f"commit → envelope at every one of {out['clients_connected']:,} clients held by "
            "Pushpin, GRIP publish (p50 over rounds)"
        ),
        unit="ms",
        baseline=raw["all_p50_ms"],
        verity=verity["all_p50_ms"],
        ratio=verity["all_p50_ms"] / raw["all_p50_ms"],
        target="p99 ≤ 1 s",
        passed=complete and verity["all_p99_ms"] <= 1000,
        notes=[
            f"p99 over {verity['rounds']} rounds: verity {verity['all_p99_ms']:.0f} ms, "
            f"raw GRIP publish (send_event) {raw['all_p99_ms']:.0f} ms",
            _connected_note(out),
            f"Pushpin RSS per connection: {per_connection:.1f} KiB"
            if per_connection is not None
            else "Pushpin RSS not measured",
        ],
        details={"raw": raw, "verity": verity, "load": out},
    )


def run_replay_cost(*, clients: int, rounds: int) -> Result:
    """P1: F1 and M1 with replay positions tracked against not, same run.

    Every client is logged in and has a client id of its own, so with
    tracking on the server keeps one position per connection; with
    ``REPLAY_RETENTION = 0`` it keeps none. Two servers, started one after the
    other with the same load; verity publishes only.
    """
    loads: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    # off, on, on, off: a machine that gets busier or quieter during the run
    # weighs on both sides alike.
    for tracking in ("off", "on", "on", "off"):
        retention = "300" if tracking == "on" else "0"
        with (
            sqlite_database() as db,
            BenchAsgiServer(
                env={"VERITY_SQLITE_PATH": str(db), "VERITY_REPLAY_RETENTION": retention}
            ) as server,
        ):
            client = login(server.base_url)
            try:
                cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
            finally:
                client.close()
            out = _sse_load(
                port=server.port,
                path="/api/events?audience=global",
                clients=clients,
                publish_port=server.port,
                rounds=rounds,
                modes=("verity",),
                rss_pids=[server.pid],
                extra=("--cookie", cookie, "--client-ids"),
            )
        loads[tracking].append(out)
    measured = {tracking: _pooled(outs) for tracking, outs in loads.items()}
    off, on = measured["off"], measured["on"]
    ratio = on["all_p50_ms"] / off["all_p50_ms"]
    per_off, per_on = off["rss_per_connection_kib"], on["rss_per_connection_kib"]
    return Result(
        id="P1",
        what=(
            f"replay positions: F1 p50 with tracking on vs off ({clients:,} logged-in "
            "clients, a client id each)"
        ),
        unit="ms",
        baseline=off["all_p50_ms"],
        verity=on["all_p50_ms"],
        ratio=ratio,
        target="ratio ≤ 1.10, M1 +≤ 4 KiB",
        passed=ratio <= 1.10 and per_on - per_off <= 4,
        notes=[
            f"p99: on {on['all_p99_ms']:.0f} ms, off {off['all_p99_ms']:.0f} ms",
            f"M1: on {per_on:.1f} KiB, off {per_off:.1f} KiB per connection",
            "; ".join(_connected_note(out) for outs in loads.values() for out in outs),
        ],
        details={"pooled": measured, "loads": loads},
    )


def _pooled(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's statistics over its runs: rounds pooled, M1 as the median."""
    pooled = {"rounds": [r for out in outs for r in _kept_rounds(out, "verity")]}
    stats = _by_mode({"rounds": pooled["rounds"]}, "verity", warmup=0)
    per = [float(out.get("rss_per_connection_kib", float("nan"))) for out in outs]
    return {**stats, "rss_per_connection_kib": median(per)}


def _kept_rounds(out: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [r for r in out["rounds"] if r["mode"] == mode][WARMUP_ROUNDS:]
