"""Routing stages alone, with tables."""

from __future__ import annotations

import random

import pytest

from paddler_balancer import routing
from paddler_balancer.agents import AgentController, IndexedSet
from paddler_balancer.routing import RouteRequest
from paddler_core.protocol import AgentStatus


def agent(
    name: str, *, total: int = 2, in_flight: int = 0, group: str = "default", prefixes: tuple[str, ...] = ()
) -> AgentController:
    a = AgentController(id=name, name=name, model_group=group, send=lambda m: None)
    a.status = AgentStatus(slots_total=total, prefix_hashes=list(prefixes))
    a.held_prefixes = frozenset(prefixes)
    a.in_flight = in_flight
    return a


@pytest.mark.parametrize(
    ("a", "request_group", "passes"),
    [
        (agent("free"), "default", True),
        (agent("full", in_flight=2), "default", False),
        (agent("other", group="llama"), "default", False),
        (agent("zero", total=0), "default", False),
    ],
)
def test_filters(a: AgentController, request_group: str, passes: bool) -> None:
    request = RouteRequest(request_group)
    assert all(f(a, request) for f in routing.FILTERS) is passes


def test_disconnected_agent_is_filtered() -> None:
    a = agent("gone")
    a.connected = False
    assert not routing.is_connected(a, RouteRequest("default"))


@pytest.mark.parametrize(
    ("held", "in_flight", "request_keys", "expected"),
    [
        (("k1", "k2"), 0, ("k1", "k2", "k3"), 2.0),
        (("k1", "k3"), 0, ("k1", "k2", "k3"), 1.0),  # cumulative keys: stop at first miss
        (("k2",), 0, ("k1", "k2"), 0.0),
        (("k1", "k2"), 2, ("k1", "k2"), 0.0),  # at the load cap: affinity ignored
        ((), 0, ("k1",), 0.0),
    ],
)
def test_prefix_affinity_score(
    held: tuple[str, ...], in_flight: int, request_keys: tuple[str, ...], expected: float
) -> None:
    a = agent("a", total=2, in_flight=in_flight, prefixes=held)
    assert routing.prefix_affinity_score(a, RouteRequest("default", request_keys), load_cap=0.75) == expected


@pytest.mark.parametrize(
    ("agents", "keys", "winner"),
    [
        ([agent("a", total=4, in_flight=3), agent("b", total=4, in_flight=1)], (), "b"),
        ([agent("a", total=2), agent("b", total=2)], (), "a"),  # tie: registration order
        ([agent("a", total=8), agent("b", total=2, prefixes=("k",))], ("k",), "b"),
        ([agent("a", total=8), agent("b", total=4, in_flight=3, prefixes=("k",))], ("k",), "a"),
        ([agent("a", in_flight=2), agent("b", in_flight=2)], (), None),
    ],
)
def test_pick(agents: list[AgentController], keys: tuple[str, ...], winner: str | None) -> None:
    chosen = routing.pick(agents, RouteRequest("default", keys), load_cap=0.75)
    assert (chosen.name if chosen else None) == winner


def indexed(agents: list[AgentController]) -> IndexedSet:
    s = IndexedSet()
    for a in agents:
        s.add(a)
    return s


def test_candidates_are_capped_but_keep_prefix_holders() -> None:
    many = [agent(f"a{i}") for i in range(1000)]
    holder = many[500]
    chosen = routing.candidates(indexed(many), {holder}, limit=16, rng=random.Random(1))
    assert len(chosen) == 16
    assert holder in chosen
    many_holders = set(many[:100])
    assert len(routing.candidates(indexed(many), many_holders, limit=16, rng=random.Random(1))) == 16
    assert len(routing.candidates(indexed(many[:10]), set(), limit=16, rng=random.Random(1))) == 10


def test_indexed_set_discard_keeps_the_rest_reachable() -> None:
    agents = [agent(f"a{i}") for i in range(5)]
    s = indexed(agents)
    s.discard(agents[1])
    s.discard(agents[1])
    s.discard(agents[4])
    assert sorted(a.id for a in s) == ["a0", "a2", "a3"]
    assert agents[1] not in s
    assert len(s) == 3
