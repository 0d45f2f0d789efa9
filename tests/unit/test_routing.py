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
    ("total", "busy", "cap", "over"),
    [
        (2, 0, 0.75, False),
        (2, 1, 0.75, False),  # 0.5 of its slots
        (4, 3, 0.75, True),  # exactly at the cap
        (4, 2, 0.75, False),
        (8, 7, 0.9, False),
        (0, 0, 0.75, True),  # no slots at all
    ],
)
def test_over_load_cap(total: int, busy: int, cap: float, over: bool) -> None:
    assert routing.over_load_cap(agent("a", total=total, in_flight=busy), cap) is over


@pytest.mark.parametrize(
    ("keys", "anchor"),
    [
        ((), None),
        (("sys",), "sys"),
        (("sys", "sys+first"), "sys+first"),  # a conversation: its first message too
        (("sys", "sys+first", "sys+first+answer"), "sys+first"),  # the same on every turn
    ],
)
def test_anchor_key(keys: tuple[str, ...], anchor: str | None) -> None:
    assert routing.anchor_key(RouteRequest("default", keys)) == anchor


@pytest.mark.parametrize(
    ("slots", "busy", "others_busy", "within"),
    [
        (2, 0, (0, 0), True),  # idle pool: one request each
        (2, 1, (0, 0), False),  # a second one while two agents idle: over 1.25 x fair share
        (2, 1, (1, 0), True),  # ceil(1.25 * 3 / 3) = 2
        (2, 1, (1, 1), True),
        (4, 2, (0, 0), False),  # more slots, more share: ceil(1.25 * 3 * 4/8) = 2
        (4, 1, (0, 0), True),
    ],
)
def test_within_bounded_load(slots: int, busy: int, others_busy: tuple[int, ...], within: bool) -> None:
    me = agent("me", total=slots, in_flight=busy)
    others = [agent(f"o{i}", total=2, in_flight=b) for i, b in enumerate(others_busy)]
    load = routing.Load.of([me, *others])
    assert routing.within_bounded_load(me, load, load_factor=1.25) is within


def test_rendezvous_ranks_are_stable_and_independent_of_the_other_agents() -> None:
    assert routing.rendezvous_rank("a", "k") == routing.rendezvous_rank("a", "k")
    assert routing.rendezvous_rank("a", "k") != routing.rendezvous_rank("b", "k")


PREFIX = routing.RoutingConfig(policy=routing.RoutingPolicy.PREFIX, load_cap=0.75, load_factor=1.25)
LEAST_BUSY = routing.RoutingConfig(policy=routing.RoutingPolicy.LEAST_BUSY)
# Rendezvous order of agents a, b, c (see test_rendezvous_orders_used_by_the_tables):
# k0: b c a; k1: c a b; k3: a b c.


def test_rendezvous_orders_used_by_the_tables() -> None:
    for key, order in {"k0": "bca", "k1": "cab", "k3": "abc"}.items():
        assert "".join(sorted("abc", key=lambda i, k=key: -routing.rendezvous_rank(i, k))) == order


@pytest.mark.parametrize(
    ("agents", "keys", "winner"),
    [
        # no prefix keys: least busy, ties by registration order
        ([agent("a", total=4, in_flight=3), agent("b", total=4, in_flight=1)], (), "b"),
        ([agent("a", total=2), agent("b", total=2)], (), "a"),
        # affinity: the holder, even with fewer free slots
        ([agent("a", total=8), agent("b", total=2, prefixes=("k",))], ("k",), "b"),
        # the longest run of keys wins
        ([agent("a", prefixes=("s",)), agent("b", prefixes=("s", "k0")), agent("c")], ("s", "k0", "x"), "b"),
        # affinity with one slot busy (below the cap) beats idle agents
        ([agent("a"), agent("b", in_flight=1, prefixes=("s", "k1")), agent("c")], ("s", "k1", "x"), "b"),
        # at the cap affinity is ignored: bounded load and the hash decide
        ([agent("a", total=8), agent("b", total=4, in_flight=3, prefixes=("k",))], ("k",), "a"),
        # a new prefix goes to the rendezvous owner of its anchor key, not to the first agent
        ([agent("a"), agent("b"), agent("c")], ("s", "k3"), "a"),
        ([agent("a"), agent("b"), agent("c")], ("s", "k0"), "b"),
        ([agent("a"), agent("b"), agent("c")], ("k1",), "c"),
        # the owner (b for k0) is over its bounded load while others idle: the next one (c)
        ([agent("a"), agent("b", in_flight=1), agent("c")], ("s", "k0"), "c"),
        # holders tie on the shared system prompt: the hash of the anchor breaks it
        ([agent("a", prefixes=("s",)), agent("b"), agent("c", prefixes=("s",))], ("s", "k1"), "c"),
        ([agent("a", prefixes=("s",)), agent("b"), agent("c", prefixes=("s",))], ("s", "k3"), "a"),
        # nobody has a free slot
        ([agent("a", in_flight=2), agent("b", in_flight=2)], (), None),
        ([agent("a", in_flight=2, prefixes=("k",)), agent("b", in_flight=2)], ("k",), None),
    ],
)
def test_pick_prefix(agents: list[AgentController], keys: tuple[str, ...], winner: str | None) -> None:
    chosen = routing.pick(agents, RouteRequest("default", keys), PREFIX)
    assert (chosen.name if chosen else None) == winner


