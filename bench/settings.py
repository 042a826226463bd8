"""Django settings for benchmark servers: the demo project plus bench-only URLs.

The environment selects engines exactly as for ``testproject.settings``
(``VERITY_SQLITE_PATH``, ``VERITY_REDIS``, ``VERITY_GRIP_URL``,
``VERITY_ENABLED``); the benchmarks run with ``DJANGO_DEBUG=0``.
"""

from __future__ import annotations

import os
import sys

from testproject.settings import *  # noqa: F403
from testproject.settings import VERITY

VERITY = {**VERITY, "PUBLISH_INLINE": os.environ.get("VERITY_PUBLISH_INLINE", "1") == "1"}

# The rows measure the demo without `result` unless a row asks for it (R1).
DEMO_TODO_RESULT = os.environ.get("VERITY_DEMO_RESULT", "0") == "1"

ROOT_URLCONF = "bench.urls"

# python -m bench.calls: count this server's Python calls (see bench/calls.py).
# Only servers count: the migrate and seed commands it runs first inherit the
# variable.
if os.environ.get("BENCH_COUNT_CALLS_DIR") and "uvicorn" in sys.modules:
    from bench.calls import install

    install(
        os.environ["BENCH_COUNT_CALLS_DIR"],
        by_function=os.environ.get("BENCH_COUNT_CALLS_DIR_BY_FUNCTION") == "1",
    )

# Request logging of every 4xx would flood a server log during fan-out runs;
# errors still reach stderr.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "verity_django": {"handlers": ["console"], "level": "WARNING"},
        "django_eventstream": {"handlers": ["console"], "level": "WARNING"},
        "django.request": {"handlers": ["console"], "level": "ERROR"},
    },
}
