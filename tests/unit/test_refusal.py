"""Balancer replicas share agents: slot accounting from the agents' reports, and a
request an agent refuses (another replica took the slot) is routed again, unseen by
the client, within the buffer timeout from its arrival."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from paddler_balancer.agents import AgentController
from paddler_balancer.service import Balancer, Generation
from paddler_balancer.settings import BalancerSettings
from paddler_balancer.streams import InferenceFailure
from paddler_core.protocol import AgentStatus, RefusalReason

DONE = {"GeneratedToken": "Done"}


@pytest.mark.parametrize(
    ("slots_total", "in_flight", "slots_processing", "refused", "free"),
    [
        pytest.param(4, 0, 0, False, 4, id="idle"),
        pytest.param(4, 1, 0, False, 3, id="own-request-not-yet-reported"),
        pytest.param(4, 1, 3, False, 1, id="other-replicas-requests-in-the-report"),
        pytest.param(4, 2, 1, False, 2, id="report-lags-own-claims"),
        pytest.param(4, 0, 4, False, 0, id="full-by-other-replicas"),
        pytest.param(4, 0, 0, True, 0, id="refused-counts-full-until-next-status"),
    ],
)
def test_free_slots_take_the_larger_of_own_and_reported_load(
    slots_total: int, in_flight: int, slots_processing: int, refused: bool, free: int
) -> None:
    agent = AgentController("a", "a", "default", lambda m: None)
    agent.status = AgentStatus(slots_total=slots_total, slots_processing=slots_processing)
    agent.in_flight = in_flight
    agent.refused = refused
    assert agent.free_slots == free


class Agent:
    """An in-memory agent: records what the balancer sends it."""

    def __init__(self, balancer: Balancer, agent_id: str, slots: int) -> None:
        self.balancer = balancer
        self.messages: list[dict[str, Any]] = []
        self.controller = AgentController(agent_id, agent_id, "default", self._receive)
        self.controller.status = AgentStatus(slots_total=slots, version=1)
        balancer.pool.add(self.controller)

    def _receive(self, message: dict[str, Any] | str) -> None:
        self.messages.append(json.loads(message) if isinstance(message, str) else message)

    def generates(self) -> list[str]:
        return [m["request_id"] for m in self.messages if m.get("type") == "generate"]

    def stops(self) -> list[str]:
        return [m["request_id"] for m in self.messages if m.get("type") == "stop"]

    def refuse(self, request_id: str) -> None:
        self.balancer.request_refused(self.controller, request_id, RefusalReason.NO_FREE_SLOT)

    def answer(self, request_id: str) -> None:
        self.controller.streams[request_id].push(DONE, True)

    def push_status(self, slots_processing: int = 0) -> None:
        status = self.controller.status
        new = status.model_copy(update={"version": status.version + 1, "slots_processing": slots_processing})
        self.balancer.pool.update_status(self.controller, new)


def make(buffer_timeout: float = 5.0) -> Balancer:
    return Balancer(BalancerSettings(buffered_request_timeout=buffer_timeout))


async def first_batch(balancer: Balancer, request_id: str) -> tuple[str, list[tuple[Any, bool]]]:
    async with balancer.generation(
        model_group="default", variant="ContinueFromRawPrompt", params={"raw_prompt": "hi"}, request_id=request_id
    ) as generation:
        batch = await generation.next_batch()
        return generation.agent_id, batch


async def until(condition: Any, what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.001)


def refusals(balancer: Balancer) -> float:
    value = balancer.metrics.registry.get_sample_value(
        "paddler_agent_refusals_total", {"model_group": "default", "reason": "NoFreeSlot"}
    )
    return value or 0.0


async def test_a_refused_request_goes_to_another_agent_and_the_client_sees_only_its_answer() -> None:
    balancer = make()
    first, second = Agent(balancer, "a", slots=2), Agent(balancer, "b", slots=1)  # a has more free slots: first pick
    task = asyncio.create_task(first_batch(balancer, "r1"))
    await until(lambda: first.generates() == ["r1"], "sent to a")

    first.refuse("r1")
    await until(lambda: second.generates() == ["r1"], "routed again to b")
    second.answer("r1")
    agent_id, batch = await task

    assert (agent_id, batch) == ("b", [(DONE, True)])
    assert first.stops() == []  # it never ran: nothing to stop
    assert first.controller.in_flight == 0  # the lease there was released
    assert refusals(balancer) == 1.0


async def test_the_refusing_agent_counts_as_full_until_its_next_status() -> None:
    balancer = make()
    agent = Agent(balancer, "a", slots=2)
    task = asyncio.create_task(first_batch(balancer, "r1"))
    await until(lambda: agent.generates() == ["r1"], "sent")

    agent.refuse("r1")
    await asyncio.sleep(0.01)
    full_meanwhile = (agent.controller.free_slots, balancer.dispatcher.buffered)
    agent.push_status()  # its slot is free again: the buffered request gets it
    await until(lambda: agent.generates() == ["r1", "r1"], "sent again after the status")
    agent.answer("r1")
    await task

    assert full_meanwhile == (0, 1)


async def test_a_refused_request_waits_no_longer_than_the_buffer_timeout_from_its_arrival() -> None:
    balancer = make(buffer_timeout=0.3)
    agent = Agent(balancer, "a", slots=1)
    arrived = time.monotonic()
    task = asyncio.create_task(first_batch(balancer, "r1"))
    await until(lambda: agent.generates() == ["r1"], "sent")
    await asyncio.sleep(0.2)

    agent.refuse("r1")
    with pytest.raises(InferenceFailure) as raised:
        await task
    waited = time.monotonic() - arrived

    assert raised.value.status == 504
    assert waited < 0.5  # not 0.2 + a second full timeout
    assert balancer.dispatcher.buffered == 0
    assert agent.controller.in_flight == 0


async def test_a_refused_request_keeps_its_place_before_later_arrivals() -> None:
    balancer = make()
    agent = Agent(balancer, "a", slots=1)
    early = asyncio.create_task(first_batch(balancer, "early"))
    await until(lambda: agent.generates() == ["early"], "early sent")
    agent.push_status(slots_processing=1)  # another replica's request holds the slot
    late = asyncio.create_task(first_batch(balancer, "late"))
    await until(lambda: balancer.dispatcher.buffered == 1, "late buffered")

    agent.refuse("early")
    await until(lambda: balancer.dispatcher.buffered == 2, "early buffered again")
    agent.push_status(slots_processing=0)
    await until(lambda: agent.generates()[-1:] == ["early"] and len(agent.generates()) == 2, "early first")
    agent.answer("early")
    await early
    await until(lambda: agent.generates()[-1:] == ["late"], "then late")
    agent.answer("late")
    await late


async def test_a_refusal_after_a_payload_is_a_502_and_not_routed_again() -> None:
    balancer = make()
    first, second = Agent(balancer, "a", slots=2), Agent(balancer, "b", slots=1)
    outcome: list[Generation] = []

    async def run() -> None:
        async with balancer.generation(
            model_group="default", variant="ContinueFromRawPrompt", params={"raw_prompt": "hi"}, request_id="r1"
        ) as generation:
            outcome.append(generation)
            await generation.next_batch()
            await generation.next_batch()

    task = asyncio.create_task(run())
    await until(lambda: first.generates() == ["r1"], "sent")
    first.controller.streams["r1"].push({"GeneratedToken": {"Token": "x"}}, False)
    await until(lambda: bool(outcome) and outcome[0].delivered, "first token delivered")
    first.refuse("r1")
    with pytest.raises(InferenceFailure) as raised:
        await task

    assert raised.value.kind == "refused"
    assert raised.value.status == 502
    assert second.generates() == []
