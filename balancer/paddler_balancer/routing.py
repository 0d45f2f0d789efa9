"""Agent selection: filters -> scorers -> picker. Each stage is a small pure function.

Filters drop agents that cannot take the request; scorers give each survivor a
score tuple (higher is better); the picker takes the best. Candidates are capped
(random sample) so a decision costs the same with 10 agents or 1,000.

Two policies (:class:`RoutingPolicy`):

* ``least-busy`` (Paddler 4.1): most free slots, ties by registration order.
* ``prefix`` (default): the agent that reports holding the longest run of the
  request's prefix keys, counted only while that agent's share of busy slots is below
  the load cap; then consistent hashing with bounded loads (CHWBL): among the agents
  whose load stays within ``load_factor`` times the mean of the agents scored, the one that
  ranks first for the request's anchor key (rendezvous hashing over agent ids). Every
  input is the request's keys and what the agents reported, never one replica's
  private history, so every balancer replica makes the same choice for the same state.

When requests are buffered, :func:`hand_over` decides which of them a freed slot takes:
the oldest, or under ``prefix`` a slightly younger one whose prefix the agent holds
(bounded, so nobody waits more than a few extra turns).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from paddler_balancer.agents import AgentController, IndexedSet
from paddler_balancer.settings import RoutingPolicy

__all__ = ["RoutingPolicy"]


@dataclass(frozen=True)
class RouteRequest:
    model_group: str
    prefix_hashes: tuple[str, ...] = ()
    """Hashes of the request's prompt prefix blocks (for prefix affinity)."""


@dataclass(frozen=True)
class RoutingConfig:
    policy: RoutingPolicy = RoutingPolicy.PREFIX
    load_cap: float = 0.75
    """Affinity counts only for agents using less than this share of their slots."""
    load_factor: float = 1.25
    """CHWBL bound: an agent takes a request only while its busy slots after it stay
    within this factor of its fair share of the scored agents' load."""
    buffer_lookahead: int = 4
    """Buffered requests behind the first that a freed slot may go to instead (prefix policy)."""
    max_passed_over: int = 2
    """Times one buffered request may be passed over for a later one: the bound on unfairness."""


# ---- filters ------------------------------------------------------------------------------

Filter = Callable[[AgentController, RouteRequest], bool]


def serves_model_group(agent: AgentController, request: RouteRequest) -> bool:
    return agent.model_group == request.model_group


def is_connected(agent: AgentController, _request: RouteRequest) -> bool:
    return agent.connected


def has_free_slot(agent: AgentController, _request: RouteRequest) -> bool:
    return agent.free_slots > 0


FILTERS: tuple[Filter, ...] = (is_connected, serves_model_group, has_free_slot)


def eligible(candidates: Iterable[AgentController], request: RouteRequest) -> list[AgentController]:
    return [a for a in candidates if all(f(a, request) for f in FILTERS)]


# ---- scorers ------------------------------------------------------------------------------


def free_slots_score(agent: AgentController) -> float:
    return float(agent.free_slots)


def over_load_cap(agent: AgentController, load_cap: float) -> bool:
    """Its share of busy slots is at or above ``load_cap`` (an agent without slots is)."""
    total = agent.status.slots_total
    return total == 0 or agent.busy_slots >= load_cap * total


def matched_prefix(agent: AgentController, request: RouteRequest) -> int:
    """Leading request keys the agent reports holding (cumulative keys: stop at the first miss)."""
    held = agent.held_prefixes
    matched = 0
    for key in request.prefix_hashes:
        if key not in held:
            break
        matched += 1
    return matched


def prefix_affinity_score(agent: AgentController, request: RouteRequest, load_cap: float) -> float:
    """Matched prefix blocks, counted only while the agent is below ``load_cap`` usage."""
    if not request.prefix_hashes or not agent.held_prefixes or over_load_cap(agent, load_cap):
        return 0.0
    return float(matched_prefix(agent, request))


def anchor_key(request: RouteRequest) -> str | None:
    """The key a new prefix is placed by: the second key (a conversation's system prompt
    and first message: the same on every turn of it, different between conversations
    that share a system prompt), or the first when there is only one."""
    keys = request.prefix_hashes
    if not keys:
        return None
    return keys[1] if len(keys) > 1 else keys[0]


