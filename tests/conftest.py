from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Processes


@pytest.fixture
def paddler(tmp_path: Path) -> Iterator[Processes]:
    """Factory for real balancer/agent processes, all stopped at teardown."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()
