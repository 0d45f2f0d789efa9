"""The balancer's management API agents JSON, as one model (no I/O).

``GET /api/v1/agents`` (and every event of ``/api/v1/agents/stream``) is
``{"agents": [...]}``, one entry per connected agent: Paddler's AgentControllerSnapshot
(``id``, ``name`` and the agent's status fields, :class:`~paddler_core.protocol.AgentStatus`
less ``version`` and ``prefix_hashes``) plus the balancer's ``model_group``,
``slots_in_flight`` (its own requests on the agent), ``unresponsive`` and ``draining``.

The balancer writes it with :class:`AgentsSnapshot`; the operator and ``paddler dashboard``
read it with the same model and derive their own views. Reading is tolerant: unknown
fields are ignored, a missing or null field takes its default, and an issue in a shape
other than :class:`~paddler_core.protocol.AgentIssue`'s (``"Variant"`` or
``{"Variant": {params}}``) is kept as a variant named by its JSON text. The values of
known fields are validated as :class:`~paddler_core.protocol.AgentStatus` validates an
agent's report, except ``state_application_status``: one this version does not know (a
newer balancer's) reads as ``Fresh`` (not applied), so an operator or dashboard older than
the balancer still reads the pool.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from paddler_core.protocol import AgentIssue, AgentStatus, StateApplicationStatus

HIDDEN_STATUS_FIELDS = frozenset({"version", "prefix_hashes"})
"""Status fields the balancer keeps to itself: not in the agents JSON."""


def read_issue(raw: Any) -> AgentIssue:
    """One issue of the JSON: ``"Variant"`` or ``{"Variant": {params}}`` as the balancer writes
    it; anything else becomes a variant named by its JSON text (shown, never lost)."""
    if isinstance(raw, str):
        return AgentIssue(variant=raw)
    if isinstance(raw, Mapping) and len(raw) == 1:
        ((variant, params),) = raw.items()
        if isinstance(params, Mapping):
            return AgentIssue(variant=str(variant), params=dict(params))
    return AgentIssue(variant=json.dumps(raw, sort_keys=True))


class AgentSnapshot(BaseModel):
    """One entry of the agents JSON: the balancer's fields, then the agent's status, flat."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = ""
    name: str | None = None
    model_group: str = "default"
    slots_in_flight: int = 0
    """This balancer replica's own requests in flight on the agent."""
    unresponsive: bool = False
    draining: bool = False
    status: AgentStatus = Field(default_factory=AgentStatus)
    """The agent's last status report (flat in the JSON)."""

    @model_validator(mode="before")
    @classmethod
    def _from_wire(cls, data: Any) -> Any:
        """Flat JSON -> the balancer's fields and ``status``. Built in Python (``status=`` given:
        the JSON has no such key), it is taken as is."""
        if not isinstance(data, Mapping) or "status" in data:
            return data
        present = {key: value for key, value in data.items() if value is not None}
        status = {key: present[key] for key in AgentStatus.model_fields if key in present}
        if status.get("state_application_status") not in set(StateApplicationStatus):
            status.pop("state_application_status", None)
        if isinstance(status.get("issues"), list):
            status["issues"] = [read_issue(issue) for issue in status["issues"]]
        own = {key: present[key] for key in cls.model_fields if key in present and key != "status"}
        return {**own, "status": status}

    @model_serializer(mode="wrap")
    def _to_wire(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields: dict[str, Any] = handler(self)
        status: dict[str, Any] = fields.pop("status")
        return {**fields, **{key: value for key, value in status.items() if key not in HIDDEN_STATUS_FIELDS}}


class AgentsSnapshot(BaseModel):
    """``GET /api/v1/agents``: every connected agent, in registration order."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    agents: list[AgentSnapshot] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _null_is_none(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, Mapping) and data.get("agents") is None:
            return {key: value for key, value in data.items() if key != "agents"}
        return data