def rendezvous_rank(agent_id: str, key: str) -> int:
    """Highest-random-weight rank of ``agent_id`` for ``key``: the same on every replica,
    and adding or removing an agent moves only the keys it ranks first for."""
    digest = hashlib.blake2b(f"{key}\x1f{agent_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Load:
    """Busy and total slots of the agents scored together."""

    busy: int
    slots: int

    @classmethod
    def of(cls, agents: Sequence[AgentController]) -> Load:
        return cls(sum(a.busy_slots for a in agents), sum(a.status.slots_total for a in agents))


def within_bounded_load(agent: AgentController, load: Load, load_factor: float) -> bool:
    """CHWBL: with one more request, the agent's busy slots stay within ``load_factor``
    times its fair share (by slots) of the scored agents' load, rounded up."""
    if load.slots == 0:
        return False
    allowed = math.ceil(load_factor * (load.busy + 1) * agent.status.slots_total / load.slots)
    return agent.busy_slots + 1 <= allowed


def least_busy_key(agent: AgentController) -> tuple[float, int]:
    return (free_slots_score(agent), -agent.order)


def prefix_key(
    agent: AgentController, request: RouteRequest, load: Load, config: RoutingConfig
) -> tuple[float, int, int]:
    """(affinity under the cap, within the CHWBL bound, rendezvous rank of the anchor key)."""
    anchor = anchor_key(request)
    rank = rendezvous_rank(agent.id, anchor) if anchor is not None else 0
    bounded = int(within_bounded_load(agent, load, config.load_factor))
    return (prefix_affinity_score(agent, request, config.load_cap), bounded, rank)


# ---- picker -------------------------------------------------------------------------------


def pick(
    candidates: Iterable[AgentController], request: RouteRequest, config: RoutingConfig | None = None
) -> AgentController | None:
    """The agent to send ``request`` to, or None when none can take it now."""
    config = config or RoutingConfig()
    agents = eligible(candidates, request)
    if not agents:
        return None
    if config.policy is RoutingPolicy.LEAST_BUSY or not request.prefix_hashes:
        return max(agents, key=least_busy_key)
    load = Load.of(agents)
    return max(agents, key=lambda a: prefix_key(a, request, load, config))


@dataclass(frozen=True)
class Waiting:
    """A buffered request, as the hand-over sees it."""

    request: RouteRequest
    passed_over: int
    """Times a later request took a slot before it."""


def hand_over(agent: AgentController, waiting: Sequence[Waiting], config: RoutingConfig | None = None) -> int:
    """Which buffered request a free slot of ``agent`` goes to, as an index into ``waiting`` (the
    group's buffer, oldest first; ``agent`` is the one :func:`pick` chose for the oldest).

    First come, first served (0), except under the prefix policy: a request among the next
    ``buffer_lookahead`` whose prompt the agent holds a longer prefix of than the first's takes
    it (the longest, the oldest of equals), as long as nobody it would pass has been passed
    over ``max_passed_over`` times already. At saturation every agent is over the load cap, so
    :func:`pick` places the first request on whichever slot frees; this is where affinity
    still pays there, at a bounded cost in order."""
    config = config or RoutingConfig()
    if config.policy is RoutingPolicy.LEAST_BUSY or len(waiting) < 2:
        return 0
    best, best_match = 0, matched_prefix(agent, waiting[0].request)
    for index in range(1, min(len(waiting), config.buffer_lookahead + 1)):
        if waiting[index - 1].passed_over >= config.max_passed_over:
            break  # may not be passed again, nor may anyone behind be served before it
        match = matched_prefix(agent, waiting[index].request)
        if match > best_match:
            best, best_match = index, match
    return best


def candidates(
    available: IndexedSet,
    prefix_holders: set[AgentController],
    limit: int,
    rng: random.Random,
) -> list[AgentController]:
    """Agents worth scoring: every available one if few; else up to ``limit // 2``
    available prefix holders plus a random sample, ``limit`` in all (power-of-k
    choices: the decision costs O(limit) whatever the pool size). Beyond ``limit``
    agents the hash ranks only the sample, so replicas may place a new prefix apart."""
    if len(available) <= limit:
        return list(available)
    holders = [a for a in prefix_holders if a in available]
    if len(holders) > limit // 2:
        holders = rng.sample(holders, limit // 2)
    return holders + available.sample(limit - len(holders), rng)
