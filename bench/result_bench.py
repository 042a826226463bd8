"""R1: what sending ``result`` at the maximal level costs, and what it saves.

Two verity servers, identical but for ``VERITY_DEMO_RESULT``: the demo's
PATCH of a todo without ``result`` (the baseline) and with the todo at its
maximal level (``expanded``) in ``result``, interleaved as in W1. The
difference of the medians is the cost of building and carrying the payload
(serializing the todo, encoding it in the pull copy and in the envelope).

What it saves: every other window holding the todo would otherwise refetch
it once (the widest level it holds covers the narrower ones, so at most one
``GET ?level=expanded``); that GET is timed on the same server.
"""

from __future__ import annotations

import json
import time

import httpx

from bench.harness import wait_until
from bench.http_bench import Sizes, _checked, _first_todo, measure, two_servers
from bench.report import Result, median


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
        notes = [
            f"payload `result` at `expanded`: {payload_bytes} bytes; building and carrying it "
            f"costs {cost:+.2f} ms per PATCH (difference of medians)",
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
                "refetch_expanded_median_ms": refetch,
                "refetch_expanded_bytes": refetch_bytes,
                "requests_per_side": with_result.requests,
            },
        )
