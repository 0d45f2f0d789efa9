"""The dispatcher's guarantees: FIFO, bounds, and leases that are always released."""

from __future__ import annotations

import asyncio

import pytest

from paddler_balancer.agents import AgentController, AgentPool
from paddler_balancer.dispatcher import Dispatcher
from paddler_balancer.routing import RouteRequest
from paddler_balancer.streams import InferenceFailure
from paddler_core.protocol import AgentStatus


def make(slots: int = 1, max_buffered: int = 10, timeout: float = 1.0) -> tuple[AgentPool, Dispatcher, AgentController]:
    pool = AgentPool()
    dispatcher = Dispatcher(pool, max_buffered=max_buffered, buffer_timeout=timeout)
    a = AgentController(id="a", name="a", model_group="default", send=lambda m: None)
    a.status = AgentStatus(slots_total=slots)
    pool.add(a)
    return pool, dispatcher, a


REQ = RouteRequest("default")


async def test_claims_a_free_slot_at_once_and_release_is_idempotent() -> None:
    _, dispatcher, a = make(slots=2)
    async with await dispatcher.acquire(REQ) as lease:
        assert a.in_flight == 1
        lease.release()
        lease.release()
    assert a.in_flight == 0


async def test_buffered_requests_are_served_first_in_first_out() -> None:
    _, dispatcher, a = make(slots=1)
    holder = await dispatcher.acquire(REQ)
    order: list[int] = []

    async def wait(i: int) -> None:
        async with await dispatcher.acquire(REQ):
            order.append(i)
            await asyncio.sleep(0)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(wait(i)))
        await asyncio.sleep(0)
    assert dispatcher.buffered == 3
    holder.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert a.in_flight == 0


@pytest.mark.parametrize(("max_buffered", "status"), [(0, 503), (1, 503)])
async def test_full_or_disabled_buffer_answers_503(max_buffered: int, status: int) -> None:
    _, dispatcher, _ = make(slots=1, max_buffered=max_buffered)
    await dispatcher.acquire(REQ)
    waiters = [asyncio.create_task(dispatcher.acquire(REQ)) for _ in range(max_buffered)]
    await asyncio.sleep(0)
    with pytest.raises(InferenceFailure) as raised:
        await dispatcher.acquire(REQ)
    assert raised.value.status == status
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_wait_past_the_timeout_answers_504_and_leaves_the_buffer() -> None:
    _, dispatcher, _ = make(slots=1, timeout=0.05)
    await dispatcher.acquire(REQ)
    with pytest.raises(InferenceFailure) as raised:
        await dispatcher.acquire(REQ)
    assert raised.value.status == 504
    assert dispatcher.buffered == 0


async def test_cancelled_waiter_leaves_the_buffer_and_leaks_no_slot() -> None:
    _, dispatcher, a = make(slots=1)
    holder = await dispatcher.acquire(REQ)
    waiter = asyncio.create_task(dispatcher.acquire(REQ))
    await asyncio.sleep(0)
    assert dispatcher.buffered == 1
    holder.release()  # grants the slot to the waiter in the next loop turn ...
    waiter.cancel()  # ... which is cancelled in the same turn
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0)
    assert dispatcher.buffered == 0
    assert a.in_flight == 0


async def test_waiters_of_another_group_are_not_blocked() -> None:
    pool, dispatcher, _ = make(slots=1)
    other = AgentController(id="b", name="b", model_group="other", send=lambda m: None)
    other.status = AgentStatus(slots_total=1)
    pool.add(other)
    await dispatcher.acquire(REQ)
    blocked = asyncio.create_task(dispatcher.acquire(REQ))
    await asyncio.sleep(0)
    lease = await asyncio.wait_for(dispatcher.acquire(RouteRequest("other")), 1)
    assert lease.agent is other
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_agent_joining_serves_the_buffer() -> None:
    pool, dispatcher, a = make(slots=0)
    waiter = asyncio.create_task(dispatcher.acquire(REQ))
    await asyncio.sleep(0)
    pool.update_status(a, AgentStatus(version=1, slots_total=1))
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.agent is a


async def test_stale_status_is_dropped() -> None:
    pool, _, a = make(slots=1)
    assert pool.update_status(a, AgentStatus(version=5, slots_total=3))
    assert not pool.update_status(a, AgentStatus(version=4, slots_total=9))
    assert a.status.slots_total == 3


async def test_a_freed_slot_goes_to_a_waiter_whose_prefix_its_agent_holds_within_the_bound() -> None:
    _, dispatcher, a = make(slots=1)
    a.held_prefixes = frozenset({"s", "k"})
    holder = await dispatcher.acquire(REQ)
    order: list[str] = []

    async def wait(name: str, keys: tuple[str, ...]) -> None:
        async with await dispatcher.acquire(RouteRequest("default", keys)):
            order.append(name)
            await asyncio.sleep(0)

    tasks = []
    for name, keys in [("cold-1", ("q",)), ("cold-2", ("r",)), ("warm-1", ("s", "k")), ("warm-2", ("s", "k")),
                       ("warm-3", ("s", "k"))]:  # fmt: skip
        tasks.append(asyncio.create_task(wait(name, keys)))
        await asyncio.sleep(0)
    holder.release()
    await asyncio.gather(*tasks)
    # Two warm requests go first; then cold-1 has been passed over twice (the bound) and is served.
    assert order == ["warm-1", "warm-2", "cold-1", "cold-2", "warm-3"]
    assert a.in_flight == 0
    assert dispatcher.buffered == 0
