"""The agent's health doors (paddler_agent.health): the pure decisions as tables, with an
injected clock for the decode-loop heartbeat, and the app over a fake runtime."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from paddler_agent.health import (
    HealthConfig,
    HealthProblem,
    HealthView,
    health_app,
    liveness,
    readiness,
    startup,
)
from paddler_core.protocol import StateApplicationStatus

SERVING = HealthView(
    stopping=False,
    linked_balancers=1,
    holds_desired_state=True,
    applying=False,
    state_application_status=StateApplicationStatus.APPLIED,
    slots_total=4,
    first_application_ended=True,
    decode_heartbeat=None,
)
STALL = 30.0


def view(**changes: Any) -> HealthView:
    return dataclasses.replace(SERVING, **changes)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"linked_balancers": 3}, None),
        ({"stopping": True}, HealthProblem.STOPPING),
        ({"stopping": True, "linked_balancers": 0}, HealthProblem.STOPPING),
        ({"linked_balancers": 0}, HealthProblem.NOT_LINKED),
        ({"holds_desired_state": False}, HealthProblem.NO_DESIRED_STATE),
        ({"applying": True, "slots_total": 0}, HealthProblem.APPLYING),
        (
            {"state_application_status": StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE},
            HealthProblem.NOT_APPLIED,
        ),
        ({"state_application_status": StateApplicationStatus.STUCK}, HealthProblem.NOT_APPLIED),
        ({"state_application_status": StateApplicationStatus.FRESH}, HealthProblem.NOT_APPLIED),
        ({"slots_total": 0}, HealthProblem.NO_SLOTS),
    ],
)
def test_ready_only_while_linked_applied_with_slots_and_not_stopping(
    changes: dict[str, Any], expected: HealthProblem | None
) -> None:
    assert readiness(view(**changes)) == expected


@pytest.mark.parametrize(
    ("heartbeat", "now", "expected"),
    [
        (None, 1000.0, None),  # no model loaded: no decode loop to watch
        (100.0, 100.0, None),
        (100.0, 129.9, None),
        (100.0, 130.0, None),  # exactly the timeout: not yet stale
        (100.0, 130.1, HealthProblem.DECODE_LOOP_STALLED),
        (100.0, 5000.0, HealthProblem.DECODE_LOOP_STALLED),
    ],
)
def test_live_fails_only_when_the_decode_heartbeat_is_older_than_the_stall_timeout(
    heartbeat: float | None, now: float, expected: HealthProblem | None
) -> None:
    assert liveness(view(decode_heartbeat=heartbeat), now, STALL) == expected


def test_live_ignores_everything_outside_the_process() -> None:
    cut_off = view(linked_balancers=0, state_application_status=StateApplicationStatus.STUCK, slots_total=0)
    assert liveness(cut_off, 10.0, STALL) is None


@pytest.mark.parametrize(
    ("changes", "now", "expected"),
    [
        ({"first_application_ended": False}, 0.0, HealthProblem.FIRST_LOAD_PENDING),
        ({"first_application_ended": False, "applying": True}, 0.0, HealthProblem.FIRST_LOAD_PENDING),
        ({}, 0.0, None),
        # A model that cannot be loaded ends the first application: started, not crash-looping.
        ({"state_application_status": StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE}, 0.0, None),
        ({"linked_balancers": 0}, 0.0, None),
        ({"decode_heartbeat": 10.0}, 100.0, HealthProblem.DECODE_LOOP_STALLED),
    ],
)
def test_started_once_the_first_desired_state_application_ended(
    changes: dict[str, Any], now: float, expected: HealthProblem | None
) -> None:
    assert startup(view(**changes), now, STALL) == expected


@dataclasses.dataclass
class FakeRuntime:
    state: HealthView = SERVING
    backend: str | None = None

    def health_view(self) -> HealthView:
        return self.state

    async def backend_problem(self) -> str | None:
        return self.backend


ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def test_ready_answers_200_with_a_json_status_when_serving(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(health_app(HealthConfig(FakeRuntime())))
    response = await client.get("/ready")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_ready_answers_503_with_the_reason(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(health_app(HealthConfig(FakeRuntime(view(linked_balancers=0)))))
    response = await client.get("/ready")
    assert response.status == 503
    assert await response.json() == {"status": "unavailable", "reason": "not-linked"}


async def test_ready_answers_503_when_the_backend_does_not_answer(aiohttp_client: ClientFactory) -> None:
    runtime = FakeRuntime(backend="llama-server at http://127.0.0.1:8080 does not answer /health: refused")
    client = await aiohttp_client(health_app(HealthConfig(runtime)))
    response = await client.get("/ready")
    assert response.status == 503
    body = await response.json()
    assert body["reason"] == "backend-unavailable"
    assert "does not answer /health" in body["detail"]


async def test_live_reads_the_injected_clock(aiohttp_client: ClientFactory) -> None:
    now = [100.0]
    runtime = FakeRuntime(view(decode_heartbeat=100.0))
    client = await aiohttp_client(health_app(HealthConfig(runtime, stall_timeout=5.0, clock=lambda: now[0])))
    assert (await client.get("/live")).status == 200
    now[0] = 106.0
    response = await client.get("/live")
    assert response.status == 503
    assert (await response.json())["reason"] == "decode-loop-stalled"


async def test_started_answers_503_until_the_first_application_ended(aiohttp_client: ClientFactory) -> None:
    runtime = FakeRuntime(view(first_application_ended=False, applying=True))
    client = await aiohttp_client(health_app(HealthConfig(runtime)))
    assert (await client.get("/started")).status == 503
    runtime.state = view(state_application_status=StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE)
    assert (await client.get("/started")).status == 200
