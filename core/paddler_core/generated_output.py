"""One typed generation output for every engine: the payloads an agent streams back.

Three engines answer requests (the llama engine's decode thread, the llama-server
engine, the simulated engine), and the agent runtime answers the requests it fails
itself. All of them speak Paddler 4.x's payloads (:mod:`paddler_core.inference`); they
build them here and only here, so a change to a payload's shape is one change and the
JSON of every engine stays the same, byte for byte, as a client or a balancer reads it.

Constructors return plain dicts (typed by :mod:`paddler_core.inference`'s TypedDicts):
they run once per generated token, so they skip pydantic on purpose.

Generation (``{"GeneratedToken": {VARIANT: ...}}``): :func:`generated_token`,
:func:`done` (with :class:`TokenCounts` for its usage) and :func:`generation_error`.
Embeddings (``{"Embedding": ...}``): :func:`embedding`, :func:`document_exceeds_batch_size`,
:func:`embedding_done` and :func:`embedding_error`. A request failed before its
engine answers it: :func:`request_failed`, by :class:`RequestFamily`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from paddler_core.desired_state import EmbeddingNormalizationMethod
from paddler_core.inference import (
    EmbeddingPayload,
    GeneratedTokenPayload,
    GenerationError,
    ResponsePayload,
    Usage,
    done_payload,
    generated_error_payload,
    token_payload,
    usage_dict,
)


class TokenKind(StrEnum):
    """The kinds of generated text (Paddler's token variants)."""

    CONTENT = "ContentToken"
    REASONING = "ReasoningToken"
    TOOL_CALL = "ToolCallToken"
    UNDETERMINABLE = "UndeterminableToken"


class RequestFamily(StrEnum):
    """Which payloads a request is answered in: its failure takes the same family's shape."""

    GENERATION = "GeneratedToken"
    EMBEDDING = "Embedding"


# ---- generation ----------------------------------------------------------------------------


def generated_token(text: str, kind: str = "ContentToken") -> GeneratedTokenPayload:
    """One piece of generated text of ``kind`` (a :class:`TokenKind` value; the output
    classifier hands plain strings)."""
    return token_payload(text, kind)


def tool_call_result(kind: str, body: Any) -> GeneratedTokenPayload:
    """What the model's tool-call text amounts to (``ToolCallParsed`` with the calls,
    ``ToolCallValidationFailed`` with the problems, ``ToolCallParseFailed`` with why):
    terminal for paddler-client's reader."""
    return cast(GeneratedTokenPayload, {"GeneratedToken": {kind: body}})


@dataclass
class TokenCounts:
    """Generated tokens per kind, as ``Done``'s usage reports them."""

    content: int = 0
    reasoning: int = 0
    tool_call: int = 0
    undeterminable: int = 0

    def add(self, kind: str, tokens: int) -> None:
        """Count ``tokens`` more tokens of ``kind`` (a :class:`TokenKind` value)."""
        if kind == TokenKind.CONTENT:
            self.content += tokens
        elif kind == TokenKind.REASONING:
            self.reasoning += tokens
        elif kind == TokenKind.TOOL_CALL:
            self.tool_call += tokens
        elif kind == TokenKind.UNDETERMINABLE:
            self.undeterminable += tokens

    def usage(self, *, prompt_tokens: int, cached_prompt_tokens: int, input_image_tokens: int = 0) -> Usage:
        """Paddler's usage of a generation that produced these tokens."""
        return usage_dict(
            prompt_tokens=prompt_tokens,
            cached_prompt_tokens=cached_prompt_tokens,
            content_tokens=self.content,
            reasoning_tokens=self.reasoning,
            tool_call_tokens=self.tool_call,
            undeterminable_tokens=self.undeterminable,
            input_image_tokens=input_image_tokens,
        )


def done(usage: Usage, timings: dict[str, Any] | None = None) -> GeneratedTokenPayload:
    """The last payload of a generation that ended well. ``timings`` are the simulated
    engine's per-request timestamps (tests read them; not Paddler's, so no real engine sends them)."""
    if timings is None:
        return done_payload(usage)
    return {"GeneratedToken": {"Done": {"usage": usage, "timings": timings}}}


def generation_error(kind: GenerationError, message: str) -> GeneratedTokenPayload:
    """A generation's terminal error, e.g. ``SamplerError`` or ``ChatTemplateError``."""
    return generated_error_payload(kind, message)


# ---- embeddings ----------------------------------------------------------------------------


def embedding(
    source_document_id: str,
    values: list[float],
    normalization: EmbeddingNormalizationMethod,
    pooling_type: str,
) -> EmbeddingPayload:
    """One document's embedding vector (already normalised by ``normalization``)."""
    return {
        "Embedding": {
            "Embedding": {
                "embedding": values,
                "normalization_method": normalization.model_dump(mode="json"),
                "pooling_type": pooling_type,
                "source_document_id": source_document_id,
            }
        }
    }


def document_exceeds_batch_size(source_document_id: str, document_tokens: int, n_batch: int) -> EmbeddingPayload:
    """A document too long to embed in one batch: reported on its own, the others go on
    (Paddler 4.1's ``DocumentExceedsBatchSize``)."""
    oversized = {"document_tokens": document_tokens, "n_batch": n_batch, "source_document_id": source_document_id}
    return {"Embedding": {"DocumentExceedsBatchSize": oversized}}


def embedding_done() -> EmbeddingPayload:
    """The last payload of an embedding batch that ended well."""
    return {"Embedding": "Done"}


def embedding_error(message: str) -> EmbeddingPayload:
    """An embedding batch's terminal error."""
    return {"Embedding": {"Error": message}}


# ---- either ----------------------------------------------------------------------------------


def request_failed(family: RequestFamily, message: str) -> ResponsePayload:
    """The terminal error of a request that failed outside its engine's own work (no
    model loaded, an invalid message): ``SamplerError`` for a generation, ``Error`` for
    an embedding batch."""
    if family is RequestFamily.EMBEDDING:
        return embedding_error(message)
    return generation_error(GenerationError.SAMPLER_ERROR, message)
