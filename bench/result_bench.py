"""R1: what sending ``result`` at the maximal level costs, and what it saves.

Two verity servers, identical but for ``VERITY_DEMO_RESULT``: the demo's
PATCH of a todo without ``result`` (the baseline) and with the todo at its
maximal level (``expanded``) in ``result``, interleaved as in W1. The
difference of the medians is the cost of building and carrying the payload
(serializing the todo, encoding it in the pull copy and in the envelope).
Building the payload alone is also timed in one process (``python -m
bench.result_bench build``): ``TODO_LEVELS.payload(todo, MAXIMAL)`` and its
JSON encoding, the work a save adds.

What it saves: every other window holding the todo would otherwise refetch
it once (the widest level it holds covers the narrower ones, so at most one
``GET ?level=expanded``); that GET is timed on the same server.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from bench.harness import python_json, run_bench_module, sqlite_database, wait_until
from bench.http_bench import Sizes, _checked, _first_todo, measure, two_servers
from bench.report import Result, median

BUILDS_PER_SAMPLE = 200


def run_result(sizes: Sizes) -> Result:
    envs = ({"VERITY_DEMO_RESULT": "0"}, {"VERITY_DEMO_RESULT": "1"})
    with two_servers(redis=False, todos=0, listener=sizes.listener, envs=envs) as (
        without,
        with_result,
    ):
        todo = {side.name: _first_todo(side.client) for side in (without, with_result)}
        sample = _checked(
            with_result.client.patch(f"/api/todos/{todo['verity']}/", json={"status": "done"})
        ).json()
        [item] = [
            x for x in sample["directives"] if x["op"] == "refresh_item" and x["name"] == "todo"
        ]
        payload_bytes = len(json.dumps(item["result"], separators=(",", ":")).encode())
        with_result.requests += 1
        plain = _checked(
            without.client.patch(f"/api/todos/{todo['baseline']}/", json={"status": "done"})
        ).json()
        without.requests += 1
        if any("result" in x for x in plain["directives"]):
            raise AssertionError("the baseline server sent a result")

        def patch(client: httpx.Client, i: int) -> httpx.Response:
            side = "verity" if client is with_result.client else "baseline"
            status = "active" if i % 2 == 0 else "done"
            return client.patch(f"/api/todos/{todo[side]}/", json={"status": status})

        measure(without, with_result, patch, sizes)
        base = median([median(x) for x in without.latencies])
        ver = median([median(x) for x in with_result.latencies])

        refetch_ms: list[float] = []
        refetch_bytes = 0
        url = f"/api/todos/{todo['verity']}/?level=expanded"
        for _ in range(sizes.requests):
            began = time.perf_counter()
            response = _checked(with_result.client.get(url))
            refetch_ms.append((time.perf_counter() - began) * 1000)
            refetch_bytes = len(response.content)
        refetch = median(refetch_ms)

        delivered = not with_result.counter.hello or wait_until(
            lambda: with_result.counter.count() >= with_result.requests, timeout=10
        )
        ratio = ver / base
        cost = ver - base
        build_us = _build_cost_us(samples=sizes.requests)
        notes = [
            f"payload `result` at `expanded`: {payload_bytes} bytes; building it (serializer + "
            f"JSON) takes {build_us:.0f} µs in-process; building and carrying it costs "
            f"{cost:+.2f} ms per PATCH (difference of medians)",
            f"saved per other window holding the todo: one GET ?level=expanded, "
            f"{refetch:.2f} ms median and {refetch_bytes} bytes, plus its round trip",
        ]
        if not delivered:
            notes.append("the listener did not get one envelope per request")
        return Result(
            id="R1",
            what="PATCH /api/todos/&lt;id&gt;/ with `result` at the maximal level vs without",
            unit="ms",
            baseline=base,
            verity=ver,
            ratio=ratio,
            target="ratio ≤ 1.10",
            passed=ratio <= 1.10 and delivered,
            notes=notes,
            details={
                "without_rep_medians_ms": [median(x) for x in without.latencies],
                "with_result_rep_medians_ms": [median(x) for x in with_result.latencies],
                "payload_bytes": payload_bytes,
                "build_cost_ms": cost,
                "build_in_process_us": build_us,
                "refetch_expanded_median_ms": refetch,
                "refetch_expanded_bytes": refetch_bytes,
                "requests_per_side": with_result.requests,
            },
        )


def _build_cost_us(samples: int) -> float:
    with sqlite_database(todos=1) as db:
        out = python_json(
            run_bench_module(
                "bench.result_bench",
                "build",
                "--samples",
                str(samples),
                env={"VERITY_SQLITE_PATH": str(db)},
            )
        )
    return float(out["median_us"])


def _build(samples: int) -> dict[str, Any]:
    import django

    django.setup()
    from testproject.todos.models import Todo
    from testproject.todos.serializers import TODO_LEVELS
    from verity_django import directives as d
    from verity_django.contrib.rest_framework import MAXIMAL

    todo = Todo.objects.order_by("pk").first()
    assert todo is not None
    per_build: list[float] = []
    for _ in range(samples):
        began = time.perf_counter()
        for _ in range(BUILDS_PER_SAMPLE):
            d.dumps(TODO_LEVELS.payload(todo, MAXIMAL).as_json())
        per_build.append((time.perf_counter() - began) * 1e6 / BUILDS_PER_SAMPLE)
    return {"median_us": median(per_build), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["build"])
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(_build(args.samples)))


if __name__ == "__main__":
    main()
