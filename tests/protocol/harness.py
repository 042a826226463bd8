"""One table of protocol vectors, run against both client implementations.

The demo's ``verity-client.js`` runs in node (``run_vectors.mjs``, one long-lived
process speaking JSON lines); the tests' ``VerityConsumer`` runs in-process,
fed SSE bytes through its own parser. Both report every step as the same
*observation*, so a vector's expectation, the JS client and the Python
consumer can be compared field by field.

An observation has these fields:

- ``outcome``: for a hello ``start`` (audience not tracked before), ``current``
  (same seq), ``gap`` (higher: missed envelopes) or ``reset`` (lower); for an
  envelope ``echo`` (own ``source``: dropped before seq bookkeeping),
  ``seq-only`` (tracked, carries no directive), ``gap`` (seq jumped ahead),
  ``applied`` (at least one directive applied) or ``skipped`` (none applied);
  for a pull ``applied`` or ``skipped``; ``waited`` for a clock step.
- ``seqs``: the tracked seq per audience after the step.
- ``resync``: whether the step made the client resync.
- ``directives``: per top-level directive of the step: ``applied``, ``echo``
  (own source on the directive), ``skip`` (idempotency key seen) or ``invalid``.
- ``fetches``: what the client fetched, sorted: ``item todo:1 expanded``,
  ``collection todos {"done":true}`` (params as JSON with sorted keys). A
  resync's refetches count for the step that caused it.
- ``reloads``: ``soft`` or ``hard``, per page reload.

``VerityConsumer`` keeps no cache, so it cannot tell what a client would
fetch or reload: ``PYTHON_UNMODELLED`` lists those fields, which its
observations leave out. Its idempotency memory runs on a clock the steps move.
"""

from __future__ import annotations

import copy
import json
import os
import selectors
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.live.sse import SSEParser, VerityConsumer

HERE = Path(__file__).resolve().parent
TABLE = HERE / "vectors.json"
RUNNER = HERE / "run_vectors.mjs"
CLIENT_JS = HERE.parents[1] / "testproject" / "static" / "verity_demo" / "verity-client.js"
NODE = os.environ.get("VERITY_NODE", "/usr/bin/node")

FIELDS: tuple[str, ...] = ("outcome", "seqs", "resync", "directives", "fetches", "reloads")
PYTHON_UNMODELLED = frozenset({"fetches", "reloads"})
# The fields each implementation's observations are compared on.
MODELLED: dict[str, tuple[str, ...]] = {
    "js": FIELDS,
    "python": tuple(f for f in FIELDS if f not in PYTHON_UNMODELLED),
}
STEP_KINDS = ("push", "pull", "wait_ms")

Observation = dict[str, Any]


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------


def load_table(path: Path = TABLE) -> dict[str, Any]:
    table: dict[str, Any] = json.loads(path.read_text())
    names = [v["name"] for v in table["vectors"]]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"vector names must be unique: {duplicated}"
    for vector in table["vectors"]:
        for index, step in enumerate(vector["steps"], 1):
            _check_step_shape(vector["name"], index, step)
        vector["steps"] = [expand_step(step) for step in vector["steps"]]
    return table


def _check_step_shape(name: str, index: int, step: Mapping[str, Any]) -> None:
    # A misspelt field would silently take its default and test nothing.
    where = f"vector {name!r} step {index}"
    kinds = [k for k in STEP_KINDS if k in step]
    assert len(kinds) == 1, f"{where}: needs exactly one of {STEP_KINDS}, has {sorted(step)}"
    assert set(step) <= {*STEP_KINDS, "expect"}, f"{where}: unknown keys {sorted(step)}"
    assert "expect" in step or kinds == ["wait_ms"], f"{where}: has no expect"
    unknown = set(step.get("expect", {})) - set(FIELDS)
    assert not unknown, f"{where}: expect has unknown fields {sorted(unknown)}"


def expand_step(step: Mapping[str, Any]) -> dict[str, Any]:
    """``{"repeat": N, ...}`` entries stand for N copies, ``{i}`` numbered from 0.

    They keep vectors about the 2048-key limit readable; both implementations
    and the comparison only ever see the expanded lists.
    """
    out = copy.deepcopy(dict(step))
    if "pull" in out:
        out["pull"] = _expand(out["pull"])
    if "push" in out and isinstance(out["push"].get("directives"), list):
        out["push"]["directives"] = _expand(out["push"]["directives"])
    if "directives" in out.get("expect", {}):
        out["expect"]["directives"] = _expand(out["expect"]["directives"])
    return out


