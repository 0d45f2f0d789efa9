"""What a pool's balancers' management APIs show, as the operator reads them.

Pure values: :mod:`paddler_operator.balancer_client` builds them from each balancer
replica's JSON, :func:`combine_snapshots` makes one pool-wide view of the replicas, and
:mod:`paddler_operator.plan` turns it into status and scaling decisions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from paddler_core.management_wire import AgentSnapshot, AgentsSnapshot
from paddler_core.protocol import AgentIssue


def issue_text(issue: AgentIssue) -> str:
    """An agent issue as the conditions show it: ``Variant``, or its JSON (keys sorted)."""
    return json.dumps(issue.model_dump(), sort_keys=True) if issue.params else issue.variant


@dataclass(frozen=True)
class AgentView:
    """One agent as the balancer's ``GET /api/v1/agents`` shows it."""

    id: str
    name: str | None
    model_group: str
    slots_total: int
    slots_in_flight: int
    state: str
    issues: tuple[str, ...] = ()
    model_path: str | None = None

    @classmethod
    def of(cls, agent: AgentSnapshot) -> AgentView:
        status = agent.status
        return cls(
            id=agent.id,
            name=agent.name,
            model_group=agent.model_group,
            slots_total=status.slots_total,
            slots_in_flight=agent.slots_in_flight,
            state=status.state_application_status.value,
            issues=tuple(issue_text(i) for i in status.issues),
            model_path=status.model_path,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentView:
        """One entry of the agents JSON (:class:`~paddler_core.management_wire.AgentSnapshot`)."""
        return cls.of(AgentSnapshot.model_validate(data))

    @classmethod
    def all_of(cls, body: Any) -> tuple[AgentView, ...]:
        """Every agent of a ``GET /api/v1/agents`` body (None: no agents)."""
        return tuple(cls.of(a) for a in AgentsSnapshot.model_validate(body).agents)

    @property
    def ready(self) -> bool:
        return self.state == "Applied" and self.slots_total > 0


class RolloutView(BaseModel):
    """A balancer's rollout of a model group's last desired state change
    (``GET /api/v1/model_groups/{group}/rollout``, and in ``/api/v1/model_groups``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    phase: str = "Complete"
    """Progressing, Complete or Failed."""
    applied: int = 0
    """Agents switched to the new state."""
    total: int = 0
    max_unavailable: str | None = None
    """At most this many agents (or percent) switch at a time, as the balancer was asked."""
    message: str | None = None
    """Why a Failed rollout stopped (the agents' issues)."""
    revision: str | None = None
    """:func:`paddler_core.desired_state.state_revision` of the state rolled out."""

    @property
    def progressing(self) -> bool:
        return self.phase == "Progressing"

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    @classmethod
    def parse(cls, body: Any) -> RolloutView | None:
        """The rollout in a balancer's JSON; None for none, or for one this operator cannot read."""
        if not isinstance(body, Mapping):
            return None
        try:
            return cls.model_validate(body)
        except ValidationError:
            return None


@dataclass(frozen=True)
class BalancerSnapshot:
    """What the operator read from a pool's balancer in one pass."""

    agents: tuple[AgentView, ...] = ()
    buffered_total: int = 0
    buffered_by_group: Mapping[str, int] = field(default_factory=dict)
    """Buffered requests of the model groups asked for (the balancer's JSON count per group)."""
    group_states: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Model group -> desired state JSON the balancer holds."""
    group_rollouts: Mapping[str, RolloutView] = field(default_factory=dict)
    """Model group -> the balancer's rollout of its last desired state change."""

    group_owners: Mapping[str, str | None] = field(default_factory=dict)
    """Model group -> who set its desired state (the ``X-Paddler-Owner`` header), None if nobody said."""
    replicas: tuple[str, ...] = ()
    """Management URLs of the balancer replicas that answered (empty: a single balancer read directly)."""
    unreachable: Mapping[str, str] = field(default_factory=dict)
    """Replica URL -> why it could not be read: the view is partial while this is not empty."""

    def in_group(self, group: str) -> list[AgentView]:
        return [a for a in self.agents if a.model_group == group]

    @property
    def partial(self) -> str | None:
        """What was missed ("1 of 2 balancer replicas unreachable: URL: error"), None when every replica answered."""
        if not self.unreachable:
            return None
        total = len(self.replicas) + len(self.unreachable)
        missed = "; ".join(f"{url}: {err}" for url, err in sorted(self.unreachable.items()))
        return f"{len(self.unreachable)} of {total} balancer replicas unreachable: {missed}"


@dataclass(frozen=True)
class ReplicaRead:
    """One balancer replica's answer in a pass: its snapshot, or why there is none."""

    url: str
    snapshot: BalancerSnapshot | None
    error: str | None = None


_PHASE_RANK = {"Failed": 2, "Progressing": 1}
"""A pool's rollout is as far as its least advanced replica: Failed over Progressing over Complete."""


def combine_rollouts(rollouts: Sequence[RolloutView]) -> RolloutView | None:
    """One model group's rollout over the replicas that report one: the worst phase, and among
    equals the one with the fewest agents switched. None when no replica reports one."""
    if not rollouts:
        return None
    return max(rollouts, key=lambda r: (_PHASE_RANK.get(r.phase, 0), -r.applied))


def _merge_agents(snapshots: Sequence[BalancerSnapshot]) -> tuple[AgentView, ...]:
    """Every agent connects to every replica: one view per agent id (the first replica's, by URL), whose
    ``slots_in_flight`` is the sum of each replica's own in-flight requests on it."""
    merged: dict[str, AgentView] = {}
    for snap in snapshots:
        for agent in snap.agents:
            seen = merged.get(agent.id)
            if seen is None:
                merged[agent.id] = agent
            else:
                merged[agent.id] = dataclasses.replace(
                    seen, slots_in_flight=seen.slots_in_flight + agent.slots_in_flight
                )
    return tuple(merged.values())


def _same_state_everywhere(snapshots: Sequence[BalancerSnapshot]) -> dict[str, dict[str, Any]]:
    """Groups whose desired state every replica holds, identical: any other group is pushed again."""
    groups: dict[str, dict[str, Any]] = {}
    for group, state in snapshots[0].group_states.items():
        text = json.dumps(state, sort_keys=True)
        if all(json.dumps(s.group_states.get(group), sort_keys=True) == text for s in snapshots[1:]):
            groups[group] = state
    return groups


def combine_snapshots(reads: Sequence[ReplicaRead]) -> BalancerSnapshot | None:
    """The pool as one balancer would show it, from each replica's snapshot: buffered requests
    summed (each replica buffers its own), agents united by id (in-flight requests summed), a
    group's desired state kept only where every replica holds the same one, owners and rollouts
    of every group any replica knows. None when no replica answered."""
    ordered = sorted(reads, key=lambda r: r.url)
    snaps = [r.snapshot for r in ordered if r.snapshot is not None]
    if not snaps:
        return None
    by_group: dict[str, int] = {}
    owners: dict[str, str | None] = {}
    rollouts: dict[str, list[RolloutView]] = {}
    for snap in snaps:
        for group, count in snap.buffered_by_group.items():
            by_group[group] = by_group.get(group, 0) + count
        for group, owner in snap.group_owners.items():
            if owners.get(group) is None:
                owners[group] = owner
        for group, rollout in snap.group_rollouts.items():
            rollouts.setdefault(group, []).append(rollout)
    combined_rollouts = {g: r for g, rs in rollouts.items() if (r := combine_rollouts(rs)) is not None}
    return BalancerSnapshot(
        agents=_merge_agents(snaps),
        buffered_total=sum(s.buffered_total for s in snaps),
        buffered_by_group=by_group,
        group_states=_same_state_everywhere(snaps),
        group_rollouts=combined_rollouts,
        group_owners=owners,
        replicas=tuple(r.url for r in ordered if r.snapshot is not None),
        unreachable={r.url: r.error or "no answer" for r in ordered if r.snapshot is None},
    )
