"""Statistics, the results table and the JSON written to ``bench/results/``."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Result:
    """One benchmark's outcome: the headline numbers and everything behind them."""

    id: str
    what: str
    unit: str
    baseline: float | None
    verity: float
    target: str
    passed: bool | None
    ratio: float | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if unit in ("ms", "KiB"):
        return f"{value:,.1f} {unit}"
    if unit == "envelopes/s":
        return f"{value:,.0f}/s"
    return f"{value:,.3g} {unit}"


def table(results: Sequence[Result]) -> str:
    lines = [
        "| # | metric | baseline | verity_django | ratio | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = "—" if r.ratio is None else f"{r.ratio:.3f}"
        verdict = {True: "pass", False: "**MISS**", None: "n/a"}[r.passed]
        lines.append(
            f"| {r.id} | {r.what} | {_fmt(r.baseline, r.unit)} | {_fmt(r.verity, r.unit)} "
            f"| {ratio} | {r.target} | {verdict} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import django

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for name in ("django-eventstream", "djangorestframework", "uvicorn", "httpx", "redis"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    try:
        pushpin = subprocess.run(
            ["pushpin", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        pushpin = "missing"
    try:
        redis_server = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError:
        redis_server = "missing"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "django": django.get_version(),
        "platform": platform.platform(),
        "pushpin": pushpin,
        "redis_server": redis_server,
        **versions,
    }


def write(results: Sequence[Result], *, quick: bool, seconds: float) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS_DIR / f"{stamp}{'-quick' if quick else ''}.json"
    payload = {
        "quick": quick,
        "seconds": round(seconds, 1),
        "machine": machine(),
        "results": [asdict(r) for r in results],
        "table": table(results),
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