@pytest.mark.parametrize(
    ("agents", "keys", "winner"),
    [
        ([agent("a", total=2, prefixes=("k",)), agent("b", total=4)], ("k",), "b"),  # prefixes ignored
        ([agent("a", prefixes=("k",)), agent("b")], ("k",), "a"),  # tie: registration order
        ([agent("a", in_flight=1), agent("b"), agent("c")], ("s", "k3"), "b"),
        ([agent("a", in_flight=2), agent("b", in_flight=2)], (), None),
    ],
)
def test_pick_least_busy(agents: list[AgentController], keys: tuple[str, ...], winner: str | None) -> None:
    chosen = routing.pick(agents, RouteRequest("default", keys), LEAST_BUSY)
    assert (chosen.name if chosen else None) == winner


def replica_view(specs: list[tuple[str, int, tuple[str, ...]]], *, reverse: bool) -> list[AgentController]:
    """What one balancer replica sees of the same agents: their reports (busy slots as
    reported, prefix sets), registered in its own order."""
    ordered = list(reversed(specs)) if reverse else specs
    agents = []
    for name, busy, prefixes in ordered:
        a = agent(name, prefixes=prefixes)
        a.status = AgentStatus(slots_total=2, slots_processing=busy, prefix_hashes=list(prefixes))
        agents.append(a)
    return agents


@pytest.mark.parametrize(
    ("specs", "keys"),
    [
        ([("a", 0, ()), ("b", 0, ()), ("c", 0, ())], ("s", "k0")),  # new prefix
        ([("a", 0, ()), ("b", 0, ()), ("c", 0, ())], ("s", "k3")),
        ([("a", 0, ("s",)), ("b", 0, ()), ("c", 0, ("s",))], ("s", "k1")),  # holders tie
        ([("a", 1, ("s", "k0")), ("b", 0, ()), ("c", 0, ())], ("s", "k0", "t2")),  # next turn
        ([("a", 0, ()), ("b", 1, ()), ("c", 0, ())], ("s", "k0")),  # owner bounded
    ],
)
def test_replicas_seeing_the_same_reports_choose_the_same_agent(
    specs: list[tuple[str, int, tuple[str, ...]]], keys: tuple[str, ...]
) -> None:
    request = RouteRequest("default", keys)
    first = routing.pick(replica_view(specs, reverse=False), request, PREFIX)
    second = routing.pick(replica_view(specs, reverse=True), request, PREFIX)
    assert first is not None
    assert second is not None
    assert first.id == second.id


def test_one_prefix_for_every_request_uses_every_slot_and_none_beyond() -> None:
    agents = [agent(name) for name in "abc"]
    for i in range(6):
        chosen = routing.pick(agents, RouteRequest("default", ("one", f"one+q{i}")), PREFIX)
        assert chosen is not None
        chosen.in_flight += 1
        chosen.held_prefixes = chosen.held_prefixes | {"one"}
    assert [a.in_flight for a in agents] == [2, 2, 2]
    assert routing.pick(agents, RouteRequest("default", ("one", "one+q6")), PREFIX) is None


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


def waiting(*queue: tuple[tuple[str, ...], int]) -> list[routing.Waiting]:
    """A buffer, oldest first: (prefix keys, times passed over) per request."""
    return [routing.Waiting(RouteRequest("default", keys), passed) for keys, passed in queue]


@pytest.mark.parametrize(
    ("queue", "config", "chosen"),
    [
        # the agent holds the second request's prefix: it takes the slot
        (waiting((("q",), 0), (("s", "k"), 0)), PREFIX, 1),
        # least-busy: first come, first served
        (waiting((("q",), 0), (("s", "k"), 0)), LEAST_BUSY, 0),
        # the first holds as much as any later one: it keeps its turn
        (waiting((("s", "x"), 0), (("s", "y"), 0)), PREFIX, 0),
        # the longest held prefix wins, the oldest of equals
        (waiting((("q",), 0), (("s",), 0), (("s", "k"), 0), (("s", "k"), 0)), PREFIX, 2),
        # nobody passed over max_passed_over times is passed again
        (waiting((("q",), 2), (("s", "k"), 0)), PREFIX, 0),
        # ... nor is anyone behind it served first
        (waiting((("q",), 0), (("r",), 2), (("s", "k"), 0)), PREFIX, 0),
        # beyond the lookahead (4 behind the first) the order holds
        (waiting((("q",), 0), *[(("r",), 0)] * 4, (("s", "k"), 0)), PREFIX, 0),
        (waiting((("q",), 0), *[(("r",), 0)] * 3, (("s", "k"), 0)), PREFIX, 4),
        # a lone request
        (waiting((("q",), 0)), PREFIX, 0),
    ],
)
def test_hand_over(queue: list[routing.Waiting], config: routing.RoutingConfig, chosen: int) -> None:
    freed = agent("a", total=2, in_flight=1, prefixes=("s", "k"))
    assert routing.hand_over(freed, queue, config) == chosen
