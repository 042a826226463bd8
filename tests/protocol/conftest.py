from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.protocol import harness


@pytest.fixture(scope="session")
def node() -> Iterator[harness.NodeRunner]:
    if not shutil.which(harness.NODE):
        pytest.fail(f"node is needed to run verity-client.js: {harness.NODE} not found")
    runner = harness.NodeRunner()
    yield runner
    runner.close()
