"""Agent payloads read as events (tokens, tool calls, errors, done), and what one
generation accumulated from them."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from paddler_balancer.openai.errors import OpenAIError
from paddler_core.inference import ErrorKind, GenerationError
from paddler_core.protocol import error_kind_of

# ---- agent payloads -------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    text: str
    kind: Literal["content", "reasoning", "tool_call"]


@dataclass(frozen=True)
class ToolCalls:
    calls: list[dict[str, Any]]


@dataclass(frozen=True)
class Done:
    usage: dict[str, int]


@dataclass(frozen=True)
class AgentError:
    kind: str
    message: str
    error_kind: ErrorKind | None = None
    """What the agent said the error means (its ``error_kind``), if anything."""


@dataclass(frozen=True)
class ToolCallFailed:
    """The model wrote a tool call the agent could not parse or validate."""

    kind: str
    message: str


Event = Token | ToolCalls | ToolCallFailed | Done | AgentError

_TOKEN_KINDS: dict[str, Literal["content", "reasoning", "tool_call"]] = {
    "ContentToken": "content",
    "UndeterminableToken": "content",
    "ReasoningToken": "reasoning",
    "ToolCallToken": "tool_call",
}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """One Paddler ``ToolCallParsed`` entry as an OpenAI ``tool_calls`` entry."""
    arguments = call.get("arguments")
    if isinstance(arguments, dict) and "ValidJson" in arguments:
        text = json.dumps(arguments["ValidJson"])
    elif isinstance(arguments, dict) and "InvalidJson" in arguments:
        text = str(arguments["InvalidJson"])
    else:
        text = json.dumps(arguments if arguments is not None else {})
    return {
        "index": index,
        "id": str(call.get("id") or new_call_id()),
        "type": "function",
        "function": {"name": str(call.get("name", "")), "arguments": text},
    }


def classify(payload: Any) -> Event:
    """One generation payload from an agent as an event; unknown shapes are errors."""
    gen = payload.get("GeneratedToken") if isinstance(payload, dict) else None
    if not isinstance(gen, dict) or len(gen) != 1:
        return AgentError("UnknownPayload", f"unexpected payload from the agent: {payload!r}")
    ((key, value),) = gen.items()
    if key in _TOKEN_KINDS:
        return Token(str(value), _TOKEN_KINDS[key])
    if key == "Done":
        usage = value.get("usage", {}) if isinstance(value, dict) else {}
        return Done({k: int(v) for k, v in usage.items() if isinstance(v, int)})
    if key == "ToolCallParsed" and isinstance(value, list):
        return ToolCalls([openai_tool_call(c, i) for i, c in enumerate(value) if isinstance(c, dict)])
    if key == "UnrecognizedToolCallFormat" and isinstance(value, dict):
        return Token(str(value.get("text", "")), "content")
    if key in ("ToolCallParseFailed", "ToolCallValidationFailed"):
        return ToolCallFailed(key, value if isinstance(value, str) else json.dumps(value))
    return AgentError(key, value if isinstance(value, str) else json.dumps(value), error_kind_of(payload))


_AGENT_ERROR_STATUS: dict[str, int] = {
    GenerationError.CHAT_TEMPLATE_ERROR: 400,
    GenerationError.GRAMMAR_SYNTAX_ERROR: 400,
    GenerationError.GRAMMAR_INITIALIZATION_FAILED: 400,
    GenerationError.GRAMMAR_INCOMPATIBLE_WITH_THINKING: 400,
    GenerationError.TOOL_CALL_VALIDATOR_BUILD_FAILED: 400,
    GenerationError.TOOL_SCHEMA_INVALID: 400,
    GenerationError.IMAGE_DECODING_FAILED: 400,
    GenerationError.MULTIMODAL_NOT_SUPPORTED: 400,
    GenerationError.IMAGE_EXCEEDS_BATCH_SIZE: 400,
    GenerationError.MEDIA_EXCEEDS_MICRO_BATCH: 400,
    GenerationError.MULTIMODAL_TOKENIZATION_FAILED: 400,
}


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def agent_error(error: AgentError) -> OpenAIError:
    """A terminal error payload from the agent as an HTTP outcome. Request problems
    (template, grammar, prompt too long) are 400; model/engine failures are 502."""
    status = _AGENT_ERROR_STATUS.get(error.kind, 502)
    code = _snake(error.kind)
    message = error.message
    if error.error_kind in (ErrorKind.PROMPT_EXCEEDS_CONTEXT, ErrorKind.INVALID_REQUEST):
        status = 400
        code = "context_length_exceeded" if error.error_kind is ErrorKind.PROMPT_EXCEEDS_CONTEXT else "invalid_request"
    return OpenAIError(status, f"{error.kind}: {message}", code=code)


def is_length_stop(error: AgentError, tokens: int) -> bool:
    """The agent ran out of context after generating: OpenAI reports finish_reason "length"."""
    return error.error_kind is ErrorKind.CONTEXT_FULL and tokens > 0


def embedding_failure(payload: Any) -> OpenAIError | None:
    """None for an embedding or Done payload; the OpenAI error for anything else."""
    emb = payload.get("Embedding") if isinstance(payload, dict) else None
    if emb == "Done" or (isinstance(emb, dict) and "Embedding" in emb):
        return None
    if isinstance(emb, dict) and isinstance(emb.get("DocumentExceedsBatchSize"), dict):
        details = emb["DocumentExceedsBatchSize"]
        index = details.get("source_document_id")
        return OpenAIError(
            400,
            f"input {index} has {details.get('document_tokens')} tokens; "
            f"the model embeds at most {details.get('n_batch')} tokens per input (n_batch)",
            code="context_length_exceeded",
            param=f"input.{index}",
        )
    if emb == "EmbeddingRejectedDueToActiveTokenGeneration":
        return OpenAIError(503, "the agent is busy generating; retry", code="embedding_rejected")
    if isinstance(emb, dict) and "Error" in emb:
        return OpenAIError(400, f"embedding failed: {emb['Error']}", code="embedding_error")
    return OpenAIError(502, f"no embeddings produced: {payload!r}", code="no_embeddings")


# ---- responses ------------------------------------------------------------------------------


@dataclass
class Accumulated:
    """What one generation produced so far, built from events."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_text: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    usage: dict[str, int] | None = None
    length_stop: bool = False

    def add(self, event: Event) -> Token | None:
        """Record ``event``; a failed tool call comes back as the content token that
        replaces it (its raw text, as llama-server falls back to content)."""
        if isinstance(event, Token):
            self.tokens += 1
            if event.kind == "content":
                self.content.append(event.text)
            elif event.kind == "reasoning":
                self.reasoning.append(event.text)
            else:
                self.tool_text.append(event.text)
        elif isinstance(event, ToolCalls):
            self.tool_calls.extend(event.calls)
        elif isinstance(event, ToolCallFailed):
            raw = "".join(self.tool_text)
            self.tool_text.clear()
            self.content.append(raw)
            return Token(raw, "content")
        elif isinstance(event, Done):
            self.usage = event.usage
        return None

    @property
    def text(self) -> str:
        return "".join(self.content)
