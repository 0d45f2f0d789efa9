"""The agent's health doors with the real llama engine (``--engine llama``, SmolLM2): ``/ready``
is 503 while the model loads and 200 once it serves; ``/live`` is 200 while the decode thread
stamps its heartbeat (also idle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Processes, wait_until

pytestmark = pytest.mark.engine


async def test_ready_is_503_while_the_model_loads_and_200_once_it_serves(paddler: Processes, model_path: Path) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(
        balancer, slots=1, name="llama", engine="llama", extra=("--health-addr", "127.0.0.1:0"),
        env={"PADDLER_THREADS": "2"},
    )  # fmt: skip
    agent.wait_for_urls(["health"])
    health = agent.urls["health"]
    answers: list[tuple[int, Any]] = []

    async def ready() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"{health}/ready")
        answers.append((response.status_code, response.json().get("reason")))
        return response.status_code == 200

    # No model yet (the balancer's default state): no slots.
    await wait_until(lambda: _answers(health, "/ready", (503, "no-slots")), timeout=20, what="no slots before a model")
    async with httpx.AsyncClient() as http:
        state = {"model": {"LocalToAgent": str(model_path)}, "inference_parameters": {"context_size": 1024}}
        put = await http.put(f"{balancer.management_url}/api/v1/balancer_desired_state", json=state)
    assert put.status_code == 204, put.text
    await wait_until(ready, timeout=120, interval=0.02, what="/ready 200 once the model serves")

    assert (503, "applying") in answers
    assert answers[-1] == (200, None)
    async with httpx.AsyncClient(timeout=5) as http:
        live = await http.get(f"{health}/live")
    assert live.status_code == 200


async def _answers(health: str, path: str, expected: tuple[int, str | None]) -> bool:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(health + path)
    return (response.status_code, response.json().get("reason")) == expected
