"""One agent serving two real balancer replicas (``--management-addr`` twice), all as
processes: it registers on both, comes back to a replica that was killed, and a replica
restarted empty does not make it unload the model another replica gave it."""

from __future__ import annotations

import socket
from typing import Any

import httpx

from tests.harness import Balancer, Processes, wait_until

MODEL = "/models/one.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def agents_on(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        try:
            body = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()
        except httpx.HTTPError:
            return []
    agents: list[dict[str, Any]] = body["agents"]
    return agents


async def wait_for_agent(balancer: Balancer, name: str, timeout: float = 15.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def listed() -> bool:
        for agent in await agents_on(balancer):
            if agent["name"] == name:
                found.update(agent)
                return True
        return False

    await wait_until(listed, timeout=timeout, what=f"agent {name} registered on {balancer.management_addr}")
    return found


async def test_an_agent_with_two_management_addrs_registers_on_both_replicas(paddler: Processes) -> None:
    a, b = paddler.balancer(), paddler.balancer()

    agent = paddler.agent(a, slots=2, name="both", replicas=(b,))

    listed = [await wait_for_agent(replica, "both") for replica in (a, b)]
    assert [entry["id"] for entry in listed] == [listed[0]["id"]] * 2
    assert [entry["slots_total"] for entry in listed] == [2, 2]
    assert f"balancer={b.management_addr}" in agent.output()


async def test_a_killed_replica_restarted_on_its_port_gets_the_agent_back(paddler: Processes) -> None:
    management = f"127.0.0.1:{free_port()}"
    a, b = paddler.balancer("--management-addr", management), paddler.balancer()
    agent = paddler.agent(a, slots=1, name="loyal", replicas=(b,))
    for replica in (a, b):
        await wait_for_agent(replica, "loyal")

    a.process.kill()
    restarted = paddler.balancer("--management-addr", management)

    await wait_for_agent(restarted, "loyal", timeout=10.0)
    assert [entry["name"] for entry in await agents_on(b)] == ["loyal"]
    assert agent.alive


async def test_a_replica_restarted_empty_does_not_make_the_agent_unload(paddler: Processes) -> None:
    """End to end with a balancer that stamps desired-state versions (a replica with no
    state holds version 0 and adopts the agent's newer one). The agent's own rule (an
    older offer is ignored) is tested against fake replicas in test_agent_arbiter.py."""
    management_b = f"127.0.0.1:{free_port()}"
    a, b = paddler.balancer(), paddler.balancer("--management-addr", management_b)
    agent = paddler.agent(a, slots=1, name="steady", replicas=(b,))
    for replica in (a, b):
        await wait_for_agent(replica, "steady")
    async with httpx.AsyncClient() as http:
        put = await http.put(
            f"{a.management_url}/api/v1/balancer_desired_state", json={"model": {"LocalToAgent": MODEL}}
        )
        assert put.status_code < 300
    held: dict[str, Any] = {}

    async def applied() -> bool:
        held.update(await wait_for_agent(a, "steady"))
        return held["model_path"] == MODEL and held["desired_state_revision"] is not None

    await wait_until(applied, timeout=10, what="model applied from replica A")

    b.process.kill()
    restarted = paddler.balancer("--management-addr", management_b)
    await wait_for_agent(restarted, "steady")
    # A query answered on B's link comes after whatever B offered on registering, and the
    # status that offer changed arrives with the reply: B's view is current after it.
    async with httpx.AsyncClient() as http:
        metadata = await http.get(f"{restarted.management_url}/api/v1/agent/{held['id']}/model_metadata")
    seen_by_b = await wait_for_agent(restarted, "steady")

    assert metadata.status_code == 200
    assert seen_by_b["desired_state_revision"] == held["desired_state_revision"]
    assert seen_by_b["model_path"] == MODEL
    assert (await wait_for_agent(a, "steady"))["model_path"] == MODEL
    assert agent.alive
