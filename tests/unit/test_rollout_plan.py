"""One rollout per pool: the pure decision (plan_rollout) from what every balancer
replica sees alike, two replicas that pick the same agent, agents that are ahead, and
desired-state versions (kept for the same content, newer for a new one, adopted from
the agents)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paddler_balancer.agents import AgentController, AgentPool
from paddler_balancer.rollout import Position, RolloutAgent, Rollouts, plan_rollout, position
from paddler_balancer.service import Balancer
from paddler_balancer.settings import BalancerSettings
from paddler_balancer.state_store import GroupState, StateStore
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, ModelSource, state_revision
from paddler_core.protocol import AgentStatus, StateApplicationStatus

OLD = BalancerDesiredState(model=ModelSource.local("/m/old.gguf"))
NEW = BalancerDesiredState(model=ModelSource.local("/m/new.gguf"))
R_OLD, R_NEW = state_revision(OLD), state_revision(NEW)
APPLIED = StateApplicationStatus.APPLIED
FRESH = StateApplicationStatus.FRESH
FAILED = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE


def serving(agent_id: str, revision: str = R_OLD, version: int = 1, slots: int = 2) -> RolloutAgent:
    return RolloutAgent(agent_id, revision, version, None, revision, APPLIED, slots)


def switching(agent_id: str, revision: str = R_NEW, version: int = 2) -> RolloutAgent:
    """Holds ``revision`` (whichever replica sent it), still applying it."""
    return RolloutAgent(agent_id, revision, version, None, R_OLD, APPLIED, 0)


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        pytest.param(serving("a"), Position.PENDING, id="serves-the-old-state"),
        pytest.param(serving("a", R_NEW, 2), Position.DONE, id="serves-the-new-state"),
        pytest.param(switching("a"), Position.SWITCHING, id="holds-it-sent-by-any-replica"),
        pytest.param(
            RolloutAgent("a", R_OLD, 1, R_NEW, R_OLD, APPLIED, 2), Position.SWITCHING, id="just-sent-report-lags"
        ),
        pytest.param(RolloutAgent("a", R_NEW, 2, None, R_NEW, FAILED, 0), Position.FAILED, id="could-not-apply"),
        pytest.param(serving("a", "newer", 3), Position.AHEAD, id="holds-a-newer-version"),
        pytest.param(serving("a", R_NEW, 3), Position.DONE, id="same-content-newer-version-is-done"),
        pytest.param(
            RolloutAgent("a", None, None, R_NEW, R_NEW, APPLIED, 2),
            Position.DONE,
            id="agent-that-reports-no-held-state",
        ),
    ],
)
def test_position_of_an_agent(agent: RolloutAgent, expected: Position) -> None:
    assert position(agent, R_NEW, 2) == expected


@pytest.mark.parametrize(
    ("agents", "max_unavailable", "send", "drain"),
    [
        pytest.param(
            [serving("c"), serving("a"), serving("b")], "1", ("a",), {"a"}, id="first-by-id-not-by-registration"
        ),
        pytest.param([serving("a"), serving("b"), serving("c")], "2", ("a", "b"), {"a", "b"}, id="two-at-a-time"),
        pytest.param(
            [switching("a"), serving("b"), serving("c")], "1", (), {"a"} - {"a"}, id="switching-elsewhere-uses-budget"
        ),
        pytest.param(
            [serving("a", R_NEW, 2), switching("b"), serving("c")], "1", (), set(), id="one-switching-none-more"
        ),
        pytest.param(
            [serving("a", R_NEW, 2), serving("b", R_NEW, 2), serving("c")], "1", ("c",), {"c"}, id="next-when-done"
        ),
        pytest.param(
            [serving("a", "newer", 3), serving("b")], "1", ("b",), {"b"}, id="ahead-agent-is-never-drained-or-sent"
        ),
        pytest.param(
            [RolloutAgent("a", R_OLD, 1, None, R_OLD, APPLIED, 0), serving("b"), serving("c")],
            "1",
            ("a", "b"),
            {"b"},
            id="agent-serving-nothing-switches-at-once",
        ),
    ],
)
def test_plan_picks_agents_by_id_within_max_unavailable(
    agents: list[RolloutAgent], max_unavailable: str, send: tuple[str, ...], drain: set[str]
) -> None:
    plan = plan_rollout(R_NEW, 2, agents, MaxUnavailable.parse(max_unavailable), sending=True)
    assert (plan.send, set(plan.drain)) == (send, drain)


def test_agents_serving_the_same_content_under_an_older_version_get_the_newer_one() -> None:
    agents = [serving("a", R_NEW, 1), serving("b", R_NEW, 2), RolloutAgent("c", None, None, R_NEW, R_NEW, APPLIED, 2)]
    plan = plan_rollout(R_NEW, 2, agents, MaxUnavailable.parse("1"), sending=True)
    assert (plan.stamp, plan.send, set(plan.drain)) == (("a",), (), set())


def test_a_failed_rollout_sends_nothing_more() -> None:
    agents = [RolloutAgent("a", R_NEW, 2, None, R_NEW, FAILED, 0), serving("b")]
    plan = plan_rollout(R_NEW, 2, agents, MaxUnavailable.parse("1"), sending=False)
    assert plan.send == ()


def _recorder(into: list[dict[str, Any]]) -> Callable[[dict[str, Any] | str], None]:
    def record(message: dict[str, Any] | str) -> None:
        into.append(json.loads(message) if isinstance(message, str) else message)

    return record


class Replica:
    """A balancer replica's rollout state over its own controllers of shared agents."""

    def __init__(self, agent_ids: list[str]) -> None:
        self.pool = AgentPool()
        self.rollouts = Rollouts(self.pool, MaxUnavailable.parse("1"))
        self.sent: dict[str, list[dict[str, Any]]] = {}
        for agent_id in agent_ids:
            self.sent[agent_id] = []
            agent = AgentController(agent_id, agent_id, "default", _recorder(self.sent[agent_id]))
            agent.status = AgentStatus(
                version=1,
                slots_total=2,
                desired_state_revision=R_OLD,
                desired_state_version=1,
                applied_state_revision=R_OLD,
                state_application_status=APPLIED,
            )
            self.pool.add(agent)

    def report(self, agent_id: str, status: AgentStatus) -> None:
        agent = self.pool.agents[agent_id]
        self.pool.update_status(agent, status.model_copy(update={"version": agent.status.version + 1}))

    def sent_to(self) -> list[str]:
        return sorted(a for a, messages in self.sent.items() if messages)

    def draining(self) -> list[str]:
        return sorted(a.id for a in self.pool.agents.values() if a.draining)


