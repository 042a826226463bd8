"""W5's load on both servers at once: a throughput ratio the machine's drift
moves less.

``python -m bench.parallel [--postgres] [--windows N] [--seconds S]
[--a K=V,...] [--b K=V,...]``

W5 runs its sides one after the other, and this machine's speed changes by
a third within minutes (bench/README.md, "Stop 22"), so its paired ratios
spread over 0.66-1.17. Here 8 clients load each server continuously and at
the same time, and each window's ratio is side B's requests over side A's:
both sides meet the same machine at the same moment. They also share its
two cores, so this compares the work each side does per request; it is not
W5's figure. The median still moves by about ±3% between runs: run it
twice, and both ways round (``--a`` and ``--b`` swapped), before trusting a
difference.

``--a`` and ``--b`` set each server's environment (default: verity off,
then on); bench.settings reads ``VERITY_ENABLED`` and the other
``VERITY_*`` variables.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import httpx

from bench import http_bench
from liveservers.processes import ServerError

_CLIENTS = 8


def _environment(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"expected K=V,K=V, got {text!r}")
    return dict(pairs)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--windows", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=4.0, help="per window")
    parser.add_argument("--a", default="VERITY_ENABLED=0")
    parser.add_argument("--b", default="VERITY_ENABLED=1")
    args = parser.parse_args()
    envs = (_environment(args.a), _environment(args.b))
    with http_bench.two_servers(
        redis=False, todos=_CLIENTS, listener=True, postgres=args.postgres, envs=envs
    ) as sides:
        pools = {side.name: http_bench.concurrent_clients(side, _CLIENTS) for side in sides}
        done = {side.name: 0 for side in sides}
        lock = threading.Lock()
        stop = threading.Event()
        errors: list[BaseException] = []

        def load(name: str, client: httpx.Client, todo: int) -> None:
            i = 0
            try:
                while not stop.is_set():
                    status = "active" if i % 2 == 0 else "done"
                    response = client.patch(f"/api/todos/{todo}/", json={"status": status})
                    if response.status_code >= 400:
                        raise ServerError(f"{response.status_code} {response.text[:300]}")
                    with lock:
                        done[name] += 1
                    i += 1
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=load, args=(name, client, todo), daemon=True)
            for name, pool in pools.items()
            for client, todo in pool
        ]
        for thread in threads:
            thread.start()
        ratios: list[float] = []
        try:
            time.sleep(3)  # both sides warm
            for _ in range(args.windows):
                with lock:
                    before = dict(done)
                if stop.wait(args.seconds):
                    break
                with lock:
                    after = dict(done)
                a = after["baseline"] - before["baseline"]
                b = after["verity"] - before["verity"]
                ratios.append(b / a if a else float("nan"))
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            for pool in pools.values():
                for client, _ in pool[1:]:
                    client.close()
    if errors:
        raise errors[0]
    print(
        f"B ({args.b}) / A ({args.a}), {'PostgreSQL' if args.postgres else 'SQLite'}, "
        f"{len(ratios)} windows of {args.seconds:g} s: median {statistics.median(ratios):.3f}, "
        f"spread {min(ratios):.3f}-{max(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
