"""The balancer <-> agent protocol: JSON frames over one WebSocket the agent dials.

The agent connects to ``/api/v1/agent_socket/{agent_id}`` on the balancer's
management address. A frame is one message object or a JSON array of them (the
agent batches the tokens of one decode step into one frame).

Handshake: the agent's first message is ``register`` with its
``protocol_version``; the balancer answers ``registered`` or ``rejected`` and
closes. After that:

agent -> balancer
    ``status``    full status snapshot, on every change and at least every second;
                  ``version`` grows monotonically so a stale snapshot is dropped.
    ``response``  one client-facing response payload for ``request_id``;
                  ``final`` marks the last one of that request.
    ``reply``     answer to a ``query``.

balancer -> agent
    ``set_desired_state``  the model group's desired state.
    ``generate``           a generation request (Paddler request variant + overrides).
    ``embed``              an embedding batch.
    ``stop``               stop responding to ``request_id`` (cancel; frees the slot).
    ``query``              ``model_metadata`` or ``chat_template_override``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from paddler_core.desired_state import BalancerDesiredState, SamplingOverrides

PROTOCOL_VERSION = 1
AGENT_SOCKET_PATH = "/api/v1/agent_socket/{agent_id}"
STATUS_INTERVAL_S = 1.0
"""The agent pushes a snapshot at least this often (seconds)."""


class StateApplicationStatus(StrEnum):
    APPLIED = "Applied"
    ATTEMPTED_AND_NOT_APPLIABLE = "AttemptedAndNotAppliable"
    ATTEMPTED_AND_RETRYING = "AttemptedAndRetrying"
    FRESH = "Fresh"
    STUCK = "Stuck"


class AgentIssue(BaseModel):
    """A problem the agent reports, in serde shape ``{"Variant": {params}}``.

    ``params["message"]`` is a plain-language explanation for people.
    """

    model_config = ConfigDict(frozen=True)

    variant: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_serde(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"variant": data}
        if isinstance(data, dict) and "variant" not in data and len(data) == 1:
            ((variant, params),) = data.items()
            return {"variant": variant, "params": params if isinstance(params, dict) else {"value": params}}
        return data

    @model_serializer
    def _to_serde(self) -> str | dict[str, Any]:
        return {self.variant: self.params} if self.params else self.variant

    @property
    def message(self) -> str:
        return str(self.params.get("message", self.variant))


class AgentStatus(BaseModel):
    """An agent's status snapshot. Field names are Paddler's."""

    model_config = ConfigDict(extra="ignore")

    version: int = 0
    slots_total: Annotated[int, Field(ge=0)] = 0
    slots_processing: Annotated[int, Field(ge=0)] = 0
    desired_slots_total: Annotated[int, Field(ge=0)] = 0
    model_path: str | None = None
    download_current: int = 0
    download_total: int = 0
    download_filename: str | None = None
    download_indeterminate: bool = False
    issues: list[AgentIssue] = Field(default_factory=list)
    state_application_status: StateApplicationStatus = StateApplicationStatus.FRESH
    uses_chat_template_override: bool = False
    prefix_hashes: list[str] = Field(default_factory=list)
    """Hashes of token-prefix blocks held in the agent's slots (prefix-affinity routing)."""


# ---- agent -> balancer ----------------------------------------------------------------------


class RegisterMessage(BaseModel):
    type: Literal["register"] = "register"
    protocol_version: int
    name: str | None = None
    model_group: str
    status: AgentStatus


class StatusMessage(BaseModel):
    type: Literal["status"] = "status"
    status: AgentStatus


class ReplyMessage(BaseModel):
    type: Literal["reply"] = "reply"
    request_id: str
    body: Any = None


def response_message(request_id: str, payload: Any, final: bool) -> dict[str, Any]:
    """Hot path: a streamed response, built as a plain dict."""
    return {"type": "response", "request_id": request_id, "response": payload, "final": final}


# ---- balancer -> agent ----------------------------------------------------------------------


class RegisteredMessage(BaseModel):
    type: Literal["registered"] = "registered"
    agent_id: str
    protocol_version: int = PROTOCOL_VERSION


class RejectedMessage(BaseModel):
    type: Literal["rejected"] = "rejected"
    reason: str


class SetDesiredStateMessage(BaseModel):
    type: Literal["set_desired_state"] = "set_desired_state"
    state: BalancerDesiredState


class GenerateMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["generate"] = "generate"
    request_id: str
    variant: Literal["ContinueFromRawPrompt", "ContinueFromConversationHistory"]
    params: dict[str, Any]
    """The validated client params, as JSON (see ``paddler_core.inference``)."""
    overrides: SamplingOverrides | None = None


class EmbedMessage(BaseModel):
    type: Literal["embed"] = "embed"
    request_id: str
    params: dict[str, Any]


class StopMessage(BaseModel):
    type: Literal["stop"] = "stop"
    request_id: str


class QueryMessage(BaseModel):
    type: Literal["query"] = "query"
    request_id: str
    what: Literal["model_metadata", "chat_template_override"]


BalancerToAgent = Annotated[
    RegisteredMessage
    | RejectedMessage
    | SetDesiredStateMessage
    | GenerateMessage
    | EmbedMessage
    | StopMessage
    | QueryMessage,
    Field(discriminator="type"),
]
