"""Agent selection: filters -> scorers -> picker. Each stage is a small pure function.

Filters drop agents that cannot take the request; scorers give each survivor a
score tuple (higher is better); the picker takes the best, ties broken by
registration order. Candidates are capped (random sample) so a decision costs
the same with 10 agents or 1,000.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from paddler_balancer.agents import AgentController, IndexedSet


@dataclass(frozen=True)
class RouteRequest:
    model_group: str
    prefix_hashes: tuple[str, ...] = ()
    """Hashes of the request's prompt prefix blocks (for prefix affinity)."""


Filter = Callable[[AgentController, RouteRequest], bool]


def serves_model_group(agent: AgentController, request: RouteRequest) -> bool:
    return agent.model_group == request.model_group


def is_connected(agent: AgentController, _request: RouteRequest) -> bool:
    return agent.connected


def has_free_slot(agent: AgentController, _request: RouteRequest) -> bool:
    return agent.free_slots > 0


FILTERS: tuple[Filter, ...] = (is_connected, serves_model_group, has_free_slot)


def free_slots_score(agent: AgentController) -> float:
    return float(agent.free_slots)


def prefix_affinity_score(agent: AgentController, request: RouteRequest, load_cap: float) -> float:
    """Matched prefix blocks, counted only while the agent is below ``load_cap`` usage."""
    held = agent.held_prefixes
    if not request.prefix_hashes or not held or agent.status.slots_total == 0:
        return 0.0
    if agent.busy_slots / agent.status.slots_total >= load_cap:
        return 0.0
    matched = 0
    for h in request.prefix_hashes:  # cumulative hashes: stop at the first miss
        if h not in held:
            break
        matched += 1
    return float(matched)


def score(agent: AgentController, request: RouteRequest, load_cap: float) -> tuple[float, float]:
    return (prefix_affinity_score(agent, request, load_cap), free_slots_score(agent))


def pick(candidates: Iterable[AgentController], request: RouteRequest, load_cap: float) -> AgentController | None:
    best: AgentController | None = None
    best_key: tuple[float, float, int] | None = None
    for agent in candidates:
        if not all(f(agent, request) for f in FILTERS):
            continue
        affinity, free = score(agent, request, load_cap)
        key = (affinity, free, -agent.order)
        if best_key is None or key > best_key:
            best, best_key = agent, key
    return best


def candidates(
    available: IndexedSet,
    prefix_holders: set[AgentController],
    limit: int,
    rng: random.Random,
) -> list[AgentController]:
    """Agents worth scoring: every available one if few; else up to ``limit // 2``
    available prefix holders plus a random sample, ``limit`` in all (power-of-k
    choices: the decision costs O(limit) whatever the pool size)."""
    if len(available) <= limit:
        return list(available)
    holders = [a for a in prefix_holders if a in available]
    if len(holders) > limit // 2:
        holders = rng.sample(holders, limit // 2)
    return holders + available.sample(limit - len(holders), rng)
