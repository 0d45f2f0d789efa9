"""The agent socket's handshake, reconnection, and StatsD reporting, on real processes."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import httpx

from tests.harness import Processes, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def agent_names(management_url: str) -> list[str]:
    async with httpx.AsyncClient() as http:
        try:
            body = (await http.get(f"{management_url}/api/v1/agents")).json()
        except httpx.HTTPError:
            return []
    return [a["name"] for a in body["agents"]]


async def test_rejects_an_agent_that_speaks_another_protocol_version(paddler: Processes) -> None:
    balancer = paddler.balancer()
    register = {
        "type": "register",
        "protocol_version": 99,
        "name": "from-the-future",
        "model_group": "default",
        "status": {"slots_total": 1},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{balancer.management_url}/api/v1/agent_socket/future") as ws,
    ):
        await ws.send_str(json.dumps(register))
        reply = await ws.receive_json(timeout=5)
        closing = await ws.receive(timeout=5)

    assert reply["type"] == "rejected"
    assert "protocol version 99" in reply["reason"]
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert await agent_names(balancer.management_url) == []


async def test_agent_reconnects_after_the_balancer_restarts(paddler: Processes) -> None:
    management = f"127.0.0.1:{free_port()}"
    balancer = paddler.balancer("--management-addr", management)
    agent = paddler.agent(balancer, slots=1, name="loyal")
    await wait_until(lambda: _names_are(balancer.management_url, ["loyal"]), what="agent registered")

    balancer.process.stop()
    restarted = paddler.balancer("--management-addr", management)

    await wait_until(lambda: _names_are(restarted.management_url, ["loyal"]), timeout=15, what="agent came back")
    assert agent.alive
    assert "balancer unreachable" in agent.output() or agent.output().count("registered agent_id") >= 2


async def test_reports_gauges_to_statsd(paddler: Processes) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    port = receiver.getsockname()[1]
    try:
        balancer = paddler.balancer(
            "--statsd-addr", f"127.0.0.1:{port}", "--statsd-prefix", "pool_", "--statsd-reporting-interval", "100ms"
        )
        paddler.agent(balancer, slots=3, name="counted")
        await wait_until(lambda: _names_are(balancer.management_url, ["counted"]), what="agent registered")

        loop = asyncio.get_running_loop()
        lines: set[str] = set()
        async with asyncio.timeout(10):
            while "pool_slots_total:3|g" not in lines:
                data = await loop.sock_recv(receiver, 4096)
                lines.update(data.decode().splitlines())
        assert {"pool_agents:1|g", "pool_requests_buffered:0|g"} <= lines
    finally:
        receiver.close()


async def _names_are(management_url: str, expected: list[str]) -> bool:
    return await agent_names(management_url) == expected