def test_two_replicas_given_the_same_state_switch_the_same_agent_and_then_the_next() -> None:
    one, two = Replica(["b", "a", "c"]), Replica(["c", "b", "a"])  # registered in different orders
    for replica in (one, two):
        replica.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    first = (one.sent_to(), two.sent_to(), one.draining(), two.draining())

    applying = AgentStatus(  # finishing its requests before it loads
        slots_total=2, desired_state_revision=R_NEW, desired_state_version=2, applied_state_revision=R_OLD
    )
    for replica in (one, two):
        replica.report("a", applying)
    still = (one.draining(), two.draining(), list(one.sent["b"]), list(two.sent["b"]))
    done = AgentStatus(
        slots_total=2,
        desired_state_revision=R_NEW,
        desired_state_version=2,
        applied_state_revision=R_NEW,
        state_application_status=APPLIED,
    )
    for replica in (one, two):
        replica.report("a", done)

    assert first == (["a"], ["a"], ["a"], ["a"])
    assert still == (["a"], ["a"], [], [])
    assert one.draining() == two.draining() == ["b"]
    assert one.sent["b"][0]["version"] == 2


def test_a_replica_counts_an_agent_switching_for_another_replica() -> None:
    late = Replica(["a", "b"])
    late.report(
        "a",
        AgentStatus(slots_total=0, desired_state_revision=R_NEW, desired_state_version=2, applied_state_revision=R_OLD),
    )
    late.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    assert late.sent_to() == []
    assert late.draining() == []  # a serves nothing while it loads; b waits for the budget


def test_an_agent_ahead_of_the_rollout_is_left_alone() -> None:
    stale = Replica(["a"])
    stale.report(
        "a",
        AgentStatus(
            slots_total=2,
            desired_state_revision="newer",
            desired_state_version=9,
            applied_state_revision="newer",
            state_application_status=APPLIED,
        ),
    )
    rollout = stale.rollouts.start("default", GroupState(NEW, version=2), GroupState(OLD, version=1))
    assert (stale.sent_to(), stale.draining(), rollout.phase.value) == ([], [], "Complete")


# ---- versions ---------------------------------------------------------------------------------


def test_the_same_content_keeps_its_version_and_a_new_one_gets_a_newer() -> None:
    balancer = Balancer(BalancerSettings())
    never_set = balancer.store.version("default")
    balancer.set_desired_state("default", OLD)
    first = balancer.store.version("default")
    balancer.set_desired_state("default", OLD, owner="ModelDeployment/ns/m")
    again = balancer.store.version("default")
    balancer.set_desired_state("default", NEW)
    assert never_set == 0
    assert first > 0
    assert again == first
    assert balancer.store.version("default") > first


def test_a_state_file_without_versions_reads_version_zero(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"groups": {"default": {"state": OLD.to_json_dict(), "owner": None}}}))
    store = StateStore(f"file://{path}")
    before = store.version("default")
    store.put("default", NEW, None, 42)
    assert (before, StateStore(f"file://{path}").version("default")) == (0, 42)


def test_every_state_sent_to_an_agent_carries_its_version() -> None:
    balancer = Balancer(BalancerSettings())
    sent: list[dict[str, Any]] = []
    agent = AgentController("a", "a", "default", lambda m: sent.append(m if isinstance(m, dict) else json.loads(m)))
    balancer.send_initial_state(agent)
    assert sent[0]["type"] == "set_desired_state"
    assert sent[0]["version"] == 0


async def test_a_replica_behind_its_agents_adopts_their_state_without_sending_it() -> None:
    balancer = Balancer(BalancerSettings())
    sent: list[dict[str, Any]] = []
    agent = AgentController("a", "a", "default", lambda m: sent.append(m if isinstance(m, dict) else json.loads(m)))
    agent.status = AgentStatus(
        version=1,
        slots_total=2,
        desired_state_revision=R_NEW,
        desired_state_version=7,
        applied_state_revision=R_NEW,
        state_application_status=APPLIED,
    )
    balancer.send_initial_state(agent)
    balancer.pool.add(agent)
    balancer.status_received(agent)
    await asyncio.sleep(0)
    query = next(m for m in sent if m.get("type") == "query")
    balancer.reply_received(query["request_id"], {"state": NEW.to_json_dict(), "version": 7})
    for _ in range(100):
        if balancer.store.version("default") == 7:
            break
        await asyncio.sleep(0.001)
    await balancer.close()

    assert query["what"] == "desired_state"
    assert balancer.store.get("default") == NEW
    assert balancer.store.version("default") == 7
    assert [m for m in sent if m.get("type") == "set_desired_state"] == []
    assert agent.draining is False
