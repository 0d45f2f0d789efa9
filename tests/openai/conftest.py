"""Helpers for the OpenAI-compatible API tests: real processes, the real ``openai`` SDK."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from openai import AsyncOpenAI

from tests.harness import Balancer, wait_until

API_KEY = "sk-test-paddler"


@asynccontextmanager
async def openai_client(
    balancer: Balancer, *, api_key: str = API_KEY, max_retries: int = 0, base_url: str | None = None, **kw: Any
) -> AsyncIterator[AsyncOpenAI]:
    """The real SDK pointed at the balancer; closed (no leaked tasks) on exit."""
    client = AsyncOpenAI(
        base_url=(base_url or balancer.inference_url) + "/v1", api_key=api_key, max_retries=max_retries, **kw
    )
    try:
        yield client
    finally:
        await client.close()


async def agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + "/api/v1/agents")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()["agents"]
        return result


async def wait_for_agents(
    balancer: Balancer, count: int, check: Callable[[dict[str, Any]], bool] | None = None
) -> None:
    async def ready() -> bool:
        found = await agents(balancer)
        return len(found) == count and all(a["slots_total"] > 0 and (check is None or check(a)) for a in found)

    await wait_until(ready, timeout=20, what=f"{count} agents ready")


async def wait_busy(balancer: Balancer, in_flight: int = 1) -> None:
    async def busy() -> bool:
        return sum(a["slots_in_flight"] for a in await agents(balancer)) >= in_flight

    await wait_until(busy, timeout=10, what=f"{in_flight} request(s) in flight")


_SAMPLE = re.compile(r"^paddler_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$", re.M)


async def requests_total(balancer: Balancer, code: str, model_group: str = "default") -> int:
    """``paddler_requests_total{code=..., model_group=...}`` from the balancer's /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(balancer.management_url + "/metrics")).text
    for match in _SAMPLE.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
        if labels.get("code") == code and labels.get("model_group") == model_group:
            return int(float(match.group("value")))
    return 0


def logged_requests(balancer: Balancer, endpoint: str, status: int) -> int:
    """Requests that reached the balancer's OpenAI API, counted from its log lines."""
    pattern = f"openai request endpoint={endpoint} status={status} "
    return sum(pattern in line for line in balancer.process.output().splitlines())


async def wait_logged(balancer: Balancer, endpoint: str, status: int, count: int) -> None:
    async def seen() -> bool:
        return logged_requests(balancer, endpoint, status) >= count

    await wait_until(seen, timeout=10, what=f"{count} logged {endpoint} {status}")
