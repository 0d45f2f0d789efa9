"""Continuous load and a serving-agents monitor for rolling-swap tests (plain HTTP).

:class:`Load` runs ``workers`` clients that each send raw-prompt requests back to
back to the balancer's native NDJSON API and record every outcome (text,
answering agent, HTTP status, error). :class:`ServingMonitor` polls the
management API and records the fewest agents that were serving at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.harness import Balancer, wait_until


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    status: int
    text: str
    agent: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and bool(self.text)


async def generate(http: httpx.AsyncClient, balancer: Balancer, prompt: str, max_tokens: int) -> Outcome:
    started = time.monotonic()
    body = {"raw_prompt": prompt, "max_tokens": max_tokens}
    text: list[str] = []
    agent: str | None = None
    error: str | None = None
    done = False
    async with http.stream("POST", f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", json=body) as resp:
        if resp.status_code != 200:
            error = (await resp.aread()).decode()[:300]
            return Outcome(started, time.monotonic(), resp.status_code, "", None, error)
        async for line in resp.aiter_lines():
            if not line.strip():
                continue
            envelope = json.loads(line)
            if "Error" in envelope:
                error = json.dumps(envelope["Error"])[:300]
                break
            response = envelope["Response"]
            agent = response.get("generated_by", agent)
            payload: Any = response["response"]
            generated = payload.get("GeneratedToken") if isinstance(payload, dict) else None
            if not isinstance(generated, dict):
                error = f"unexpected payload {payload!r}"
                break
            if "Done" in generated:
                done = True
                break
            if "ContentToken" in generated:
                text.append(generated["ContentToken"])
            else:
                error = f"generation error {generated!r}"
                break
    if not done and error is None:
        error = "stream ended without Done"
    return Outcome(started, time.monotonic(), 200, "".join(text), agent, error)


@dataclass
class Load:
    """``workers`` clients sending requests back to back until stopped."""

    balancer: Balancer
    workers: int
    max_tokens: int
    prompt: str = "Once upon a time"
    timeout: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Load:
        self._http = httpx.AsyncClient(timeout=self.timeout)
        self._tasks = [asyncio.create_task(self._worker(i), name=f"load-{i}") for i in range(self.workers)]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._stop.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            assert self._http is not None
            await self._http.aclose()

    async def _worker(self, index: int) -> None:
        assert self._http is not None
        while not self._stop.is_set():
            self.outcomes.append(await generate(self._http, self.balancer, self.prompt, self.max_tokens))

    async def wait_for_answers(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` more requests have been answered."""
        target = len(self.outcomes) + count

        async def enough() -> bool:
            return len(self.outcomes) >= target

        await wait_until(enough, timeout=timeout, what=f"{count} more answers")


@dataclass
class ServingMonitor:
    """Polls ``GET /api/v1/agents``: the fewest agents serving (not draining, slots > 0) at once."""

    balancer: Balancer
    interval: float = 0.05
    fewest: int | None = None
    samples: int = 0
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ServingMonitor:
        self._task = asyncio.create_task(self._run(), name="serving-monitor")
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as http:
            while True:
                agents = (await http.get(f"{self.balancer.management_url}/api/v1/agents")).json()["agents"]
                serving = sum(1 for a in agents if a["slots_total"] > 0 and not a["draining"])
                self.fewest = serving if self.fewest is None else min(self.fewest, serving)
                self.samples += 1
                await asyncio.sleep(self.interval)


async def put_state(
    balancer: Balancer, state: dict[str, Any], *, group: str = "default", max_unavailable: str | None = None
) -> None:
    params = {"max_unavailable": max_unavailable} if max_unavailable is not None else {}
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.put(
            f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state", json=state, params=params
        )
    assert response.status_code == 204, response.text


async def rollout(balancer: Balancer, group: str = "default") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        response = await http.get(f"{balancer.management_url}/api/v1/model_groups/{group}/rollout")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_for_rollout(balancer: Balancer, phase: str, timeout: float, group: str = "default") -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await rollout(balancer, group))
        return bool(seen["phase"] == phase)

    await wait_until(reached, timeout=timeout, interval=0.1, what=f"rollout {phase}: {seen}")
    return seen


async def agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10.0) as http:
        body: list[dict[str, Any]] = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()["agents"]
    return body


async def wait_for_serving(balancer: Balancer, count: int, model_path: str | None, timeout: float) -> None:
    async def ready() -> bool:
        found = await agents(balancer)
        serving = [a for a in found if a["model_path"] == model_path and a["slots_total"] > 0 and not a["draining"]]
        return len(found) == count and len(serving) == count

    await wait_until(ready, timeout=timeout, interval=0.1, what=f"{count} agents serving {model_path}")
