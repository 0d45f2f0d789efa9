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
                  ``final`` marks the last one of that request; ``error_kind``
                  (balancer only, not forwarded) what a terminal error means.
    ``reply``     answer to a ``query``.
    ``refused``   a ``generate``/``embed`` the agent will not run (no free slot: another
                  balancer replica took it first; or stopping). Sent at once, before any
                  ``response``; the balancer routes the request elsewhere or buffers it.
                  The client never sees it.

balancer -> agent
    ``set_desired_state``  the model group's desired state, its ``revision`` (content
                           hash) and ``version`` (only grows; the agent applies only a
                           newer one: :func:`~paddler_core.desired_state.judge_state_offer`).
    ``generate``           a generation request (Paddler request variant + overrides).
    ``embed``              an embedding batch.
    ``stop``               stop responding to ``request_id`` (cancel; frees the slot).
    ``query``              ``model_metadata``, ``chat_template_override`` or
                           ``desired_state`` (``{"state": ..., "version": ...}``).

An agent may be connected to several balancer replicas at once (one socket each). It
pushes its status to every replica; each request is answered on the socket it came in
on; and the agent is the arbiter of its slots: whatever the replicas believe, it never
runs more requests than it has slots, and refuses the rest (``refused``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, model_serializer, model_validator

from paddler_core.desired_state import BalancerDesiredState, SamplingOverrides
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    ErrorKind,
    GenerateEmbeddingBatchParams,
    ResponsePayload,
)
from paddler_core.prefix import request_prefix_keys
from paddler_core.untrusted_json import surrogate_position

PROTOCOL_VERSION = 1
AGENT_SOCKET_PATH = "/api/v1/agent_socket/{agent_id}"
STATUS_INTERVAL_S = 1.0
"""The agent pushes a snapshot at least this often (seconds)."""
MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Largest WebSocket frame either side accepts. A larger one closes the socket, so
the balancer refuses (413) a request whose message would not fit."""
MAX_MESSAGE_BYTES = 48 * 1024 * 1024
"""Largest single message the balancer forwards to an agent (leaves room under
MAX_FRAME_BYTES)."""
BATCH_FRAME_CHARS = 1024 * 1024
"""Messages are batched into one frame up to this many characters (at most 4 MiB of
UTF-8); a larger message travels alone."""
MAX_AGENT_SLOTS = 1024
"""Most slots an agent may claim; a registration beyond it is rejected."""


def encode_message(message: Mapping[str, Any]) -> str:
    """One message as JSON text for a frame: UTF-8 kept as is (``ensure_ascii`` would
    triple the size of non-ASCII prompts), but escaped where a string holds a lone
    surrogate, which UTF-8 cannot carry."""
    text = json.dumps(message, ensure_ascii=False)
    if not text.isascii() and surrogate_position(text) is not None:
        return json.dumps(message)
    return text


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (``encode_message`` output only: no surrogates)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def batch_frames(messages: list[str]) -> list[str]:
    """Encoded messages joined into frames (JSON arrays) of at most BATCH_FRAME_CHARS
    characters each; one message alone is sent as itself."""
    frames: list[str] = []
    group: list[str] = []
    size = 0
    for text in messages:
        if group and size + len(text) > BATCH_FRAME_CHARS:
            frames.append(group[0] if len(group) == 1 else "[" + ",".join(group) + "]")
            group, size = [], 0
        group.append(text)
        size += len(text) + 1
    if group:
        frames.append(group[0] if len(group) == 1 else "[" + ",".join(group) + "]")
    return frames


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
    slots_total: Annotated[int, Field(ge=0, le=MAX_AGENT_SLOTS)] = 0
    slots_processing: Annotated[int, Field(ge=0, le=MAX_AGENT_SLOTS)] = 0
    desired_slots_total: Annotated[int, Field(ge=0, le=MAX_AGENT_SLOTS)] = 0
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
    applied_state_revision: str | None = None
    """``revision`` of the last ``set_desired_state`` whose application finished; then
    ``state_application_status`` tells how it went (Applied, AttemptedAndNotAppliable)."""
    kv_cache_tokens_total: Annotated[int, Field(ge=0)] = 0
    """Cells of the agent's KV cache (``context_size``, shared by its slots); 0 when no
    model is loaded or the engine has none (simulated)."""
    kv_cache_tokens_used: Annotated[int, Field(ge=0)] = 0
    """Cells in use: running requests plus cached prefixes of idle slots (evicted on
    demand). Refreshed with the periodic status."""
    desired_state_revision: str | None = None
    """``revision`` of the desired state the agent holds (applying it or applied); the
    same on every replica it reports to, so each can tell who is switching."""
    desired_state_version: int | None = None
    """``version`` of that state (None: none held, or sent without a version)."""
    prompt_tokens_reused: Annotated[int, Field(ge=0)] = 0
    """Prompt tokens of started requests found in the KV cache (not evaluated), since the
    agent started (0 for engines that do not count them)."""
    prompt_tokens_evaluated: Annotated[int, Field(ge=0)] = 0
    """Prompt tokens of started requests the agent evaluated, since the agent started."""


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


class RefusalReason(StrEnum):
    NO_FREE_SLOT = "NoFreeSlot"
    """Every slot is busy (another replica claimed the last one first) or none serves
    right now (loading, swapping)."""
    STOPPING = "Stopping"
    """The agent is draining before it exits."""


class RefusedMessage(BaseModel):
    """``refused``: the agent will not run ``request_id``; nothing else is sent for it."""

    type: Literal["refused"] = "refused"
    request_id: str
    reason: RefusalReason


class ReplyMessage(BaseModel):
    type: Literal["reply"] = "reply"
    request_id: str
    body: Any = None


class ResponseMessage(TypedDict):
    """``response``: one client-facing payload of ``request_id`` (Paddler's shape, forwarded
    as is); ``final`` marks the last one. ``error_kind`` tells the balancer what a terminal
    error means (:class:`~paddler_core.inference.ErrorKind`); the balancer reads it and does
    not forward it."""

    type: Literal["response"]
    request_id: str
    response: ResponsePayload
    final: bool
    error_kind: NotRequired[ErrorKind]


class KindedErrorPayload(dict[str, Any]):
    """A terminal error payload as the balancer received it, carrying the ``error_kind``
    its agent sent beside it. The dict is the client's payload, forwarded as is (JSON
    encoders see a plain dict); the kind stays on the balancer's side."""

    __slots__ = ("error_kind",)

    def __init__(self, payload: dict[str, Any], error_kind: ErrorKind) -> None:
        super().__init__(payload)
        self.error_kind = error_kind


