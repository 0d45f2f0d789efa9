"""Rolling desired-state changes: a model group's agents switch a few at a time.

A new desired state for a group starts a :class:`Rollout`. Agents that serve
nothing (no model yet, just registered) get the state at once: switching them
costs no capacity. The others switch at most ``max_unavailable`` at a time: the
balancer stops routing to the agent (``draining``) and sends it the state; the
agent finishes its in-flight requests, loads, and reports the state's revision
as applied; then it takes requests again and the next agent switches. The rest of
the group serves the old model meanwhile, so a load slower than the buffer
timeout fails no request as long as one agent still serves.

An agent that reports the revision as not appliable (the model cannot be
downloaded or loaded) stops the rollout: ``Failed`` with the agent's issue as
the message. Agents not yet switched keep the old state, and agents that join
the group later get the old state too, so they can serve.

The rollout advances on every change of the agent pool (status pushes, agents
joining or leaving): :meth:`Rollouts.tick` is an :class:`AgentPool` listener.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paddler_balancer.agents import AgentController, AgentPool
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, state_revision
from paddler_core.protocol import SetDesiredStateMessage, StateApplicationStatus

log = logging.getLogger(__name__)

FAILED_STATES = frozenset({StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE, StateApplicationStatus.STUCK})


class RolloutPhase(StrEnum):
    PROGRESSING = "Progressing"
    COMPLETE = "Complete"
    FAILED = "Failed"


@dataclass(eq=False)
class Rollout:
    group: str
    state: BalancerDesiredState
    revision: str
    max_unavailable: MaxUnavailable
    previous: BalancerDesiredState | None
    """The last state the group completed: what agents not yet switched serve."""
    phase: RolloutPhase = RolloutPhase.PROGRESSING
    message: str = ""
    applied: int = 0
    """Agents of the group that serve this state."""
    total: int = 0
    """Agents in the group."""
    unavailable: set[str] = field(default_factory=set)
    """Ids of agents that stopped serving to switch (at most ``max_unavailable``)."""

    @property
    def active(self) -> bool:
        return self.phase == RolloutPhase.PROGRESSING or bool(self.unavailable)

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "phase": self.phase.value,
            "applied": self.applied,
            "total": self.total,
            "max_unavailable": str(self.max_unavailable),
            "message": self.message,
        }


def _applied(agent: AgentController, revision: str) -> bool:
    status = agent.status
    applied = status.state_application_status == StateApplicationStatus.APPLIED
    return status.applied_state_revision == revision and applied


def _failed(agent: AgentController, revision: str) -> bool:
    status = agent.status
    return status.applied_state_revision == revision and status.state_application_status in FAILED_STATES


def _serving(agent: AgentController) -> bool:
    return agent.connected and not agent.draining and not agent.unresponsive and agent.status.slots_total > 0


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
        state: BalancerDesiredState,
        before: BalancerDesiredState | None,
        max_unavailable: MaxUnavailable | None = None,
    ) -> Rollout:
        """Roll ``state`` over the group's agents. ``before`` is the group's state until now.
        The same state again only updates ``max_unavailable`` (a PUT is idempotent)."""
        revision = state_revision(state)
        limit = max_unavailable or self.default_max_unavailable
        current = self.by_group.get(group)
        if current is not None and current.revision == revision:
            current.max_unavailable = limit
            self.tick()
            return current
        previous = before
        if current is not None:
            previous = current.state if current.phase == RolloutPhase.COMPLETE else current.previous
        rollout = Rollout(group, state, revision, limit, previous)
        if current is not None:
            rollout.unavailable = set(current.unavailable)  # still draining: they switch first, at no extra cost
        self.by_group[group] = rollout
        log.info(
            "rollout started group=%s model=%s revision=%s max_unavailable=%s",
            group, state.model.describe(), revision, limit,
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

    def state_for_new_agent(self, group: str, stored: BalancerDesiredState) -> BalancerDesiredState:
        """A failed rollout leaves the group on its old state: newcomers get that one."""
        rollout = self.by_group.get(group)
        if rollout is not None and rollout.phase == RolloutPhase.FAILED and rollout.previous is not None:
            return rollout.previous
        return stored

    def send_state(self, agent: AgentController, state: BalancerDesiredState) -> None:
        revision = state_revision(state)
        agent.state_revision = revision
        agent.send(SetDesiredStateMessage(state=state, revision=revision).model_dump(mode="json"))

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

    def _advance(self, rollout: Rollout) -> bool:
        revision = rollout.revision
        agents = self.pool.in_group(rollout.group)
        present = {a.id for a in agents}
        rollout.unavailable &= present
        done: list[AgentController] = []
        failed: list[AgentController] = []
        switching = 0
        pending: list[AgentController] = []
        for agent in agents:
            if agent.state_revision != revision:
                pending.append(agent)
            elif _applied(agent, revision):
                done.append(agent)
            elif _failed(agent, revision):
                failed.append(agent)
            else:
                switching += 1
        changed = False
        for agent in (*done, *failed):
            rollout.unavailable.discard(agent.id)
            if agent.draining:
                agent.draining = False
                self.pool.refresh(agent)
                changed = True
        rollout.applied, rollout.total = len(done), len(agents)
        if failed and rollout.phase == RolloutPhase.PROGRESSING:
            rollout.phase = RolloutPhase.FAILED
            reasons = []
            for agent in failed:
                status = agent.status
                issues = "; ".join(issue.message for issue in status.issues) or status.state_application_status
                reasons.append(f"{agent.name or agent.id}: {issues}")
            rollout.message = (
                f"{rollout.state.model.describe()} could not be applied, rollout stopped at "
                f"{len(done)}/{len(agents)} agents: " + "; ".join(reasons)
            )[:1000]
            log.warning("rollout failed group=%s %s", rollout.group, rollout.message)
            changed = True
        if rollout.phase != RolloutPhase.PROGRESSING:
            return changed
        budget = rollout.max_unavailable.count(len(agents)) - len(rollout.unavailable)
        pending.sort(key=lambda a: (not a.draining, a.order))  # carried over from a superseded rollout first
        for agent in pending:
            if agent.id in rollout.unavailable:
                pass  # already counted
            elif _serving(agent) or agent.in_flight > 0:
                if budget <= 0:
                    continue
                budget -= 1
                rollout.unavailable.add(agent.id)
                agent.draining = True
                self.pool.refresh(agent)
            self.send_state(agent, rollout.state)
            switching += 1
            changed = True
            log.info(
                "rollout switches agent group=%s agent=%s draining=%s in_flight=%d",
                rollout.group, agent.name or agent.id, agent.draining, agent.in_flight,
            )  # fmt: skip
        if switching == 0 and not failed and len(done) == len(agents):
            rollout.phase = RolloutPhase.COMPLETE
            rollout.message = f"{len(done)}/{len(agents)} agents serve {rollout.state.model.describe()}"
            log.info("rollout complete group=%s %s", rollout.group, rollout.message)
            changed = True
        else:
            rollout.message = f"{len(done)}/{len(agents)} agents switched to {rollout.state.model.describe()}"
        return changed
