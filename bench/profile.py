"""Profile what verity_django adds to a benchmark's request, in one process.

    .venv/bin/python -m bench.profile w1|w2|w3|w4 [--iterations N] [--postgres] [--html out.html]
    .venv/bin/python -m bench.profile w1|w2|w3|w4 --calls   # calls per function, on minus off

Runs the benchmark's operation through Django's test client (W1, W2, W4) or
the ORM (W3) on a fresh SQLite file, first timing it with verity disabled and
enabled (interleaved), then under pyinstrument with verity enabled. It
prints the A/B numbers, the time spent under ``verity_django`` frames (the
outermost such frame per stack), and pyinstrument's call tree.

Under uvicorn every request runs its sync code in a new thread, which is
emulated by dropping django-eventstream's per-thread objects (its storage and
channel manager) before each request, as a new thread would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from bench.harness import BENCH_SETTINGS, CLIENT_ID, postgres_database, sqlite_database
from liveservers.processes import RedisServer


def _verity_seconds(frame: Any) -> float:
    """Time under the outermost verity_django frames of a pyinstrument tree.

    The middleware's ``__call__`` wraps the whole request, so it is looked
    through rather than counted.
    """
    path = frame.file_path or ""
    wraps_request = path.endswith("verity_django/middleware.py") and frame.function in (
        "__call__",
        "__acall__",
    )
    if "verity_django" in path and not wraps_request:
        return float(frame.time)
    return sum(_verity_seconds(child) for child in frame.children)


@contextlib.contextmanager
def _environment(benchmark: str, *, postgres: bool) -> Iterator[None]:
    todos = {"w3": 10_000, "w4": 200}.get(benchmark, 0)
    with contextlib.ExitStack() as stack:
        os.environ.update({"DJANGO_SETTINGS_MODULE": BENCH_SETTINGS, "DJANGO_DEBUG": "0"})
        if postgres:
            url = stack.enter_context(postgres_database(todos=todos))
            os.environ["VERITY_DATABASE_URL"] = url
        else:
            db = stack.enter_context(sqlite_database(todos=todos))
            os.environ["VERITY_SQLITE_PATH"] = str(db)
        if benchmark == "w2":
            os.environ["VERITY_REDIS"] = stack.enter_context(RedisServer()).address
        yield


def _operation(benchmark: str) -> Callable[[int], None]:
    from django.contrib.auth import get_user_model
    from django.db import models
    from django.test import Client
    from django_eventstream import utils

    from testproject.todos.models import Todo

    alice = get_user_model().objects.get(username="alice")
    if benchmark == "w3":
        opted = Todo.objects.filter(owner=alice)
        plain = models.QuerySet(Todo).filter(owner=alice)

        def update(i: int) -> None:
            from verity_django.conf import conf

            queryset = opted if conf.ENABLED else plain
            queryset.update(status="done" if i % 2 else "active")

        return update

    client = Client(
        HTTP_X_VERITY_DIRECTIVE_REQUEST="send me directives", HTTP_X_CLIENT_ID=CLIENT_ID
    )
    client.force_login(alice)
    todo = Todo.objects.filter(owner=alice).order_by("id").first()
    assert todo is not None

    def fresh_thread() -> None:
        if hasattr(utils.tlocal, "loaded"):
            del utils.tlocal.loaded

    def patch(i: int) -> None:
        fresh_thread()
        response = client.patch(
            f"/api/todos/{todo.pk}/",
            {"status": "done" if i % 2 else "active"},
            content_type="application/json",
        )
        assert response.status_code == 200, response.content

    def save_many(i: int) -> None:
        fresh_thread()
        response = client.post("/bench/save-many/", {"count": 200}, content_type="application/json")
        assert response.status_code == 200, response.content

    return save_many if benchmark == "w4" else patch


def _calls(run: Callable[[int], None], iterations: int, *, enabled: bool) -> Counter[str]:
    """Python and C calls made by ``iterations`` operations, each under the
    innermost verity_django function on its stack (else ``(elsewhere)``)."""
    from django.test.utils import override_settings

    counts: Counter[str] = Counter()

    def where(frame: Any) -> str:
        found = frame
        while found is not None:
            path = found.f_code.co_filename
            if "verity_django/" in path:
                return path.rsplit("verity_django/", 1)[1] + ":" + found.f_code.co_name
            found = found.f_back
        return "(elsewhere)"

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            counts[where(frame)] += 1

    toggle = contextlib.nullcontext() if enabled else override_settings(VERITY={"ENABLED": False})
    with toggle:
        sys.setprofile(count)
        try:
            for i in range(iterations):
                run(i)
        finally:
            sys.setprofile(None)
    return counts


def _print_calls(run: Callable[[int], None], iterations: int, per: int) -> None:
    """Calls per ``per``-th of an operation (a save of W4's 200), verity on
    minus off; the receivers are connected on both sides, as in the benchmarks."""
    off = _calls(run, iterations, enabled=False)
    on = _calls(run, iterations, enabled=True)
    scale = iterations * per
    print(
        f"Python calls per {'operation' if per == 1 else f'1/{per} operation'}: "
        f"off {sum(off.values()) / scale:,.1f}, on {sum(on.values()) / scale:,.1f}"
    )
    rows = sorted(set(on) | set(off), key=lambda key: off[key] - on[key])
    for key in rows:
        extra = (on[key] - off[key]) / scale
        if abs(extra) >= 0.1:
            print(f"  {extra:8.2f}  {key}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("benchmark", choices=["w1", "w2", "w3", "w4"])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--html", default="")
    parser.add_argument("--postgres", action="store_true", help="a PostgreSQL database")
    parser.add_argument(
        "--calls",
        action="store_true",
        help="count calls per function instead of timing (per save for w4)",
    )
    args = parser.parse_args()
    with _environment(args.benchmark, postgres=args.postgres):
        import django

        django.setup()
        from django.test.utils import override_settings
        from pyinstrument import Profiler

        run = _operation(args.benchmark)
        if args.calls:
            run(0)
            run(1)
            _print_calls(run, min(args.iterations, 10), 200 if args.benchmark == "w4" else 1)
            return
        off = override_settings(VERITY={"ENABLED": False})
        times: dict[str, list[float]] = {"disabled": [], "enabled": []}
        for i in range(args.iterations // 10 + 2):
            for name in ("disabled", "enabled") if i % 2 else ("enabled", "disabled"):
                with off if name == "disabled" else contextlib.nullcontext():
                    began = time.perf_counter()
                    run(i)
                    times[name].append((time.perf_counter() - began) * 1000)
        disabled = statistics.median(times["disabled"][2:])
        enabled = statistics.median(times["enabled"][2:])
        print(
            f"{args.benchmark}: median {disabled:.3f} ms disabled, {enabled:.3f} ms enabled, "
            f"+{enabled - disabled:.3f} ms ({enabled / disabled:.3f}x)"
        )
        profiler = Profiler(interval=0.0002)
        profiler.start()
        for i in range(args.iterations):
            run(i)
        profiler.stop()
        session = profiler.last_session
        assert session is not None
        root = session.root_frame()
        assert root is not None
        under = _verity_seconds(root)
        print(
            f"under verity_django frames: {under / args.iterations * 1000:.3f} ms per operation "
            f"of {session.duration / args.iterations * 1000:.3f} ms profiled"
        )
        print(profiler.output_text(unicode=True, color=False, show_all=False))
        if args.html:
            with open(args.html, "w") as out:
                out.write(profiler.output_html())


if __name__ == "__main__":
    main()
