"""The rollout state machine (balancer side) with in-memory agents, and MaxUnavailable."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_balancer.agents import AgentController, AgentPool
from paddler_balancer.rollout import RolloutPhase, Rollouts
from paddler_balancer.state_store import GroupState
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, ModelSource, state_revision
from paddler_core.protocol import AgentIssue, AgentStatus, StateApplicationStatus

OLD = BalancerDesiredState(model=ModelSource.local("/m/old.gguf"))
NEW = BalancerDesiredState(model=ModelSource.local("/m/new.gguf"))


@pytest.mark.parametrize(
    ("text", "agents", "count", "shown"),
    [("1", 10, 1, "1"), ("3", 2, 3, "3"), ("25%", 8, 2, "25%"), ("25%", 3, 1, "25%"), ("0", 4, 1, "0"),
     ("100%", 5, 5, "100%"), (" 50 % ", 4, 2, "50%"), (2, 4, 2, "2")],
)  # fmt: skip
def test_max_unavailable_counts(text: str | int, agents: int, count: int, shown: str) -> None:
    parsed = MaxUnavailable.parse(text)
    assert (parsed.count(agents), str(parsed)) == (count, shown)


@pytest.mark.parametrize("text", ["", "-1", "1.5", "abc", "101%", "%"])
def test_max_unavailable_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="max unavailable"):
        MaxUnavailable.parse(text)


def test_state_revision_follows_content() -> None:
    assert state_revision(OLD) == state_revision(BalancerDesiredState(model=ModelSource.local("/m/old.gguf")))
    assert state_revision(OLD) != state_revision(NEW)


class Agents:
    def __init__(self, count: int, slots_total: int = 2) -> None:
        self.pool = AgentPool()
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.rollouts = Rollouts(self.pool, MaxUnavailable.parse("1"))
        for i in range(count):
            agent_id = f"a{i}"
            self.sent[agent_id] = []
            agent = AgentController(agent_id, agent_id, "default", self.sent[agent_id].append)
            agent.status = AgentStatus(slots_total=slots_total, version=1)
            self.rollouts.send_state(agent, OLD, 1)
            self.report(agent, OLD, slots_total=slots_total)
            self.pool.add(agent)
            self.sent[agent_id].clear()

    def agent(self, agent_id: str) -> AgentController:
        return self.pool.agents[agent_id]

    def report(
        self,
        agent: AgentController,
        state: BalancerDesiredState,
        *,
        ok: bool = True,
        slots_total: int = 2,
    ) -> None:
        status = AgentStatus(
            version=agent.status.version + 1,
            slots_total=slots_total,
            applied_state_revision=state_revision(state),
            state_application_status=(
                StateApplicationStatus.APPLIED if ok else StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
            ),
            issues=[] if ok else [AgentIssue(variant="ModelCannotBeLoaded", params={"message": "bad file"})],
        )
        if agent.id in self.pool.agents:
            self.pool.update_status(agent, status)
        else:
            agent.status = status

    def switching(self) -> list[str]:
        return sorted(a for a, messages in self.sent.items() if messages)

    def draining(self) -> list[str]:
        return sorted(a.id for a in self.pool.agents.values() if a.draining)


def test_serving_agents_switch_one_at_a_time_and_take_requests_again_after() -> None:
    group = Agents(3)
    rollout = group.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    first = group.switching()
    assert len(first) == 1
    assert group.draining() == first
    assert group.sent[first[0]][0]["revision"] == state_revision(NEW)
    assert group.agent(first[0]).free_slots == 0
    assert (rollout.phase, rollout.applied, rollout.total) == (RolloutPhase.PROGRESSING, 0, 3)

    group.report(group.agent(first[0]), NEW)
    assert group.agent(first[0]).free_slots == 2
    second = [a for a in group.switching() if a not in first]
    assert len(second) == 1
    assert group.draining() == second
    group.report(group.agent(second[0]), NEW)
    group.report(group.agent(group.draining()[0]), NEW)
    assert (rollout.phase, rollout.applied, rollout.total, group.draining()) == (RolloutPhase.COMPLETE, 3, 3, [])


def test_agents_that_serve_nothing_switch_at_once() -> None:
    group = Agents(3, slots_total=0)
    group.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    assert group.switching() == ["a0", "a1", "a2"]
    assert group.draining() == []


def test_a_failed_load_stops_the_rollout_and_newcomers_get_the_old_state() -> None:
    group = Agents(3)
    rollout = group.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    (first,) = group.switching()
    group.report(group.agent(first), NEW, ok=False)
    assert rollout.phase == RolloutPhase.FAILED
    assert "bad file" in rollout.message
    assert "0/3" in rollout.message
    assert group.switching() == [first]
    assert group.draining() == []
    assert group.rollouts.state_for_new_agent("default", GroupState(NEW, version=2)).state == OLD


def test_a_newer_state_switches_the_draining_agent_first_within_the_budget() -> None:
    group = Agents(3)
    group.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    (first,) = group.draining()
    third = BalancerDesiredState(model=ModelSource.local("/m/third.gguf"))
    group.rollouts.start("default", GroupState(third, version=3), GroupState(NEW, version=2))
    assert group.draining() == [first]
    assert group.sent[first][-1]["revision"] == state_revision(third)
    assert sum(bool(m) for m in group.sent.values()) == 1


def test_the_same_state_again_only_changes_max_unavailable() -> None:
    group = Agents(4)
    rollout = group.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    again = group.rollouts.start(
        "default", GroupState(NEW, version=2), GroupState(OLD, version=1), MaxUnavailable.parse("2")
    )
    assert again is rollout
    assert len(group.draining()) == 2
