"""What the decode thread works on: settings, jobs, running sequences, slots, and what it
hands back to the event loop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.multimodal import (
    MediaPrompt,
)
from paddler_agent.llama.native import NativeModel
from paddler_agent.llama.sampling import FastSampler, Sampler
from paddler_agent.llama.text_stream import TextStream
from paddler_agent.llama.token_step import TokenTally
from paddler_agent.tool_calls import OutputClassifier
from paddler_core.desired_state import (
    EmbeddingNormalizationMethod,
    InferenceParameters,
)
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ErrorKind,
    GenerationError,
    ResponsePayload,
    Tool,
)

decode_log = logging.getLogger("paddler_agent.llama.decode_worker")
"""The decode thread's one logger, whichever of its phase modules writes: a request is
followed through admission, prefill, sampling and finishing on one logger name."""

Payload = ResponsePayload
Emit = tuple[str, ResponsePayload, bool, ErrorKind | None]
"""(request id, payload, final, what a terminal error means to the balancer)."""


@dataclass(frozen=True)
class Settings:
    """What a request is prepared with: group defaults and the chat template."""

    defaults: InferenceParameters
    chat_template_override: str | None = None


@dataclass
class Job:
    """A generation request, prepared (rendered, tokenized, sampler settings resolved)."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    params: InferenceParameters
    seed: int | None
    stops: list[str]
    grammar: tuple[str, str] | None
    prefix_keys: tuple[str, ...] = ()
    tools: list[Tool] | None = None
    """Set for conversation requests: their output is classified (tools may be empty)."""
    starts_in_reasoning: bool = False
    parse_tool_calls: bool = True
    order: int = 0
    """Arrival order: older requests go first and are preempted last."""
    media: MediaPrompt | None = None
    """The image chunks of a prompt with images; ``prompt`` holds their placeholders."""
    image_tokens: int = 0
    """Tokens of ``prompt`` that stand for images."""

    def free_media(self) -> None:
        if self.media is not None:
            self.media.free()
            self.media = None


@dataclass
class SlotSequence:
    """A job running in a slot."""

    job: Job
    slot: int
    sampler: Sampler | FastSampler
    pending: list[int]
    cached: int
    n_past: int
    text: TextStream
    classifier: OutputClassifier | None
    next_token: int | None = None
    generated: int = 0
    tally: TokenTally = field(default_factory=TokenTally)
    """Generated tokens per kind (ContentToken, ReasoningToken, ToolCallToken)."""
    started: float = field(default_factory=time.monotonic)
    parked: bool = False
    """Preempted because the KV cache was full: its cells were freed and ``pending``
    holds everything to re-evaluate (prompt, generated tokens) when it resumes."""


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)
    """Tokens the slot's KV cache holds, in order."""
    seq: SlotSequence | None = None
    last_used: float = 0.0
    prefix_keys: tuple[str, ...] = ()
    """Prefix keys of the request whose KV cache the slot holds."""


@dataclass
class EmbedJob:
    request_id: str
    documents: list[tuple[str, list[int]]]
    normalization: EmbeddingNormalizationMethod
    pooling_label: str
    next_index: int = 0


def template_for(params: ContinueFromConversationHistoryParams, settings: Settings, model: NativeModel) -> str:
    """The chat template to render ``params`` with; raises RequestError."""
    if params.grammar is not None and params.enable_thinking:
        raise RequestError(
            GenerationError.GRAMMAR_INCOMPATIBLE_WITH_THINKING,
            "a grammar cannot be combined with enable_thinking; disable thinking to use it",
        )
    template = settings.chat_template_override or model.chat_template()
    if not template:
        raise RequestError(
            GenerationError.CHAT_TEMPLATE_ERROR, "the model has no chat template and no chat template override is set"
        )
    return template


@dataclass
class StatusDelta:
    slots_processing: int | None = None
    prefix_hashes: list[str] | None = None
    loop_stopped: str | None = None
    """The decode loop died with this error: the engine reports it as an issue."""
    kv_cache_tokens_used: int | None = None
    prompt_tokens: tuple[int, int] | None = None
    """(reused, evaluated) prompt tokens of the requests started since the last delta."""


Deliver = Callable[[list[Emit], StatusDelta | None], None]