def _expand(items: Sequence[Any]) -> list[Any]:
    expanded: list[Any] = []
    for item in items:
        if isinstance(item, dict) and "repeat" in item:
            template = item["each"]
            expanded.extend(_numbered(template, i) for i in range(item["repeat"]))
        else:
            expanded.append(item)
    return expanded


def _numbered(template: Any, i: int) -> Any:
    if isinstance(template, str):
        return template.replace("{i}", str(i))
    if isinstance(template, dict):
        return {k: _numbered(v, i) for k, v in template.items()}
    if isinstance(template, list):
        return [_numbered(v, i) for v in template]
    return template


def expected_observations(vector: Mapping[str, Any]) -> list[Observation]:
    """A step's expectation with its defaults: no resync, directive, fetch or
    reload, and the seqs the previous step left."""
    seqs: dict[str, int] = {}
    out: list[Observation] = []
    for step in vector["steps"]:
        expect = step.get("expect", {"outcome": "waited"} if "wait_ms" in step else {})
        seqs = dict(expect.get("seqs", seqs))
        out.append(
            {
                "outcome": expect["outcome"],
                "seqs": seqs,
                "resync": expect.get("resync", False),
                "directives": expect.get("directives", []),
                "fetches": sorted(expect.get("fetches", [])),
                "reloads": expect.get("reloads", []),
            }
        )
    return out


def describe_step(step: Mapping[str, Any]) -> str:
    if "push" in step:
        env = step["push"]
        if env.get("type") == "hello":
            return f"push hello {env.get('audience')} last_seq={env.get('last_seq')}"
        source = f" source={env['source']}" if "source" in env else ""
        count = len(env.get("directives") or [])
        return (
            f"push directives {env.get('audience')} seq={env.get('seq')}{source} "
            f"({count} directive{'s' * (count != 1)})"
        )
    if "pull" in step:
        count = len(step["pull"])
        return f"pull ({count} directive{'s' * (count != 1)})"
    return f"wait {step['wait_ms']} ms"


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------


def mismatches(
    vector: Mapping[str, Any],
    expected: Sequence[Observation],
    observed: Sequence[Observation | None],
    fields: Sequence[str] = FIELDS,
) -> list[tuple[int, str]]:
    """(step index, field) where an observation differs from the expectation.

    A ``None`` observation, or a field an observation leaves out, is a step or
    field that implementation does not model.
    """
    assert len(observed) == len(vector["steps"]), (vector["name"], len(observed))
    found: list[tuple[int, str]] = []
    for index, (want, got) in enumerate(zip(expected, observed, strict=True)):
        if got is None:
            continue
        found.extend((index, f) for f in fields if f in got and got[f] != want[f])
    return found


