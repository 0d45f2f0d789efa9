"""A pool survives its balancer: two balancer processes, each with its own state file,
and simulated agents that dial both (``--management-addr A --management-addr B``).

Clients spread requests over both replicas and go to the other one when a connection is
refused, as a Kubernetes Service does. One replica is stopped (SIGTERM: it drains) or
killed (SIGKILL) under load; the agents' own counters say whether any of them ever ran
more requests than it has slots (the agent is the arbiter), and their logs whether any
reloaded its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.harness import Balancer, PaddlerProcess, Processes, wait_until
from tests.rolling import Outcome, agents, generate, put_state

SLOTS = 2
AGENTS = 3
WORKERS = 8
"""More streams than the pool's 6 slots: both replicas contend for the same last slots."""
LOADS = "loading model="
"""What a simulated agent logs each time it loads a model."""


def gguf(path: Path) -> str:
    path.write_bytes(b"GGUF" + bytes(60))
    return str(path)


@dataclass
class Replicas:
    """Two balancer replicas and AGENTS simulated agents connected to both."""

    paddler: Processes
    tmp: Path
    balancers: list[Balancer] = field(default_factory=list)
    agents: list[PaddlerProcess] = field(default_factory=list)

    def start_balancer(self, index: int, management: str = "127.0.0.1:0", inference: str = "127.0.0.1:0") -> Balancer:
        state = f"file://{self.tmp / f'state-{index}.json'}"
        return self.paddler.balancer(
            "--management-addr", management, "--inference-addr", inference, "--state-database", state
        )

    def restart(self, index: int) -> Balancer:
        old = self.balancers[index]
        management = old.management_addr
        inference = old.inference_url.removeprefix("http://")
        self.balancers[index] = self.start_balancer(index, management, inference)
        return self.balancers[index]

    def loads(self) -> list[int]:
        return [agent.output().count(LOADS) for agent in self.agents]


@pytest.fixture
async def replicas(paddler: Processes, tmp_path: Path) -> Replicas:
    pool = Replicas(paddler, tmp_path)
    # Processes.balancer binds port 0: the restart re-binds the ports it got.
    pool.balancers = [pool.start_balancer(0), pool.start_balancer(1)]
    model = {"model": {"LocalToAgent": gguf(tmp_path / "model.gguf")}}
    for balancer in pool.balancers:
        await put_state(balancer, model)
    addrs = [arg for b in pool.balancers for arg in ("--management-addr", b.management_addr)]
    for i in range(AGENTS):
        extra = ("--simulated-tokens-per-second", "50", "--simulated-load-time", "0.3", *addrs[2:])
        pool.agents.append(paddler.agent(pool.balancers[0], slots=SLOTS, name=f"agent-{i}", extra=extra))
    for balancer in pool.balancers:
        await wait_for_every_agent(balancer, timeout=20)
    return pool


async def wait_for_every_agent(balancer: Balancer, timeout: float) -> None:
    async def all_serving() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            found = await agents(balancer)
            return len(found) == AGENTS and all(a["slots_total"] == SLOTS for a in found)
        return False

    await wait_until(all_serving, timeout=timeout, interval=0.05, what=f"{AGENTS} agents on {balancer.management_url}")


@dataclass
class ServiceLoad:
    """WORKERS clients sending requests back to back, each to the next replica in turn,
    and to the other replica when a connection is refused (a Service's endpoints)."""

    balancers: list[Balancer]
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _turn: Iterator[int] = field(default_factory=itertools.count)

    async def _one(self, http: httpx.AsyncClient) -> Outcome:
        first, started = next(self._turn), time.monotonic()
        for attempt in range(len(self.balancers) * 3):
            balancer = self.balancers[(first + attempt) % len(self.balancers)]
            try:
                return await generate(http, balancer, "Once upon a time", 10)
            except httpx.ConnectError:
                await asyncio.sleep(0.05)  # refused: the next endpoint
            except httpx.HTTPError as err:  # the connection broke after the request was sent
                return Outcome(started, time.monotonic(), 0, "", None, f"{type(err).__name__}: {err}")
        return Outcome(started, time.monotonic(), 0, "", None, "every replica refused the connection")

    async def _worker(self) -> None:
        async with httpx.AsyncClient(timeout=60.0) as http:
            while not self._stop.is_set():
                self.outcomes.append(await self._one(http))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ServiceLoad]:
        tasks = [asyncio.create_task(self._worker(), name=f"service-load-{i}") for i in range(WORKERS)]
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks)

    async def wait_for_answers(self, count: int, timeout: float = 30.0) -> None:
        target = len(self.outcomes) + count

        async def enough() -> bool:
            return len(self.outcomes) >= target

        await wait_until(enough, timeout=timeout, what=f"{count} more answers")

    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


async def assert_no_agent_ran_beyond_its_slots(balancer: Balancer) -> None:
    async with httpx.AsyncClient(timeout=10.0) as http:
        for agent in await agents(balancer):
            url = f"{balancer.management_url}/api/v1/agent/{agent['id']}/model_metadata"
            metadata = (await http.get(url)).json()["metadata"]
            assert int(metadata["simulated.peak_slots_processing"]) <= SLOTS, (agent["name"], metadata)
            assert metadata["simulated.requests_beyond_slots"] == "0", (agent["name"], metadata)


async def test_sigterm_of_one_replica_under_load_fails_no_request(replicas: Replicas) -> None:
    stopping, survivor = replicas.balancers
    loads_before = replicas.loads()
    async with ServiceLoad(replicas.balancers).running() as load:
        await load.wait_for_answers(20)
        await asyncio.to_thread(stopping.process.stop, 60.0)  # SIGTERM, then wait for the exit
        assert stopping.process.popen.returncode == 0
        await load.wait_for_answers(20)
    print(f"SIGTERM of one replica: {len(load.outcomes)} requests, {len(load.failed())} failed")
    assert load.failed() == []
    await wait_for_every_agent(survivor, timeout=5)
    await assert_no_agent_ran_beyond_its_slots(survivor)
    assert replicas.loads() == loads_before


async def test_sigkill_of_one_replica_fails_only_its_streams_in_flight_and_it_rejoins_without_reloads(
    replicas: Replicas,
) -> None:
    killed, survivor = replicas.balancers
    loads_before = replicas.loads()
    async with ServiceLoad(replicas.balancers).running() as load:
        await load.wait_for_answers(20)
        killed_at = time.monotonic()
        killed.process.kill()
        await load.wait_for_answers(20)
        # The survivor still has every agent and every slot.
        await wait_for_every_agent(survivor, timeout=5)
        restarted_at = time.monotonic()
        restarted = replicas.restart(0)
        await wait_for_every_agent(restarted, timeout=10)
        rejoined_after = time.monotonic() - restarted_at
        await load.wait_for_answers(20)
    failed = load.failed()
    print(
        f"SIGKILL of one replica: {len(load.outcomes)} requests, {len(failed)} failed "
        f"(started before the kill: {sum(o.started < killed_at for o in failed)}); "
        f"every agent back on the restarted replica after {rejoined_after:.2f}s"
    )
    assert [o for o in failed if o.started >= killed_at] == []
    assert len(failed) <= WORKERS  # at most the streams in flight on the killed replica
    await assert_no_agent_ran_beyond_its_slots(survivor)
    assert replicas.loads() == loads_before  # no agent reloaded its model
