"""Rolling desired-state changes: a model group's agents switch a few at a time.

A new desired state for a group starts a :class:`Rollout`. Agents that serve
nothing (no model yet, just registered) get the state at once: switching them
costs no capacity. The others switch at most ``max_unavailable`` at a time: the
balancer stops routing to the agent (``draining``) and sends it the state; the
agent finishes its in-flight requests, loads, and reports the state's revision
as applied; then it takes requests again and the next agent switches. The rest of
the group serves the old model meanwhile, so a load slower than the buffer
timeout fails no request as long as one agent still serves.

One rollout per pool, however many balancer replicas: which agent switches next is
:func:`plan_rollout`, a pure function of what every replica sees alike (each agent
reports the state it holds, ``desired_state_revision``/``desired_state_version``, and
how applying it went), not of this replica's memory. Agents are taken by id; an
agent that holds the rollout's revision, whichever replica sent it, counts as
switching. Two replicas given the same state pick the same agent at the same time
(the state sent twice is adopted, never loaded twice). An agent that holds a newer
version than the rollout is ahead: it is never drained or sent the older state (the
replica adopts the newer state instead: ``Balancer.status_received``).

An agent that reports the revision as not appliable (the model cannot be
downloaded or loaded) stops the rollout: ``Failed`` with the agent's issue as
the message. Agents not yet switched keep the old state, and agents that join
the group later get the old state too, so they can serve.

The rollout advances on every change of the agent pool (status pushes, agents
joining or leaving): :meth:`Rollouts.tick` is an :class:`AgentPool` listener.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paddler_balancer.agents import AgentController, AgentPool
from paddler_balancer.state_store import GroupState
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, state_revision
from paddler_core.protocol import SetDesiredStateMessage, StateApplicationStatus

log = logging.getLogger(__name__)

FAILED_STATES = frozenset({StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE, StateApplicationStatus.STUCK})


class RolloutPhase(StrEnum):
    PROGRESSING = "Progressing"
    COMPLETE = "Complete"
    FAILED = "Failed"


class Position(StrEnum):
    """Where one agent stands in a rollout."""

    DONE = "Done"
    """It serves the rollout's state."""
    FAILED = "Failed"
    """It could not apply the rollout's state."""
    SWITCHING = "Switching"
    """It holds (or was just sent) the rollout's state and has not finished applying it."""
    PENDING = "Pending"
    """It still holds another state."""
    AHEAD = "Ahead"
    """It holds a newer version than the rollout's: leave it alone."""


@dataclass(frozen=True)
class RolloutAgent:
    """What a rollout decides on for one agent: its report (the same on every replica)
    and the revision this replica last sent it (its report lags a send by a moment; an
    agent that reports no held revision, an older agent, is judged by it too)."""

    id: str
    held_revision: str | None = None
    held_version: int | None = None
    sent_revision: str | None = None
    applied_revision: str | None = None
    application: StateApplicationStatus = StateApplicationStatus.FRESH
    slots_total: int = 0
    busy: int = 0

    @classmethod
    def of(cls, agent: AgentController) -> RolloutAgent:
        status = agent.status
        return cls(
            id=agent.id,
            held_revision=status.desired_state_revision,
            held_version=status.desired_state_version,
            sent_revision=agent.state_revision,
            applied_revision=status.applied_state_revision,
            application=status.state_application_status,
            slots_total=status.slots_total,
            busy=agent.busy_slots,
        )

    @property
    def holds(self) -> str | None:
        return self.held_revision if self.held_revision is not None else self.sent_revision

    @property
    def costs_capacity(self) -> bool:
        """Switching it takes slots away (it has some, or requests on them)."""
        return self.slots_total > 0 or self.busy > 0

    @property
    def in_transition(self) -> bool:
        """It is applying some state (maybe another rollout's): already unavailable."""
        settled = self.application == StateApplicationStatus.APPLIED or self.application in FAILED_STATES
        return self.holds is not None and (self.applied_revision != self.holds or not settled)


def position(agent: RolloutAgent, revision: str, version: int) -> Position:
    if agent.held_version is not None and agent.held_version > version and agent.held_revision != revision:
        return Position.AHEAD
    if agent.applied_revision == revision and agent.holds in (revision, None):
        if agent.application == StateApplicationStatus.APPLIED:
            return Position.DONE
        if agent.application in FAILED_STATES:
            return Position.FAILED
    if revision in (agent.holds, agent.sent_revision):
        return Position.SWITCHING
    return Position.PENDING


