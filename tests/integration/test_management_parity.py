"""Paddler 4.1's management routes this balancer adds: the applicable state and the
SSE streams of the desired and applicable state, through real processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tests.harness import Balancer, Processes

TEMPLATE = {"content": "{% for m in messages %}{{ m.content }}{% endfor %}"}


async def _put(balancer: Balancer, state: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state)
        assert response.status_code == 204, response.text


async def _get(balancer: Balancer, path: str) -> Any:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + path)
        assert response.status_code == 200, response.text
        return response.json()


async def test_balancer_applicable_state_is_what_agents_apply(paddler: Processes) -> None:
    balancer = paddler.balancer()
    fresh = await _get(balancer, "/api/v1/balancer_applicable_state")
    assert fresh["model"] == "None"
    assert fresh["chat_template_override"] is None
    assert "use_chat_template_override" not in fresh

    state = {"model": {"LocalToAgent": "/m.gguf"}, "chat_template_override": TEMPLATE}
    await _put(balancer, {**state, "use_chat_template_override": False})
    unused = await _get(balancer, "/api/v1/balancer_applicable_state")
    assert unused["model"] == {"LocalToAgent": "/m.gguf"}
    assert unused["chat_template_override"] is None  # stored in the desired state, not applied
    await _put(balancer, {**state, "use_chat_template_override": True})
    used = await _get(balancer, "/api/v1/balancer_applicable_state")
    assert used["chat_template_override"] == TEMPLATE
    desired = await _get(balancer, "/api/v1/balancer_desired_state")
    assert {k: v for k, v in desired.items() if k != "use_chat_template_override"} == used


async def _events(response: httpx.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


async def test_desired_and_applicable_state_streams_send_each_change(paddler: Processes) -> None:
    balancer = paddler.balancer()
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream("GET", balancer.management_url + "/api/v1/balancer_desired_state/stream") as desired,
        http.stream("GET", balancer.management_url + "/api/v1/balancer_applicable_state/stream") as applicable,
    ):
        assert desired.headers["content-type"].startswith("text/event-stream")
        desired_events, applicable_events = _events(desired), _events(applicable)
        assert (await anext(desired_events))["model"] == "None"
        assert (await anext(applicable_events))["model"] == "None"
        await _put(balancer, {"model": {"LocalToAgent": "/new.gguf"}})
        assert (await anext(desired_events))["model"] == {"LocalToAgent": "/new.gguf"}
        changed = await anext(applicable_events)
        assert changed["model"] == {"LocalToAgent": "/new.gguf"}
        assert "use_chat_template_override" not in changed
