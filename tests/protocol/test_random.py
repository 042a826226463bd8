"""Random envelope sequences: verity-client.js, VerityConsumer and a reference model agree.

``Reference`` is the oracle: the client rules of docs/protocol.md, written as
plainly as possible, for a page that caches the collection ``todos`` (default
params) and the item ``todo:1``. It never looks at either implementation.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, find, given, settings

from tests.protocol import harness

WORLD = harness.load_table()["world"]
ME, OTHER = WORLD["client_id"], "them"
AUDIENCES = ("global", "user-1")
GIVEN = {
    "collections": [{"name": "todos", "params": {}}],
    "items": [{"name": "todo", "id": 1, "levels": ["default"]}],
}
TARGETS = {"refresh_collection": "collection todos {}", "refresh_item": "item todo:1 default"}
# Keys are remembered, and an item read by the page counts as recently used, for 5 minutes.
FIVE_MINUTES_MS = 5 * 60 * 1000
# The waits a sequence may contain: far from those five minutes, so the seconds
# a resync's jitter adds to the runner's clock never matter.
SHORT_WAIT, LONG_WAIT = 1_000, 400_000
MAX_STEPS = 25

# VERITY_FUZZ_SCALE (a multiplier) for a deeper run, as in tests/test_fuzz.py.
SCALE = max(1, int(os.environ.get("VERITY_FUZZ_SCALE", "1")))
RANDOM = settings(
    max_examples=150 * SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


@dataclass
class Reference:
    off_by_one_gap: bool = False  # a deliberately wrong rule, to show the comparison bites
    seqs: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    now: int = 0  # the item was read at 0
    item_cached: bool = True

    def step(self, step: dict[str, Any]) -> harness.Observation:
        if "wait_ms" in step:
            self.now += step["wait_ms"]
            return self._seen("waited", [], [])
        if "pull" in step:
            results, fetched = self._directives(step["pull"], pushed=False)
            return self._seen(self._summary(results), results, fetched)
        env = step["push"]
        audience, previous = env["audience"], self.seqs.get(env["audience"])
        if env["type"] == "hello":
            last = env["last_seq"]
            self.seqs[audience] = last
            if previous is None:
                return self._seen("start", [], [])
            if last > previous:
                return self._seen("gap", [], self._resync(), resync=True)
            return self._seen("reset" if last < previous else "current", [], [])
        if env.get("source") == ME:
            return self._seen("echo", [], [])
        seq = env["seq"]
        limit = previous if self.off_by_one_gap else (previous or 0) + 1
        gap = previous is not None and seq > limit
        self.seqs[audience] = seq if previous is None else max(previous, seq)
        results, fetched = self._directives(env["directives"], pushed=True)
        if gap:
            # The resync comes after the jitter, so after the directives' own fetches.
            return self._seen("gap", results, fetched + self._resync(), resync=True)
        return self._seen(self._summary(results) if results else "seq-only", results, fetched)

    def _directives(
        self, directives: list[dict[str, Any]], pushed: bool
    ) -> tuple[list[str], list[str]]:
        results: list[str] = []
        fetched: set[str] = set()
        for d in directives:
            key = d.get("idempotency_key")
            if pushed and d.get("source") == ME:
                results.append("echo")
            # Keys are never more than 2048 here, so only their age matters.
            elif (
                key is not None
                and key in self.keys
                and self.now - self.keys[key] <= FIVE_MINUTES_MS
            ):
                results.append("skip")
            else:
                if key is not None:
                    self.keys[key] = self.now
                results.append("applied")
                # Several refreshes of one target in one list are one fetch; an item
                # no longer cached is not fetched.
                if d["op"] == "refresh_collection" or self.item_cached:
                    fetched.add(TARGETS[d["op"]])
        return results, sorted(fetched)

    @staticmethod
    def _summary(results: list[str]) -> str:
        return "applied" if not results or "applied" in results else "skipped"

    def _resync(self) -> list[str]:
        """Every cached collection is refetched; an item not read for five minutes
        is forgotten instead."""
        self.item_cached = self.item_cached and self.now <= FIVE_MINUTES_MS
        return [TARGETS["refresh_collection"]] + [TARGETS["refresh_item"]] * self.item_cached

    def _seen(
        self, outcome: str, results: list[str], fetches: list[str], resync: bool = False
    ) -> harness.Observation:
        return {
            "outcome": outcome,
            "seqs": dict(self.seqs),
            "resync": resync,
            "directives": results,
            "fetches": sorted(fetches),
            "reloads": [],
        }


def reference(
    steps: list[dict[str, Any]], off_by_one_gap: bool = False
) -> list[harness.Observation]:
    model = Reference(off_by_one_gap=off_by_one_gap)
    return [model.step(s) for s in steps]


# --------------------------------------------------------------------------
# Sequences
# --------------------------------------------------------------------------


def directive(full: bool) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.none() | st.sampled_from([f"k{i}" for i in range(5)]) if full else st.none()
    sources = st.sampled_from([None, OTHER, ME]) if full else st.none()

    def build(op: str, key: str | None, source: str | None) -> dict[str, Any]:
        d: dict[str, Any] = {"op": op, "name": "todos"}
        if op == "refresh_item":
            d.update(name="todo", id=1)
        if key is not None:
            d["idempotency_key"] = key
        if source is not None:
            d["source"] = source
        return d

    return st.builds(build, st.sampled_from(sorted(TARGETS)), keys, sources)


def hello() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda a, n: {"push": {"type": "hello", "audience": a, "last_seq": n}},
        st.sampled_from(AUDIENCES),
        st.integers(0, 12),
    )


def envelope(full: bool) -> st.SearchStrategy[dict[str, Any]]:
    def build(
        a: str, seq: int, source: str | None, directives: list[dict[str, Any]]
    ) -> dict[str, Any]:
        env: dict[str, Any] = {"type": "directives", "seq": seq, "audience": a}
        if source is not None:
            env["source"] = source
        env["directives"] = directives
        return {"push": env}

    return st.builds(
        build,
        st.sampled_from(AUDIENCES),
        st.integers(1, 14),
        st.sampled_from([None, OTHER, ME]),
        st.lists(directive(full), max_size=3),
    )


def sequences(full: bool) -> st.SearchStrategy[list[dict[str, Any]]]:
    """``full`` adds what VerityConsumer does not model: pulls, repeated keys,
    directives carrying their own source, and time passing."""
    step = hello() | envelope(full)
    if full:
        pull = st.builds(lambda ds: {"pull": ds}, st.lists(directive(True), min_size=1, max_size=3))
        wait = st.builds(lambda ms: {"wait_ms": ms}, st.sampled_from([SHORT_WAIT, LONG_WAIT]))
        step = step | pull | wait
    return st.lists(step, min_size=1, max_size=MAX_STEPS)


def as_vector(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "random", "given": GIVEN, "steps": copy.deepcopy(steps)}


def disagreement(
    steps: list[dict[str, Any]],
    want: list[harness.Observation],
    observed: dict[str, list[harness.Observation | None]],
    implementation: str,
) -> str | None:
    vector = as_vector(steps)
    found = harness.mismatches(
        vector, want, observed[implementation], harness.MODELLED[implementation]
    )
    if not found:
        return None
    return harness.report(
        vector, implementation, want, {"oracle": want, **observed}, found, against="the oracle"
    )


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


@RANDOM
@given(steps=sequences(full=False))
def test_both_clients_and_the_oracle_agree_on_seq_and_echo(
    node: harness.NodeRunner, steps: list[dict[str, Any]]
) -> None:
    vector = as_vector(steps)
    want = reference(steps)
    observed: dict[str, list[harness.Observation | None]] = {
        "js": list(node.run(WORLD, vector)),
        "python": harness.run_python(WORLD, vector),
    }
    for implementation in observed:
        problem = disagreement(steps, want, observed, implementation)
        assert problem is None, problem


@RANDOM
@given(steps=sequences(full=True))
def test_js_client_and_the_oracle_agree_with_keys_pulls_and_time(
    node: harness.NodeRunner, steps: list[dict[str, Any]]
) -> None:
    vector = as_vector(steps)
    observed: dict[str, list[harness.Observation | None]] = {"js": list(node.run(WORLD, vector))}
    problem = disagreement(steps, reference(steps), observed, "js")
    assert problem is None, problem


def test_an_off_by_one_gap_rule_is_caught(node: harness.NodeRunner) -> None:
    def oracle_is_caught(steps: list[dict[str, Any]]) -> bool:
        observed: dict[str, list[harness.Observation | None]] = {
            "js": list(node.run(WORLD, as_vector(steps)))
        }
        return (
            disagreement(steps, reference(steps, off_by_one_gap=True), observed, "js") is not None
        )

    found = find(
        sequences(full=False),
        oracle_is_caught,
        # The first sequence that tells the rules apart will do: no shrinking.
        settings=settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate]),
    )
    observed: dict[str, list[harness.Observation | None]] = {
        "js": list(node.run(WORLD, as_vector(found)))
    }
    message = disagreement(found, reference(found, off_by_one_gap=True), observed, "js")
    assert message is not None
    assert "outcome: expected gap" in message, message