@dataclass(frozen=True)
class RolloutPlan:
    positions: Mapping[str, Position]
    send: tuple[str, ...]
    """Agents to send the rollout's state now."""
    drain: frozenset[str]
    """Agents that take no new requests: switching ones with capacity, and those sent now."""
    stamp: tuple[str, ...] = ()
    """Agents that serve the rollout's content under an older version: sent the state
    again, which they adopt without reloading (two replicas that stamped the same content
    a moment apart converge on the later version)."""

    def count(self, wanted: Position) -> int:
        return sum(1 for p in self.positions.values() if p is wanted)


def plan_rollout(
    revision: str, version: int, agents: Sequence[RolloutAgent], max_unavailable: MaxUnavailable, *, sending: bool
) -> RolloutPlan:
    """Pure: who switches now. Every switching agent counts against ``max_unavailable``;
    pending agents that serve nothing switch at once, then agents in the middle of
    another switch (they are unavailable already), then the rest by id. ``sending``
    False (a failed or finished rollout): nobody new switches."""
    ordered = sorted(agents, key=lambda a: a.id)
    positions = {a.id: position(a, revision, version) for a in ordered}
    switching = [a for a in ordered if positions[a.id] is Position.SWITCHING]
    drain = {a.id for a in switching if a.costs_capacity}
    send: list[str] = []
    if sending:
        budget = max_unavailable.count(len(ordered)) - len(switching)
        pending = [a for a in ordered if positions[a.id] is Position.PENDING]
        pending.sort(key=lambda a: (a.costs_capacity, not a.in_transition, a.id))
        for agent in pending:
            if agent.costs_capacity:
                if budget <= 0:
                    break
                budget -= 1
                drain.add(agent.id)
            send.append(agent.id)
    stamp = tuple(
        a.id
        for a in ordered
        if positions[a.id] is Position.DONE and a.held_version is not None and a.held_version < version
    )
    return RolloutPlan(positions, tuple(send), frozenset(drain), stamp)


@dataclass(eq=False)
class Rollout:
    group: str
    state: BalancerDesiredState
    revision: str
    max_unavailable: MaxUnavailable
    previous: GroupState | None
    """The last state the group completed: what agents not yet switched serve."""
    version: int = 0
    phase: RolloutPhase = RolloutPhase.PROGRESSING
    message: str = ""
    applied: int = 0
    """Agents of the group that serve this state."""
    total: int = 0
    """Agents in the group."""
    unavailable: set[str] = field(default_factory=set)
    """Ids of agents this replica keeps from taking requests while they switch."""

    @property
    def active(self) -> bool:
        return self.phase == RolloutPhase.PROGRESSING or bool(self.unavailable)

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "version": self.version,
            "phase": self.phase.value,
            "applied": self.applied,
            "total": self.total,
            "max_unavailable": str(self.max_unavailable),
            "message": self.message,
        }


def _failure_message(rollout: Rollout, failed: list[AgentController], done: int, total: int) -> str:
    reasons = []
    for agent in failed:
        status = agent.status
        issues = "; ".join(issue.message for issue in status.issues) or status.state_application_status
        reasons.append(f"{agent.name or agent.id}: {issues}")
    return (
        f"{rollout.state.model.describe()} could not be applied, rollout stopped at "
        f"{done}/{total} agents: " + "; ".join(reasons)
    )[:1000]