def received_payload(message: dict[str, Any]) -> Any:
    """The payload of an agent's ``response`` message, with its ``error_kind`` attached
    when the agent sent a known one (an unknown kind is ignored: the payload still stands)."""
    payload = message.get("response")
    kind = message.get("error_kind")
    if kind is None or not isinstance(payload, dict):
        return payload
    try:
        return KindedErrorPayload(payload, ErrorKind(kind))
    except ValueError:
        return payload


def error_kind_of(payload: Any) -> ErrorKind | None:
    """The agent's ``error_kind`` of a received payload, if it sent one."""
    return payload.error_kind if isinstance(payload, KindedErrorPayload) else None


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
    revision: str | None = None
    """The state's :func:`~paddler_core.desired_state.state_revision`; the agent echoes it
    in ``applied_state_revision`` (a rolling swap waits for it)."""
    version: int | None = None
    """Only grows (:func:`~paddler_core.desired_state.next_state_version`): the agent
    applies a state only when it is newer than the one it holds, so a replica restarted
    with no state or an older one cannot make agents unload or swap back. None: a
    balancer that stamps no versions (content decides)."""


class _Generate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["generate"] = "generate"
    request_id: str
    overrides: SamplingOverrides | None = None
    _prefix_keys: tuple[str, ...] = PrivateAttr(default=())

    @property
    def prefix_keys(self) -> tuple[str, ...]:
        """The request's prefix keys (:func:`~paddler_core.prefix.request_prefix_keys`),
        computed from the JSON params as they arrived: the same keys the balancer routed by."""
        return self._prefix_keys


class GenerateRawPrompt(_Generate):
    variant: Literal["ContinueFromRawPrompt"] = "ContinueFromRawPrompt"
    params: ContinueFromRawPromptParams


class GenerateConversation(_Generate):
    variant: Literal["ContinueFromConversationHistory"] = "ContinueFromConversationHistory"
    params: ContinueFromConversationHistoryParams


GenerateMessage = Annotated[GenerateRawPrompt | GenerateConversation, Field(discriminator="variant")]
"""A generation request: Paddler's request variant and its params (one of the param
models of :mod:`paddler_core.inference`, chosen by ``variant``) plus the OpenAI sampling
overrides."""


class EmbedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["embed"] = "embed"
    request_id: str
    params: GenerateEmbeddingBatchParams


_GENERATE_MESSAGE: TypeAdapter[GenerateRawPrompt | GenerateConversation] = TypeAdapter(GenerateMessage)


def parse_generate_message(message: Any) -> GenerateRawPrompt | GenerateConversation:
    """Validate a ``generate`` message (a dict from the wire); raises ValidationError.
    The agent does this where a message enters it; its engines get the models (the
    chat-template renderer's child process validates a conversation's messages and tools
    again, from the JSON it is piped)."""
    parsed = _GENERATE_MESSAGE.validate_python(message)
    parsed._prefix_keys = request_prefix_keys(parsed.variant, message["params"])
    return parsed


def generate_message(
    request_id: str, variant: str, params: dict[str, Any], overrides: SamplingOverrides | None = None
) -> dict[str, Any]:
    """A ``generate`` message as the balancer sends it: plain JSON built without a second
    validation pass (the agent validates it where it arrives)."""
    message: dict[str, Any] = {"type": "generate", "request_id": request_id, "variant": variant, "params": params}
    if overrides is not None:
        message["overrides"] = overrides.model_dump(mode="json", exclude_none=True)
    return message


def embed_message(request_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """An ``embed`` message as the balancer sends it (validated where it arrives)."""
    return {"type": "embed", "request_id": request_id, "params": params}


class StopMessage(BaseModel):
    type: Literal["stop"] = "stop"
    request_id: str


class QueryMessage(BaseModel):
    type: Literal["query"] = "query"
    request_id: str
    what: Literal["model_metadata", "chat_template_override", "desired_state"]
