from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness import Processes
from tests.tier_guard import TierGuard


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(TierGuard(Path(__file__).parent), "tier-guard")


@pytest.fixture
def paddler(tmp_path: Path) -> Iterator[Processes]:
    """Factory for real balancer/agent processes, all stopped at teardown."""
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(autouse=True)
async def no_leaked_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail an async test that leaves asyncio tasks running behind it."""
    yield
    if not asyncio.iscoroutinefunction(request.function):
        return
    current = asyncio.current_task()
    for _ in range(20):  # let cancellations and closes settle
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not leaked:
            return
        await asyncio.sleep(0.01)
    names = ", ".join(sorted(t.get_name() + ":" + repr(t.get_coro()) for t in leaked))
    pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {names}")
