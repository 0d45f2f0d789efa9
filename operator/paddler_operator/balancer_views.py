"""What a pool balancer's management API shows, as the operator reads it.

Pure values: :mod:`paddler_operator.balancer_client` builds them from the balancer's
JSON, :mod:`paddler_operator.plan` turns them into status and scaling decisions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
    def from_json(cls, data: Mapping[str, Any]) -> AgentView:
        issues = []
        for issue in data.get("issues") or []:
            issues.append(json.dumps(issue, sort_keys=True) if not isinstance(issue, str) else issue)
        return cls(
            id=str(data.get("id", "")),
            name=data.get("name"),
            model_group=str(data.get("model_group", "default")),
            slots_total=int(data.get("slots_total") or 0),
            slots_in_flight=int(data.get("slots_in_flight") or 0),
            state=str(data.get("state_application_status", "Fresh")),
            issues=tuple(issues),
            model_path=data.get("model_path"),
        )

    @property
    def ready(self) -> bool:
        return self.state == "Applied" and self.slots_total > 0


@dataclass(frozen=True)
class BalancerSnapshot:
    """What the operator read from a pool's balancer in one pass."""

    agents: tuple[AgentView, ...] = ()
    buffered_total: int = 0
    buffered_by_group: Mapping[str, int] = field(default_factory=dict)
    """Buffered requests of the model groups asked for (the balancer's JSON count per group)."""
    group_states: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Model group -> desired state JSON the balancer holds."""
    group_rollouts: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """Model group -> the balancer's rollout of its last desired state change
    (``revision``, ``phase``: Progressing/Complete/Failed, ``applied``, ``total``, ``message``)."""

    group_owners: Mapping[str, str | None] = field(default_factory=dict)
    """Model group -> who set its desired state (the ``X-Paddler-Owner`` header), None if nobody said."""

    def in_group(self, group: str) -> list[AgentView]:
        return [a for a in self.agents if a.model_group == group]
