"""The protocol vector table, run against verity-client.js and VerityConsumer.

Each vector must hold for each implementation. A strict xfail below is a known
disagreement, named; it turns into a failure the day the implementation is
fixed, so that the mark is removed with the fix.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.protocol import harness

PYTHON_DISAGREES: dict[str, str] = {}
JS_DISAGREES: dict[str, str] = {}

TABLE = harness.load_table()
WORLD = TABLE["world"]
Observe = Callable[[dict[str, Any]], dict[str, list[harness.Observation | None]]]


@pytest.fixture(scope="session")
def observe(node: harness.NodeRunner) -> Observe:
    """Both implementations' observations of a vector, each vector run once per session
    (the JS test of a vector reports the Python consumer's view too, and back)."""
    cache: dict[str, dict[str, list[harness.Observation | None]]] = {}

    def run(vector: dict[str, Any]) -> dict[str, list[harness.Observation | None]]:
        if vector["name"] not in cache:
            cache[vector["name"]] = {
                "js": list(node.run(WORLD, vector)),
                "python": harness.run_python(WORLD, vector),
            }
        return cache[vector["name"]]

    return run


def check(observe: Observe, vector: dict[str, Any], implementation: str) -> None:
    observed = observe(vector)
    expected = harness.expected_observations(vector)
    found = harness.mismatches(
        vector, expected, observed[implementation], harness.MODELLED[implementation]
    )
    assert not found, harness.report(vector, implementation, expected, observed, found)


def _cases(known: dict[str, str]) -> list[Any]:
    unknown = set(known) - {v["name"] for v in TABLE["vectors"]}
    assert not unknown, f"xfail marks name vectors that are not in the table: {unknown}"
    return [
        pytest.param(
            v,
            id=v["name"],
            marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=known[v["name"]])]
            if v["name"] in known
            else [],
        )
        for v in TABLE["vectors"]
    ]


@pytest.mark.parametrize("vector", _cases(JS_DISAGREES))
def test_js_client(observe: Observe, vector: dict[str, Any]) -> None:
    check(observe, vector, "js")


@pytest.mark.parametrize("vector", _cases(PYTHON_DISAGREES))
def test_python_consumer(observe: Observe, vector: dict[str, Any]) -> None:
    check(observe, vector, "python")


def test_table_covers_every_outcome_and_step_kind() -> None:
    steps = [step for v in TABLE["vectors"] for step in v["steps"]]
    expectations = [step["expect"] for step in steps if "expect" in step]
    assert len(TABLE["vectors"]) >= 30
    outcomes = {e["outcome"] for e in expectations}
    every = {"start", "current", "gap", "reset", "echo", "seq-only", "applied", "skipped"}
    assert outcomes >= every, every - outcomes
    results = {r for e in expectations for r in e.get("directives", [])}
    assert results == {"applied", "echo", "skip", "invalid"}, results
    kinds = {kind for step in steps for kind in harness.STEP_KINDS if kind in step}
    assert kinds == set(harness.STEP_KINDS), kinds
    envelopes = [s["push"] for s in steps if s.get("push", {}).get("type") == "directives"]
    # Pushed envelopes are losing their source on the server side; the client still reads it.
    assert any("source" in e for e in envelopes)
    assert any("source" not in e for e in envelopes)


def test_a_wrong_expectation_is_reported_naming_vector_and_both_outcomes(
    observe: Observe,
) -> None:
    (vector,) = [v for v in TABLE["vectors"] if v["name"] == "echo-then-foreign-looks-like-gap"]
    broken = copy.deepcopy(vector)
    broken["name"] = "echo-then-foreign-looks-like-gap (expectation broken on purpose)"
    third = broken["steps"][2]["expect"]
    assert third["outcome"] == "gap"
    third["outcome"] = "applied"
    third["resync"] = False
    for implementation in ("js", "python"):
        with pytest.raises(AssertionError) as failure:
            check(observe, broken, implementation)
        message = str(failure.value)
        assert f"vector {broken['name']!r}: {implementation} disagrees" in message
        assert "step 3: push directives global seq=7 source=them" in message
        assert "outcome: expected applied" in message
        assert "outcome: js       gap" in message
        assert "outcome: python   gap" in message
        assert "resync: expected false" in message
    # The unbroken vector passes for both, so it is the edit that was caught.
    check(observe, vector, "js")
    check(observe, vector, "python")


def test_both_open_the_stream_at_the_same_url(node: harness.NodeRunner) -> None:
    vector = {"name": "connect only", "steps": []}
    js = httpx.URL(node.answer(WORLD, vector)["stream_url"])
    consumer = harness.python_consumer(WORLD)
    python = httpx.URL(consumer.url, params=consumer.params)
    assert (js.path, js.params.multi_items()) == (python.path, python.params.multi_items())
    assert js.params.get_list("audience") == WORLD["audiences"]
    assert js.params["client_id"] == WORLD["client_id"]


def test_a_misspelt_expectation_field_is_refused(tmp_path: Path) -> None:
    step = {"pull": [], "expect": {"outcome": "applied", "fetch": ["collection todos {}"]}}
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps({"world": WORLD, "vectors": [{"name": "typo", "steps": [step]}]}))
    with pytest.raises(
        AssertionError, match=r"vector 'typo' step 1: expect has unknown fields \['fetch'\]"
    ):
        harness.load_table(path)
