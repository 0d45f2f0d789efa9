"""Slot leases and the request buffer.

``Dispatcher.acquire`` returns a :class:`Lease` on one slot of one agent: at once
when an agent has a free slot and nobody of the same group waits before us,
otherwise after waiting in the FIFO buffer. A lease is released exactly once
(``Lease.release`` is idempotent and ``async with`` always calls it).

The buffer is ordered by deadline (arrival + buffer timeout): a request that an agent
refused comes back with its first deadline, so it waits before the requests that
arrived after it and never longer than the buffer timeout from its arrival. A freed
slot goes to the oldest waiter of its model group, or, under the prefix policy, to one
a few places behind it whose prefix that agent holds (:func:`routing.hand_over`: nobody
is passed over more than ``RoutingConfig.max_passed_over`` times).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType

from paddler_balancer import routing
from paddler_balancer.agents import AgentController, AgentPool
from paddler_balancer.streams import InferenceFailure

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lease:
    """One claimed slot. Release it exactly once; ``async with`` does."""

    agent: AgentController
    dispatcher: Dispatcher
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.dispatcher._release(self.agent)

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@dataclass(eq=False)
class _Waiter:
    request: routing.RouteRequest
    deadline: float
    """``time.monotonic()`` after which it stops waiting (504)."""
    future: asyncio.Future[Lease] = field(repr=False)
    passed_over: int = 0
    """Times a later request of its group took a slot first (:func:`routing.hand_over`)."""


class Dispatcher:
    def __init__(
        self,
        pool: AgentPool,
        *,
        max_buffered: int,
        buffer_timeout: float,
        candidate_limit: int = 16,
        routing_config: routing.RoutingConfig | None = None,
    ) -> None:
        self.pool = pool
        self.max_buffered = max_buffered
        self.buffer_timeout = buffer_timeout
        self.candidate_limit = candidate_limit
        self.routing = routing_config or routing.RoutingConfig()
        self._waiters: deque[_Waiter] = deque()
        self._rng = random.Random(0)
        self._listeners: list[asyncio.Event] = []
        self._drain_scheduled = False
        pool.on_change(self.schedule_drain)

    @property
    def buffered(self) -> int:
        return len(self._waiters)

    def buffered_by_group(self) -> Counter[str]:
        """Buffered requests per model group (a group with none is absent: 0)."""
        return Counter(w.request.model_group for w in self._waiters)

    def watch(self) -> asyncio.Event:
        """An event set whenever the buffered count may have changed."""
        event = asyncio.Event()
        self._listeners.append(event)
        return event

    def unwatch(self, event: asyncio.Event) -> None:
        self._listeners.remove(event)

    def try_claim(self, request: routing.RouteRequest) -> Lease | None:
        agent = self._select(request)
        return None if agent is None else self._lease(agent)

    def _lease(self, agent: AgentController) -> Lease:
        agent.in_flight += 1
        self.pool.refresh(agent)
        return Lease(agent, self)

    def deadline(self) -> float:
        """The buffer deadline of a request arriving now."""
        return time.monotonic() + self.buffer_timeout

    async def acquire(self, request: routing.RouteRequest, deadline: float | None = None) -> Lease:
        """A lease on a free slot; waits in the buffer if none is free.

        ``deadline`` (``time.monotonic()``): when the wait ends; default now + the buffer
        timeout. A request routed again after a refusal passes its first one.

        Raises InferenceFailure 503 when the buffer is full (or disabled) and 504
        when the wait runs past the deadline.
        """
        if deadline is None:
            deadline = self.deadline()
        if not any(w.request.model_group == request.model_group and w.deadline <= deadline for w in self._waiters):
            lease = self.try_claim(request)
            if lease is not None:
                return lease
        if len(self._waiters) >= self.max_buffered:
            raise InferenceFailure(
                503,
                f"too many buffered requests (limit {self.max_buffered}); retry later",
                "buffer_full",
            )
        waiter = _Waiter(request, deadline, asyncio.get_running_loop().create_future())
        self._enqueue(waiter)
        self._notify()
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            self._abandon(waiter)
            raise InferenceFailure(
                504,
                f"no agent freed a slot within the buffer timeout ({self.buffer_timeout:g}s)",
                "buffer_timeout",
            ) from None
        except BaseException:  # cancelled: the client went away
            self._abandon(waiter)
            raise

    def _enqueue(self, waiter: _Waiter) -> None:
        """Append, or insert before the first waiter with a later deadline (a request
        routed again after a refusal keeps its place by arrival)."""
        if not self._waiters or self._waiters[-1].deadline <= waiter.deadline:
            self._waiters.append(waiter)
            return
        for position, other in enumerate(self._waiters):
            if other.deadline > waiter.deadline:
                self._waiters.insert(position, waiter)
                return

    def _abandon(self, waiter: _Waiter) -> None:
        """The caller stopped waiting: leave the buffer, or give back a lease granted
        in the same instant (the grant raced the timeout or the cancel)."""
        if waiter.future.done():
            if not waiter.future.cancelled():
                waiter.future.result().release()
        else:
            waiter.future.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._notify()

    def _release(self, agent: AgentController) -> None:
        agent.in_flight = max(0, agent.in_flight - 1)
        self.pool.refresh(agent)
        self.schedule_drain()

    def schedule_drain(self) -> None:
        if self._waiters and not self._drain_scheduled:
            self._drain_scheduled = True
            asyncio.get_running_loop().call_soon(self._drain)

    def _drain(self) -> None:
        """Hand free slots to waiters, group by group (groups share no agents)."""
        self._drain_scheduled = False
        for group in dict.fromkeys(w.request.model_group for w in self._waiters):
            self._drain_group(group)
        self._notify()

    def _drain_group(self, group: str) -> None:
        """While an agent of ``group`` can take its oldest waiter: the slot goes to that
        waiter, or to one a little behind it whose prefix the agent holds (routing.hand_over);
        those passed over count it."""
        while True:
            # Only the group's first few are read, however many are buffered.
            mine = (w for w in self._waiters if w.request.model_group == group and not w.future.done())
            queue = list(itertools.islice(mine, self.routing.buffer_lookahead + 1))
            if not queue:
                return
            agent = self._select(queue[0].request)
            if agent is None:
                return
            waiting = [routing.Waiting(w.request, w.passed_over) for w in queue]
            chosen = routing.hand_over(agent, waiting, self.routing)
            for passed in queue[:chosen]:
                passed.passed_over += 1
            queue[chosen].future.set_result(self._lease(agent))
            self._waiters.remove(queue[chosen])

    def _select(self, request: routing.RouteRequest) -> AgentController | None:
        available = self.pool.available.get(request.model_group)
        if not available:
            return None
        holders = self.pool.holding_prefix(list(request.prefix_hashes)) if request.prefix_hashes else set()
        pool = routing.candidates(available, holders, self.candidate_limit, self._rng)
        return routing.pick(pool, request, self.routing)

    def _notify(self) -> None:
        for event in self._listeners:
            event.set()