class Rollouts:
    """The rollout of each model group; advanced by pool changes."""

    def __init__(self, pool: AgentPool, default_max_unavailable: MaxUnavailable) -> None:
        self.pool = pool
        self.default_max_unavailable = default_max_unavailable
        self.by_group: dict[str, Rollout] = {}
        self._ticking = False
        pool.on_change(self.tick)

    def start(
        self,
        group: str,
        target: GroupState,
        before: GroupState | None,
        max_unavailable: MaxUnavailable | None = None,
    ) -> Rollout:
        """Roll ``target`` (state and version) over the group's agents. ``before`` is the
        group's state until now. The same state again only updates ``max_unavailable``
        and the version (a PUT is idempotent)."""
        state = target.state
        revision = state_revision(state)
        current = self.by_group.get(group)
        limit = max_unavailable or (current.max_unavailable if current else self.default_max_unavailable)
        if current is not None and current.revision == revision:
            current.max_unavailable = limit
            current.version = max(current.version, target.version)
            self.tick()
            return current
        previous = before
        if current is not None:
            completed = GroupState(current.state, None, current.version)
            previous = completed if current.phase == RolloutPhase.COMPLETE else current.previous
        rollout = Rollout(group, state, revision, limit, previous, target.version)
        self.by_group[group] = rollout
        log.info(
            "rollout started group=%s model=%s revision=%s version=%d max_unavailable=%s",
            group, state.model.describe(), revision, target.version, limit,
        )  # fmt: skip
        self.tick()
        return rollout

    def forget(self, group: str) -> None:
        rollout = self.by_group.pop(group, None)
        if rollout is None:
            return
        for agent in self.pool.in_group(group):
            if agent.draining:
                agent.draining = False
                self.pool.refresh(agent)

    def state_for_new_agent(self, group: str, stored: GroupState) -> GroupState:
        """A failed rollout leaves the group on its old state: newcomers get that one."""
        rollout = self.by_group.get(group)
        if rollout is not None and rollout.phase == RolloutPhase.FAILED and rollout.previous is not None:
            return rollout.previous
        return stored

    def send_state(self, agent: AgentController, state: BalancerDesiredState, version: int) -> None:
        revision = state_revision(state)
        agent.state_revision = revision
        message = SetDesiredStateMessage(state=state, revision=revision, version=version)
        agent.send(message.model_dump(mode="json"))

    def tick(self) -> None:
        """Advance every active rollout; re-entrant calls (from our own changes) are no-ops."""
        if self._ticking:
            return
        self._ticking = True
        try:
            changed = False
            for rollout in list(self.by_group.values()):
                if rollout.active:
                    changed |= self._advance(rollout)
            if changed:
                self.pool.changed()
        finally:
            self._ticking = False

    def _plan(self, rollout: Rollout, agents: list[AgentController]) -> RolloutPlan:
        views = [RolloutAgent.of(a) for a in agents]
        sending = rollout.phase == RolloutPhase.PROGRESSING
        return plan_rollout(rollout.revision, rollout.version, views, rollout.max_unavailable, sending=sending)

    def _advance(self, rollout: Rollout) -> bool:
        agents = self.pool.in_group(rollout.group)
        plan = self._plan(rollout, agents)
        done = plan.count(Position.DONE)
        rollout.applied, rollout.total = done, len(agents)
        changed = False
        failed = [a for a in agents if plan.positions[a.id] is Position.FAILED]
        if failed and rollout.phase == RolloutPhase.PROGRESSING:
            rollout.phase = RolloutPhase.FAILED
            rollout.message = _failure_message(rollout, failed, done, len(agents))
            log.warning("rollout failed group=%s %s", rollout.group, rollout.message)
            plan = self._plan(rollout, agents)
            changed = True
        changed |= self._apply(rollout, agents, plan)
        if rollout.phase != RolloutPhase.PROGRESSING:
            return changed
        settled = done + plan.count(Position.AHEAD)
        if not plan.send and settled == len(agents):
            rollout.phase = RolloutPhase.COMPLETE
            rollout.message = f"{done}/{len(agents)} agents serve {rollout.state.model.describe()}"
            log.info("rollout complete group=%s %s", rollout.group, rollout.message)
            changed = True
        else:
            rollout.message = f"{done}/{len(agents)} agents switched to {rollout.state.model.describe()}"
        return changed

    def _apply(self, rollout: Rollout, agents: list[AgentController], plan: RolloutPlan) -> bool:
        """Drain what the plan drains, undrain the rest, send the state to whom it says."""
        changed = False
        for agent in agents:
            drain = agent.id in plan.drain
            if agent.draining != drain:
                agent.draining = drain
                self.pool.refresh(agent)
                changed = True
        rollout.unavailable = set(plan.drain)
        by_id = {a.id: a for a in agents}
        for agent_id in plan.stamp:
            self.send_state(by_id[agent_id], rollout.state, rollout.version)
        for agent_id in plan.send:
            agent = by_id[agent_id]
            self.send_state(agent, rollout.state, rollout.version)
            changed = True
            log.info(
                "rollout switches agent group=%s agent=%s draining=%s in_flight=%d",
                rollout.group, agent.name or agent.id, agent.draining, agent.in_flight,
            )  # fmt: skip
        return changed