def report(
    vector: Mapping[str, Any],
    implementation: str,
    expected: Sequence[Observation],
    observed: Mapping[str, Sequence[Observation | None]],
    found: Sequence[tuple[int, str]],
    against: str = "the table",
) -> str:
    """A readable account of where ``implementation`` left the expectation,
    with what every implementation saw at that step."""
    lines = [f"vector {vector['name']!r}: {implementation} disagrees with {against}"]
    if vector.get("about"):
        lines.append(f"  ({vector['about']})")
    for index in sorted({i for i, _ in found}):
        fields = [f for i, f in found if i == index]
        lines.append(f"  step {index + 1}: {describe_step(vector['steps'][index])}")
        for field_name in fields:
            lines.append(f"    {field_name}: expected {_show(expected[index][field_name])}")
            for name, observations in observed.items():
                got = observations[index]
                shown = "not modelled" if got is None or field_name not in got else got[field_name]
                lines.append(f"    {field_name}: {name:<8} {_show(shown)}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 300 else text[:300] + "…"


# --------------------------------------------------------------------------
# The Python consumer
# --------------------------------------------------------------------------


def python_consumer(world: Mapping[str, Any]) -> VerityConsumer:
    return VerityConsumer(
        base_url="http://127.0.0.1:9",  # never dialled
        audiences=tuple(world["audiences"]),
        client_id=world["client_id"],
    )


def run_python(world: Mapping[str, Any], vector: Mapping[str, Any]) -> list[Observation | None]:
    """Feeds the steps to a ``VerityConsumer`` as SSE bytes, with no network."""
    consumer = python_consumer(world)
    now = [0.0]
    consumer.clock = lambda: now[0]
    parser = SSEParser()
    observations: list[Observation | None] = []
    for step in vector["steps"]:
        if "pull" in step:
            outcomes = consumer.pulled(step["pull"])
            observations.append(
                {
                    "outcome": "applied" if "applied" in outcomes else "skipped",
                    "seqs": dict(consumer.tracked),
                    "resync": False,
                    "directives": list(outcomes),
                }
            )
            continue
        if "wait_ms" in step:
            now[0] += step["wait_ms"] / 1000
            observations.append(
                {
                    "outcome": "waited",
                    "seqs": dict(consumer.tracked),
                    "resync": False,
                    "directives": [],
                }
            )
            continue
        observations.append(_push_to_python(consumer, parser, step["push"]))
    return observations


def _push_to_python(
    consumer: VerityConsumer, parser: SSEParser, envelope: Mapping[str, Any]
) -> Observation:
    before = dict(consumer.tracked)
    counts = (
        len(consumer.envelopes),
        len(consumer.gaps),
        len(consumer.resyncs),
        len(consumer.errors),
    )
    wire = "data: " + json.dumps(envelope) + "\n\n"
    for event in parser.feed(wire.encode()):
        consumer.feed(1, event)
    envelopes, gaps = consumer.envelopes[counts[0] :], consumer.gaps[counts[1] :]
    errors = consumer.errors[counts[3] :]
    outcomes: list[str] = []
    if errors:
        outcome = "error: " + errors[0].kind
    elif envelope.get("type") == "hello":
        audience = envelope["audience"]
        previous, last = before.get(audience), envelope["last_seq"]
        if previous is None:
            outcome = "start"
        elif gaps:
            outcome = "gap"
        else:
            outcome = "reset" if last < previous else "current"
    elif envelopes and envelopes[0].echo_dropped:
        outcome = "echo"
    else:
        outcomes = list(envelopes[0].outcomes) if envelopes else []
        if gaps:
            outcome = "gap"
        elif not outcomes:
            outcome = "seq-only"
        else:
            outcome = "applied" if "applied" in outcomes else "skipped"
    return {
        "outcome": outcome,
        "seqs": dict(consumer.tracked),
        "resync": len(consumer.resyncs) > counts[2],
        "directives": outcomes,
    }


# --------------------------------------------------------------------------
# The JS client, in node
# --------------------------------------------------------------------------


class NodeRunner:
    """One ``node run_vectors.mjs`` process; every exchange has a deadline."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        # A file, not a pipe: a chatty node must never block on a full stderr pipe.
        self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self._process = subprocess.Popen(
            [NODE, str(RUNNER), str(CLIENT_JS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
        )
        assert self._process.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._process.stdout, selectors.EVENT_READ)
        self._buffer = b""

    def run(self, world: Mapping[str, Any], vector: Mapping[str, Any]) -> list[Observation]:
        observations: list[Observation] = self.answer(world, vector)["observations"]
        return observations

    def answer(self, world: Mapping[str, Any], vector: Mapping[str, Any]) -> dict[str, Any]:
        """The runner's whole answer: observations and the stream URL the client opened."""
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"world": world, "vector": vector}).encode() + b"\n")
        process.stdin.flush()
        answer: dict[str, Any] = json.loads(self._read_line())
        if "error" in answer:
            raise RuntimeError(f"run_vectors.mjs failed on {vector['name']!r}:\n{answer['error']}")
        return answer

    def _read_line(self) -> bytes:
        assert self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            if not self._selector.select(self.timeout):
                self._process.kill()
                self.close()
                raise TimeoutError(f"run_vectors.mjs gave no answer within {self.timeout}s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                stderr = self._stderr()
                raise RuntimeError(f"run_vectors.mjs exited ({self._process.poll()}): {stderr}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stderr(self) -> str:
        self._process.wait(timeout=5)
        self._stderr_file.seek(0)
        text = self._stderr_file.read().decode(errors="replace")[-2000:]
        self.close()
        return text

    def close(self) -> None:
        if self._selector.get_map() is not None:
            self._selector.close()
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        assert self._process.stdout is not None
        self._process.stdout.close()
        self._stderr_file.close()
