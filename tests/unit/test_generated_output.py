"""Every engine's payloads come from paddler_core.generated_output: the JSON each
constructor makes is Paddler 4.x's, byte for byte (the wire the balancer and clients read)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from paddler_core.desired_state import EmbeddingNormalizationMethod
from paddler_core.generated_output import (
    RequestFamily,
    TokenCounts,
    TokenKind,
    document_exceeds_batch_size,
    done,
    embedding,
    embedding_done,
    embedding_error,
    generated_token,
    generation_error,
    request_failed,
)
from paddler_core.inference import GenerationError, response_payload_problem

USAGE = TokenCounts(content=3, reasoning=2, tool_call=1).usage(
    prompt_tokens=10, cached_prompt_tokens=4, input_image_tokens=5
)
USAGE_JSON = (
    '{"prompt_tokens": 10, "cached_prompt_tokens": 4, "input_image_tokens": 5, "input_audio_tokens": 0, '
    '"content_tokens": 3, "reasoning_tokens": 2, "tool_call_tokens": 1, "undeterminable_tokens": 0}'
)
L2 = EmbeddingNormalizationMethod(kind="L2")
RMS = EmbeddingNormalizationMethod(kind="RmsNorm", epsilon=0.5)


@pytest.mark.parametrize(
    ("payload", "wire"),
    [
        (generated_token("Hi"), '{"GeneratedToken": {"ContentToken": "Hi"}}'),
        (generated_token("hm", "ReasoningToken"), '{"GeneratedToken": {"ReasoningToken": "hm"}}'),
        (generated_token("<", TokenKind.TOOL_CALL), '{"GeneratedToken": {"ToolCallToken": "<"}}'),
        (done(USAGE), '{"GeneratedToken": {"Done": {"usage": ' + USAGE_JSON + "}}}"),
        (
            done(USAGE, {"received_ns": 1, "first_token_ns": None}),
            '{"GeneratedToken": {"Done": {"usage": '
            + USAGE_JSON
            + ', "timings": {"received_ns": 1, "first_token_ns": null}}}}',
        ),
        (
            generation_error(GenerationError.CHAT_TEMPLATE_ERROR, "bad template"),
            '{"GeneratedToken": {"ChatTemplateError": "bad template"}}',
        ),
        (
            embedding("doc", [0.5, -1.0], L2, "Mean"),
            '{"Embedding": {"Embedding": {"embedding": [0.5, -1.0], "normalization_method": "L2", '
            '"pooling_type": "Mean", "source_document_id": "doc"}}}',
        ),
        (
            embedding("d2", [1.0], RMS, "Last"),
            '{"Embedding": {"Embedding": {"embedding": [1.0], "normalization_method": {"RmsNorm": {"epsilon": 0.5}}, '
            '"pooling_type": "Last", "source_document_id": "d2"}}}',
        ),
        (
            document_exceeds_batch_size("big", 9, 4),
            '{"Embedding": {"DocumentExceedsBatchSize": {"document_tokens": 9, "n_batch": 4, '
            '"source_document_id": "big"}}}',
        ),
        (embedding_done(), '{"Embedding": "Done"}'),
        (embedding_error("no embeddings"), '{"Embedding": {"Error": "no embeddings"}}'),
        (request_failed(RequestFamily.GENERATION, "no model"), '{"GeneratedToken": {"SamplerError": "no model"}}'),
        (request_failed(RequestFamily.EMBEDDING, "no model"), '{"Embedding": {"Error": "no model"}}'),
    ],
)
def test_each_constructor_writes_paddlers_json(payload: Any, wire: str) -> None:
    assert json.dumps(payload) == wire
    assert response_payload_problem(payload) is None


@pytest.mark.parametrize(
    ("added", "content", "reasoning", "tool_call", "undeterminable"),
    [
        ([], 0, 0, 0, 0),
        ([("ContentToken", 2), ("ContentToken", 1)], 3, 0, 0, 0),
        ([("ReasoningToken", 4), ("ToolCallToken", 1), ("ContentToken", 0)], 0, 4, 1, 0),
        ([(TokenKind.UNDETERMINABLE, 2)], 0, 0, 0, 2),
        ([("NotAKind", 7)], 0, 0, 0, 0),
    ],
)
def test_token_counts_add_up_per_kind(
    added: list[tuple[str, int]], content: int, reasoning: int, tool_call: int, undeterminable: int
) -> None:
    counts = TokenCounts()
    for kind, tokens in added:
        counts.add(kind, tokens)
    assert counts == TokenCounts(content, reasoning, tool_call, undeterminable)


def test_the_usage_of_counts_names_every_field_paddler_reports() -> None:
    usage = TokenCounts(content=1).usage(prompt_tokens=2, cached_prompt_tokens=1)
    assert usage == {
        "prompt_tokens": 2,
        "cached_prompt_tokens": 1,
        "input_image_tokens": 0,
        "input_audio_tokens": 0,
        "content_tokens": 1,
        "reasoning_tokens": 0,
        "tool_call_tokens": 0,
        "undeterminable_tokens": 0,
    }


def test_each_embedding_payload_is_a_fresh_object() -> None:
    """A consumer may change a payload it got; the next request's must not change with it."""
    first = embedding_done()
    first["Embedding"] = "changed"
    assert embedding_done() == {"Embedding": "Done"}
