"""The llama-server engine's pure pieces: what it reads from the server, what it sends,
and how a ``/completion`` stream becomes Paddler payloads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from paddler_agent.llama_server_wire import (
    EmbeddingError,
    LlamaServerError,
    PreparedRequest,
    ServerProps,
    StreamTranslator,
    busy_slots,
    embedding_vectors,
    error_of_response,
    model_matches,
    prepare_completion,
    sampling_fields,
)
from paddler_core.desired_state import InferenceParameters, ModelSource, SamplingOverrides
from paddler_core.inference import ErrorKind
from paddler_core.protocol import GenerateMessage, parse_generate_message

SERVED = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROPS = ServerProps(total_slots=4, model_path=SERVED, chat_template=TEMPLATE, bos_token="<|im_start|>")


@pytest.mark.parametrize(
    ("source", "matches"),
    [
        (ModelSource.none(), True),
        (ModelSource.local(SERVED), True),
        (ModelSource.local("/elsewhere/SmolLM2-135M-Instruct.Q4_1.gguf"), True),
        (ModelSource.local("/models/other.gguf"), False),
        (
            ModelSource.model_validate(
                {"HuggingFace": {"repo_id": "a/b", "filename": "SmolLM2-135M-Instruct.Q4_1.gguf"}}
            ),
            True,
        ),
        (ModelSource.model_validate({"HuggingFace": {"repo_id": "a/b", "filename": "other.gguf"}}), False),
        (ModelSource.model_validate({"Url": {"url": "https://x.test/m/SmolLM2-135M-Instruct.Q4_1.gguf?dl=1"}}), True),
        (ModelSource.model_validate({"Url": {"url": "https://x.test/m/other.gguf"}}), False),
    ],
)
def test_desired_model_applies_only_when_it_names_the_servers_file(source: ModelSource, matches: bool) -> None:
    assert model_matches(source, SERVED) is matches


def test_props_give_slots_model_and_template() -> None:
    props = ServerProps.from_json(
        {
            "total_slots": 3,
            "model_path": SERVED,
            "chat_template": TEMPLATE,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "default_generation_settings": {"n_ctx": 2048},
            "endpoint_slots": False,
        }
    )
    assert (props.total_slots, props.model_path, props.n_ctx, props.slots_endpoint) == (3, SERVED, 2048, False)
    assert props.metadata()["general.name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("body", [{"model_path": SERVED}, {"total_slots": 0}, [], "Loading model"])
def test_props_without_slots_are_rejected(body: Any) -> None:
    with pytest.raises(ValueError, match=r"total_slots|JSON object"):
        ServerProps.from_json(body)


def test_busy_slots_counts_processing_slots() -> None:
    assert busy_slots([{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}, {"id": 2}]) == 1


def generate(variant: str, params: dict[str, Any], **overrides: Any) -> GenerateMessage:
    return parse_generate_message(
        dict(
            request_id="r1",
            variant=variant,  # type: ignore[arg-type]
            params=params,
            overrides=SamplingOverrides(**overrides) if overrides else None,
        )
    )


def test_raw_prompt_becomes_a_streaming_completion_with_group_and_request_sampling() -> None:
    message = generate(
        "ContinueFromRawPrompt", {"raw_prompt": "Hi", "max_tokens": 7}, temperature=0.0, seed=5, stop=["\n"]
    )
    prepared = prepare_completion(message, InferenceParameters(top_k=11), PROPS, None)
    body = prepared.body
    assert body["prompt"] == "Hi"
    assert body["n_predict"] == 7
    assert body["stream"] is True
    assert (body["temperature"], body["top_k"], body["seed"], body["stop"]) == (0.0, 11, 5, ["\n"])
    assert prepared.tools is None


@pytest.mark.parametrize(
    ("last_n", "n_ctx", "expected"), [(64, 2048, 64), (0, 2048, 0), (-1, 2048, 2048), (-1, 0, None)]
)
def test_penalty_window_of_the_whole_context_becomes_the_slots_context_size(
    last_n: int, n_ctx: int, expected: int | None
) -> None:
    fields = sampling_fields(InferenceParameters(penalty_last_n=last_n), n_ctx)
    assert fields.get("repeat_last_n") == expected


def test_conversation_is_rendered_with_the_servers_template_without_a_leading_bos() -> None:
    message = generate(
        "ContinueFromConversationHistory",
        {"conversation_history": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
    )
    prepared = prepare_completion(message, InferenceParameters(), PROPS, None)
    assert prepared.body["prompt"] == "user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert prepared.tools == []


def test_chat_template_override_wins_over_the_servers_template() -> None:
    message = generate(
        "ContinueFromConversationHistory",
        {"conversation_history": [{"role": "user", "content": "Hello"}], "max_tokens": 8},
    )
    prepared = prepare_completion(message, InferenceParameters(), PROPS, "Q: {{ messages[0].content }} A:")
    assert prepared.body["prompt"] == "Q: Hello A:"


def test_json_schema_grammar_is_sent_as_an_object_and_gbnf_root_renamed() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    message = generate(
        "ContinueFromRawPrompt",
        {"raw_prompt": "x", "max_tokens": 4, "grammar": {"type": "json_schema", "schema": json.dumps(schema)}},
    )
    assert prepare_completion(message, InferenceParameters(), PROPS, None).body["json_schema"] == schema
    gbnf = generate(
        "ContinueFromRawPrompt",
        {
            "raw_prompt": "x",
            "max_tokens": 4,
            "grammar": {"type": "gbnf", "grammar": 'answer ::= "yes"', "root": "answer"},
        },
    )
    assert prepare_completion(gbnf, InferenceParameters(), PROPS, None).body["grammar"].startswith("root ::= answer\n")


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        (
            {"raw_prompt": "x", "max_tokens": 4, "grammar": {"type": "json_schema", "schema": "{not json"}},
            "GrammarSyntaxError",
        ),
    ],
)
def test_bad_requests_become_payload_errors(params: dict[str, Any], kind: str) -> None:
    with pytest.raises(LlamaServerError) as raised:
        prepare_completion(generate("ContinueFromRawPrompt", params), InferenceParameters(), PROPS, None)
    assert raised.value.kind == kind


def test_conversation_without_any_template_is_a_chat_template_error() -> None:
    props = ServerProps(total_slots=1, model_path=SERVED)
    message = generate(
        "ContinueFromConversationHistory", {"conversation_history": [{"role": "user", "content": "a"}], "max_tokens": 2}
    )
    with pytest.raises(LlamaServerError) as raised:
        prepare_completion(message, InferenceParameters(), props, None)
    assert raised.value.kind == "ChatTemplateError"


@pytest.mark.parametrize(
    ("status", "body", "kind", "starts", "error_kind"),
    [
        (
            400,
            {"error": {"code": 400, "type": "exceed_context_size_error", "message": "too long"}},
            "SamplerError",
            "context full: the prompt",
            ErrorKind.PROMPT_EXCEEDS_CONTEXT,
        ),
        (
            400,
            {"error": {"code": 400, "type": "invalid_request_error", "message": "bad"}},
            "SamplerError",
            "invalid request",
            ErrorKind.INVALID_REQUEST,
        ),
        (
            500,
            {"error": {"code": 500, "type": "server_error", "message": "failed to parse grammar"}},
            "GrammarInitializationFailed",
            "failed",
            None,
        ),
        (
            400,
            {"error": {"code": 400, "type": "invalid_request_error", "message": "json_schema: unsupported type"}},
            "GrammarSyntaxError",
            "json_schema",
            None,
        ),
        (
            503,
            {"error": {"code": 503, "type": "unavailable_error", "message": "Loading model"}},
            "SamplerError",
            "llama-server answered HTTP 503",
            None,
        ),
    ],
)
def test_server_errors_map_to_payload_kinds_the_balancer_understands(
    status: int, body: dict[str, Any], kind: str, starts: str, error_kind: ErrorKind | None
) -> None:
    error = error_of_response(status, json.dumps(body))
    assert error.kind == kind
    assert error.message.startswith(starts)
    assert error.error_kind is error_kind


def chunks(*contents: str, evaluated: int = 9, cached: int = 2, stop_type: str = "eos") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"content": text, "stop": False, "tokens_predicted": n} for n, text in enumerate(contents, 1)
    ]
    out.append(
        {
            "content": "",
            "stop": True,
            "tokens_predicted": len(contents),
            "tokens_evaluated": evaluated,
            "tokens_cached": cached,
            "stop_type": stop_type,
        }
    )
    return out


def translate(prepared: PreparedRequest, stream: list[dict[str, Any]]) -> list[Any]:
    translator = StreamTranslator(prepared)
    out: list[Any] = []
    for chunk in stream:
        out += translator.feed(chunk)
    return out + translator.finish()


def test_raw_stream_becomes_content_tokens_and_done_with_the_servers_counts() -> None:
    out = translate(PreparedRequest(body={}, tools=None, max_tokens=10), chunks("Hello", ",", " world"))
    assert out[:3] == [{"GeneratedToken": {"ContentToken": t}} for t in ("Hello", ",", " world")]
    usage = out[3]["GeneratedToken"]["Done"]["usage"]
    assert (usage["prompt_tokens"], usage["cached_prompt_tokens"], usage["content_tokens"]) == (9, 2, 3)


def test_conversation_stream_is_classified_into_reasoning_content_and_tool_calls() -> None:
    prepared = PreparedRequest(body={}, tools=[], max_tokens=50)
    out = translate(prepared, chunks("<think>", "hmm", "</think>", "Yes"))
    kinds = [(k, v) for p in out[:-1] for k, v in p["GeneratedToken"].items()]
    assert ("ReasoningToken", "hmm") in kinds
    assert kinds[-1] == ("ContentToken", "Yes")
    usage = out[-1]["GeneratedToken"]["Done"]["usage"]
    assert usage["reasoning_tokens"] >= 1
    assert usage["content_tokens"] >= 1
    assert usage["reasoning_tokens"] + usage["content_tokens"] == 4


def test_stream_that_stops_on_the_context_limit_ends_with_context_full() -> None:
    translator = StreamTranslator(PreparedRequest(body={}, tools=None, max_tokens=100))
    out: list[Any] = [p for chunk in chunks("a", "b", stop_type="limit") for p in translator.feed(chunk)]
    out += translator.finish()
    assert out[-1]["GeneratedToken"]["SamplerError"].startswith("context full")
    assert translator.error_kind is ErrorKind.CONTEXT_FULL


def test_error_chunk_mid_stream_raises_a_payload_error() -> None:
    translator = StreamTranslator(PreparedRequest(body={}, tools=None, max_tokens=5))
    with pytest.raises(LlamaServerError, match="boom"):
        translator.feed({"error": {"code": 500, "type": "server_error", "message": "boom"}})


def test_embeddings_are_read_in_document_order_and_pooling_none_is_refused() -> None:
    body = [{"index": 1, "embedding": [[0.0, 1.0]]}, {"index": 0, "embedding": [[1.0, 0.0]]}]
    assert embedding_vectors(body, 2) == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(EmbeddingError, match="pooling"):
        embedding_vectors([{"index": 0, "embedding": [[1.0], [2.0]]}], 1)
    with pytest.raises(EmbeddingError, match="2 documents"):
        embedding_vectors([{"index": 0, "embedding": [1.0]}], 2)


async def test_sse_events_reads_lines_longer_than_aiohttps_line_limit() -> None:
    import aiohttp
    from aiohttp import web

    from paddler_agent.llama_server_wire import sse_events

    long_text = "x" * 200_000

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        line = b"data: " + json.dumps({"content": long_text}).encode() + b"\n\n: ping\n\ndata: [DONE]\n\n"
        for start in range(0, len(line), 7000):  # arrives in pieces
            await response.write(line[start : start + 7000])
        return response

    app = web.Application()
    app.router.add_get("/", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as response:
            events = [event async for event in sse_events(response.content)]
    finally:
        await runner.cleanup()
    assert events == [{"content": long_text}]
