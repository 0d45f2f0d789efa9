"""The agent's health doors (``--health-addr``) on real processes: a balancer and a simulated
agent over real WebSockets. ``/ready`` says whether the agent serves (linked, desired state
applied, slots, not stopping), ``/live`` whether its loops turn, ``/started`` whether its
first desired state has been applied; and a stopping agent drains for ``--drain-timeout``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from typing import Any

import httpx

from tests.harness import Balancer, PaddlerProcess, Processes, wait_until

MODEL = "/models/one.gguf"
HEALTH = ("--health-addr", "127.0.0.1:0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_url(agent: PaddlerProcess) -> str:
    agent.wait_for_urls(["health"])
    return agent.urls["health"]


async def probe(agent: PaddlerProcess, path: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(health_url(agent) + path)
    return response.status_code, response.json()


async def put_state(balancer: Balancer) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{balancer.management_url}/api/v1/balancer_desired_state", json={"model": {"LocalToAgent": MODEL}}
        )
    assert response.status_code == 204, response.text


async def wait_for_reason(agent: PaddlerProcess, path: str, reason: str | None, timeout: float = 15.0) -> None:
    async def answers() -> bool:
        status, body = await probe(agent, path)
        return (status, body.get("reason")) == ((200, None) if reason is None else (503, reason))

    await wait_until(answers, timeout=timeout, what=f"{path} answers {reason or 200}")


def agent_without_balancer(paddler: Processes) -> PaddlerProcess:
    """An agent whose --management-addr is a port nobody listens on."""
    nowhere = f"127.0.0.1:{free_port()}"
    args = ["agent", "--management-addr", nowhere, "--slots", "1", "--name", "alone", "--engine", "simulated"]
    return paddler.spawn("agent-alone", [*args, *HEALTH])


async def test_ready_answers_503_while_no_balancer_has_linked_the_agent(paddler: Processes) -> None:
    agent = agent_without_balancer(paddler)

    status, body = await probe(agent, "/ready")

    assert (status, body) == (503, {"status": "unavailable", "reason": "not-linked"})


async def test_live_answers_200_while_the_agent_has_no_balancer(paddler: Processes) -> None:
    agent = agent_without_balancer(paddler)

    assert await probe(agent, "/live") == (200, {"status": "ok"})


async def test_started_answers_503_before_any_desired_state_was_applied(paddler: Processes) -> None:
    agent = agent_without_balancer(paddler)

    status, body = await probe(agent, "/started")

    assert (status, body) == (503, {"status": "unavailable", "reason": "first-load-pending"})


async def test_ready_answers_503_while_the_model_loads_and_200_once_it_serves(paddler: Processes) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(balancer, slots=2, name="loader", extra=(*HEALTH, "--simulated-load-time", "2s"))
    # The balancer's default state (no model) is applied at once: the simulated engine serves without one.
    await wait_for_reason(agent, "/ready", None)

    await put_state(balancer)

    await wait_for_reason(agent, "/ready", "applying", timeout=5)
    await wait_for_reason(agent, "/ready", None, timeout=15)
    assert await probe(agent, "/started") == (200, {"status": "ok"})
    assert await probe(agent, "/live") == (200, {"status": "ok"})


async def _stream_slowly(balancer: Balancer, started: asyncio.Event) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        body = {"raw_prompt": "a long story", "max_tokens": 100}
        async with http.stream("POST", f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    started.set()


async def _serving_one_slow_request(paddler: Processes, *extra: str) -> tuple[PaddlerProcess, asyncio.Task[None]]:
    balancer = paddler.balancer()
    await put_state(balancer)
    slow = ("--simulated-tokens-per-second", "2", "--simulated-max-tokens", "100")
    agent = paddler.agent(balancer, slots=1, name="busy", extra=(*HEALTH, *slow, *extra))
    await wait_for_reason(agent, "/ready", None)
    started = asyncio.Event()
    request = asyncio.create_task(_stream_slowly(balancer, started))
    async with asyncio.timeout(10):
        await started.wait()
    return agent, request


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await task


async def test_ready_answers_503_as_soon_as_the_agent_is_told_to_stop(paddler: Processes) -> None:
    agent, request = await _serving_one_slow_request(paddler, "--drain-timeout", "30s")
    try:
        agent.popen.send_signal(signal.SIGTERM)
        ready = await probe(agent, "/ready")
        live = await probe(agent, "/live")
        still_draining = agent.alive
    finally:
        await _cancel(request)

    assert ready == (503, {"status": "unavailable", "reason": "stopping"})
    assert live == (200, {"status": "ok"})
    assert still_draining


async def test_a_stopping_agent_gives_up_on_its_requests_after_the_drain_timeout(paddler: Processes) -> None:
    agent, request = await _serving_one_slow_request(paddler, "--drain-timeout", "1s")
    try:
        stopped_at = time.monotonic()
        agent.popen.send_signal(signal.SIGTERM)
        await asyncio.to_thread(agent.popen.wait, 15)
        took = time.monotonic() - stopped_at
    finally:
        await _cancel(request)

    assert 1.0 <= took < 8.0, agent.output()[-2000:]
    assert "stopping with requests still in flight count=1" in agent.output()
