"""Connected agents: their reported status and the balancer's own slot accounting.

The agent is the authority on ``slots_total``; the balancer counts the requests it
has in flight on each agent. With several balancer replicas an agent's slots are
shared: the agent reports every replica's requests in ``slots_processing``, so a
replica counts as busy the larger of its own in-flight count and that report, and an
agent that refused a request (another replica took the slot first) counts as full
until its next status push.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from paddler_balancer.streams import ResponseStream
from paddler_core.management_wire import AgentSnapshot
from paddler_core.protocol import AgentStatus

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any] | str], None]
"""Queues one message (a dict, or one already encoded by ``encode_message``)."""


class IndexedSet:
    """A set with O(1) add, discard and random access (for O(k) sampling)."""

    __slots__ = ("_index", "_items")

    def __init__(self) -> None:
        self._items: list[AgentController] = []
        self._index: dict[AgentController, int] = {}

    def add(self, item: AgentController) -> None:
        if item not in self._index:
            self._index[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: AgentController) -> None:
        position = self._index.pop(item, None)
        if position is None:
            return
        last = self._items.pop()
        if last is not item:
            self._items[position] = last
            self._index[last] = position

    def __contains__(self, item: object) -> bool:
        return item in self._index

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[AgentController]:
        return iter(self._items)

    def sample(self, k: int, rng: random.Random) -> list[AgentController]:
        """``k`` items from a random starting point (a window, wrapping): O(k).

        Swap-removal keeps shuffling the order, so windows do not favour anyone."""
        n = len(self._items)
        if k >= n:
            return list(self._items)
        start = rng.randrange(n)
        window = self._items[start : start + k]
        if len(window) < k:
            window += self._items[: k - len(window)]
        return window


@dataclass(eq=False)
class AgentController:
    """One connected agent, as the balancer sees it."""

    id: str
    name: str | None
    model_group: str
    send: Sender
    """Queue one message to the agent (never blocks)."""
    status: AgentStatus = field(default_factory=AgentStatus)
    held_prefixes: frozenset[str] = frozenset()
    """``status.prefix_hashes`` as a set, kept in step by AgentPool."""
    in_flight: int = 0
    streams: dict[str, ResponseStream] = field(default_factory=dict)
    connected: bool = True
    order: int = field(default_factory=itertools.count().__next__)
    """Registration order: a stable tie-break for routing."""
    last_response_at: float = field(default_factory=time.monotonic)
    """When the agent last sent a response payload (or registered)."""
    unresponsive: bool = False
    """It answered nothing for an item timeout: it takes no new requests for a while."""
    probation: bool = False
    """Back from being unresponsive: one request at a time until it answers again."""
    strikes: int = 0
    draining: bool = False
    """Switching to a new desired state (rolling swap): takes no new requests."""
    state_revision: str | None = None
    """Revision of the last desired state sent to this agent."""
    refused: bool = False
    """It refused a request (no free slot): full until its next status push."""

    @property
    def busy_slots(self) -> int:
        """Slots taken: this replica's requests, or every replica's as the agent last
        reported them, whichever is more (the report lags this replica's own claims)."""
        return max(self.in_flight, self.status.slots_processing)

    @property
    def free_slots(self) -> int:
        if not self.connected or self.unresponsive or self.draining or self.refused:
            return 0
        slots = min(1, self.status.slots_total) if self.probation else self.status.slots_total
        return max(0, slots - self.busy_slots)

    def snapshot(self) -> AgentSnapshot:
        """Paddler's AgentControllerSnapshot, plus ``model_group`` and the balancer's own
        ``slots_in_flight`` (:mod:`paddler_core.management_wire`)."""
        return AgentSnapshot(
            id=self.id,
            name=self.name,
            model_group=self.model_group,
            slots_in_flight=self.in_flight,
            unresponsive=self.unresponsive,
            draining=self.draining,
            status=self.status,
        )


class AgentPool:
    """Registry of connected agents, indexed by model group and prefix hash."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentController] = {}
        self.available: dict[str, IndexedSet] = {}
        """Per model group: the agents with at least one free slot."""
        self.prefix_index: dict[str, set[AgentController]] = {}
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.remove(listener)

    def changed(self) -> None:
        for listener in self._listeners:
            listener()

    def add(self, agent: AgentController) -> AgentController | None:
        """Register ``agent``; returns the controller it replaces (same id), if any."""
        previous = self.agents.get(agent.id)
        if previous is not None:
            self._forget(previous)
        self.agents[agent.id] = agent
        self._index_prefixes(agent, [], agent.status.prefix_hashes)
        self.refresh(agent)
        self.changed()
        return previous

    def update_status(self, agent: AgentController, status: AgentStatus) -> bool:
        """Apply a snapshot; a stale one (lower version) is dropped. True if applied."""
        if status.version < agent.status.version:
            return False
        old = agent.status.prefix_hashes
        agent.status = status
        agent.refused = False
        if old != status.prefix_hashes:
            self._index_prefixes(agent, old, status.prefix_hashes)
        self.refresh(agent)
        self.changed()
        return True

    def refused(self, agent: AgentController) -> None:
        """``agent`` refused a request for want of a slot: route nothing more to it until
        it reports its status again."""
        agent.refused = True
        self.refresh(agent)

    def remove(self, agent: AgentController) -> None:
        if self.agents.get(agent.id) is agent:
            del self.agents[agent.id]
        self._forget(agent)
        self.changed()

    def refresh(self, agent: AgentController) -> None:
        """Keep ``available`` true after the agent's slots or in-flight count changed."""
        group = self.available.get(agent.model_group)
        if group is None:
            group = self.available[agent.model_group] = IndexedSet()
        if agent.free_slots > 0 and agent.connected:
            group.add(agent)
        else:
            group.discard(agent)

    def in_group(self, group: str) -> list[AgentController]:
        return [a for a in self.agents.values() if a.model_group == group]

    def holding_prefix(self, hashes: list[str]) -> set[AgentController]:
        found: set[AgentController] = set()
        for h in hashes:
            found |= self.prefix_index.get(h, set())
        return found

    def _forget(self, agent: AgentController) -> None:
        agent.connected = False
        self.refresh(agent)
        self._index_prefixes(agent, agent.status.prefix_hashes, [])

    def _index_prefixes(self, agent: AgentController, old: list[str], new: list[str]) -> None:
        agent.held_prefixes = frozenset(new) if agent.connected else frozenset()
        for h in set(old) - set(new):
            holders = self.prefix_index.get(h)
            if holders is not None:
                holders.discard(agent)
                if not holders:
                    del self.prefix_index[h]
        if agent.connected:
            for h in set(new) - set(old):
                self.prefix_index.setdefault(h, set()).add(agent)


def totals(agents: list[AgentController]) -> tuple[int, int]:
    """(slots_total, slots_in_flight) over ``agents``."""
    return sum(a.status.slots_total for a in agents), sum(a.in_flight for a in agents)
