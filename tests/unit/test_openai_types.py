"""Pure request/response mapping of the OpenAI-compatible API, as tables. Response
bodies are checked against the ``openai`` SDK's own models."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from paddler_balancer.openai.errors import OpenAIError, invalid_request, parse_body
from paddler_balancer.openai.events import (
    Accumulated,
    AgentError,
    Done,
    Token,
    ToolCallFailed,
    ToolCalls,
    agent_error,
    classify,
    embedding_failure,
    is_length_stop,
)
from paddler_balancer.openai.mapping import (
    chat_params,
    completion_params,
    conversation,
    embedding_params,
    sampling_overrides,
)
from paddler_balancer.openai.model_groups import model_aliases, models_list, resolve_model, served_groups
from paddler_balancer.openai.output import (
    chat_chunk,
    chat_completion,
    decode_embedding,
    embeddings_response,
    encode_embedding,
    finish_reason,
    forced_tool_calls,
    text_chunk,
    text_completion,
    usage_block,
)
from paddler_balancer.openai.request_models import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from paddler_core.desired_state import BalancerDesiredState, SamplingOverrides
from paddler_core.inference import ErrorKind
from paddler_core.protocol import received_payload

USER = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **fields})


# ---- request validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages.0.content.str"),
        ({"messages": USER, "n": 3}, "n"),
        ({"messages": USER, "top_p": 0}, "top_p"),
        ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "logprobs": True}, "logprobs"),
        (
            {"messages": USER, "tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
        ),
        ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
    ],
)
def test_invalid_chat_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ValidationError) as err:
        ChatCompletionRequest.model_validate(body)
    error = invalid_request(err.value)
    assert error.status == 400
    assert error.param is not None
    assert error.param.startswith(param)
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("raw", "code"),
    [(b"{", "invalid_json"), (b"[1]", "invalid_json"), (b"\xff", "invalid_json"), (b'"x"', "invalid_json")],
)
def test_parse_body_rejects_non_objects(raw: bytes, code: str) -> None:
    with pytest.raises(OpenAIError) as err:
        parse_body(raw)
    assert err.value.status == 400
    assert err.value.code == code


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"prompt": "x"}, True),
        ({"prompt": ["x"]}, True),
        ({"prompt": ["x", "y"]}, False),
        ({"prompt": [1, 2]}, False),
        ({"prompt": "x", "echo": True}, False),
        ({"prompt": "x", "best_of": 2}, False),
        ({}, False),
    ],
)
def test_completion_request_validation(body: dict[str, Any], ok: bool) -> None:
    if ok:
        CompletionRequest.model_validate(body)
    else:
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(body)


@pytest.mark.parametrize(
    ("body", "inputs"),
    [
        ({"input": "a"}, ["a"]),
        ({"input": ["a", "b"]}, ["a", "b"]),
        ({"input": ""}, None),
        ({"input": []}, None),
        ({"input": [1, 2]}, None),
        ({"input": "a", "encoding_format": "hex"}, None),
        ({"input": "a", "dimensions": 8}, None),
    ],
)
def test_embedding_request_validation(body: dict[str, Any], inputs: list[str] | None) -> None:
    if inputs is None:
        with pytest.raises(ValidationError):
            EmbeddingRequest.model_validate(body)
        return
    req = EmbeddingRequest.model_validate(body)
    params = embedding_params(req)
    assert [d.content for d in params.input_batch] == inputs
    assert [d.id for d in params.input_batch] == [str(i) for i in range(len(inputs))]
    assert params.normalization_method.kind == "L2"


# ---- request mapping --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"temperature": 0}, SamplingOverrides(temperature=0.0)),
        ({"top_p": 0.5, "seed": 7}, SamplingOverrides(top_p=0.5, seed=7)),
        ({"stop": "END"}, SamplingOverrides(stop=["END"])),
        ({"stop": ["a", "b"]}, SamplingOverrides(stop=["a", "b"])),
        ({"stop": []}, None),
        (
            {"presence_penalty": 0.4, "frequency_penalty": -0.3},
            SamplingOverrides(penalty_presence=0.4, penalty_frequency=-0.3),
        ),
    ],
)
def test_sampling_overrides(fields: dict[str, Any], expected: SamplingOverrides | None) -> None:
    assert sampling_overrides(chat(**fields)) == expected


def test_conversation_mapping() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "rules"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "42"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        ]
    )
    out = [m.model_dump(exclude_none=True) for m in conversation(req.messages)]
    assert out[0] == {"role": "system", "content": "rules"}
    assert out[1] == {"role": "user", "content": "ab"}
    assert out[2]["content"] == ""
    assert [c["function"]["arguments"] for c in out[2]["tool_calls"]] == [{"x": 1}, "not json"]
    assert out[3] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert out[4]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]


@pytest.mark.parametrize(
    ("fields", "grammar_type", "tools_sent", "forced"),
    [
        ({}, None, [], []),
        ({"response_format": {"type": "text"}}, None, [], []),
        ({"response_format": {"type": "json_object"}}, "gbnf", [], []),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
            "json_schema",
            [],
            [],
        ),
        ({"tools": [WEATHER]}, None, ["get_weather"], []),
        ({"tools": [WEATHER], "tool_choice": "auto"}, None, ["get_weather"], []),
        ({"tools": [WEATHER], "tool_choice": "none"}, None, [], []),
        (
            {"tools": [WEATHER, TIME], "tool_choice": "required"},
            "json_schema",
            ["get_weather", "get_time"],
            ["get_weather", "get_time"],
        ),
        (
            {"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "json_schema",
            ["get_weather", "get_time"],
            ["get_time"],
        ),
    ],
)
def test_chat_params(
    fields: dict[str, Any], grammar_type: str | None, tools_sent: list[str], forced: list[str]
) -> None:
    params, forced_tools = chat_params(chat(**fields), 512)
    assert params["max_tokens"] == 512
    assert params["add_generation_prompt"] is True
    assert params.get("grammar", {}).get("type") == grammar_type
    assert [t["function"]["name"] for t in params["tools"]] == tools_sent
    assert [t.function.name for t in forced_tools] == forced


def test_forced_tool_grammar_schema() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    params, _ = chat_params(chat(tools=[WEATHER], tool_choice=named), 64)
    schema = json.loads(params["grammar"]["schema"])
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert schema["required"] == ["name", "arguments"]
    params, _ = chat_params(chat(tools=[WEATHER, TIME], tool_choice="required"), 64)
    anyof = json.loads(params["grammar"]["schema"])["anyOf"]
    assert [s["properties"]["name"]["const"] for s in anyof] == ["get_weather", "get_time"]
    assert anyof[1]["properties"]["arguments"] == {"type": "object"}


def test_json_schema_grammar_carries_the_schema_as_a_string() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    params, _ = chat_params(chat(response_format=fmt), 64)
    assert params["grammar"] == {"type": "json_schema", "schema": json.dumps(schema)}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ],
)
def test_chat_params_reject_contradictions(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as err:
        chat_params(chat(**fields), 64)
    assert err.value.status == 400
    assert err.value.param == param


@pytest.mark.parametrize(
    ("fields", "max_tokens"),
    [({}, 4096), ({"max_tokens": 5}, 5), ({"max_completion_tokens": 6, "max_tokens": 5}, 6)],
)
def test_chat_max_tokens(fields: dict[str, Any], max_tokens: int) -> None:
    assert chat_params(chat(**fields), 4096)[0]["max_tokens"] == max_tokens


def test_completion_params() -> None:
    req = CompletionRequest.model_validate({"prompt": ["Once"], "max_tokens": 3})
    assert completion_params(req, 16) == {"raw_prompt": "Once", "max_tokens": 3}
    assert completion_params(CompletionRequest.model_validate({"prompt": "x"}), 16)["max_tokens"] == 16


# ---- model groups -----------------------------------------------------------------------------


def state(model: Any) -> BalancerDesiredState:
    return BalancerDesiredState.model_validate({"model": model})


HF = state({"HuggingFace": {"repo_id": "org/SmolLM2-GGUF", "filename": "smol.Q4.gguf"}})
LOCAL = state({"LocalToAgent": "/models/Alpha.Q4_1.gguf"})


@pytest.mark.parametrize(
    ("desired", "aliases"),
    [
        (state("None"), set()),
        (LOCAL, {"/models/Alpha.Q4_1.gguf", "Alpha.Q4_1.gguf", "Alpha.Q4_1"}),
        (HF, {"org/SmolLM2-GGUF/smol.Q4.gguf", "smol.Q4.gguf", "smol.Q4", "org/SmolLM2-GGUF"}),
        (state({"Url": {"url": "https://x/y/m.gguf"}}), {"https://x/y/m.gguf", "m.gguf", "m"}),
    ],
)
def test_model_aliases(desired: BalancerDesiredState, aliases: set[str]) -> None:
    assert model_aliases(desired) == aliases


@pytest.mark.parametrize(
    ("stored", "with_agents", "served"),
    [
        ([], set(), ["default"]),
        (["default"], set(), ["default"]),
        ([], {"default"}, ["default"]),
        (["beta", "alpha"], set(), ["alpha", "beta"]),
        (["alpha"], {"default"}, ["alpha", "default"]),
        (["alpha"], {"gamma"}, ["alpha", "gamma"]),
    ],
)
def test_served_groups(stored: list[str], with_agents: set[str], served: list[str]) -> None:
    assert served_groups({g: BalancerDesiredState() for g in stored}, with_agents, "default") == served


STATES = {"alpha": LOCAL, "beta": HF, "default": BalancerDesiredState()}


@pytest.mark.parametrize(
    ("requested", "served", "group", "status", "code"),
    [
        (None, ["default"], "default", None, None),
        ("", ["alpha"], "alpha", None, None),
        ("default", ["default"], "default", None, None),
        (None, ["alpha", "beta"], None, 400, "model_required"),
        ("alpha", ["alpha", "beta"], "alpha", None, None),
        ("Alpha.Q4_1", ["alpha", "beta"], "alpha", None, None),
        ("Alpha.Q4_1.gguf", ["alpha", "beta"], "alpha", None, None),
        ("org/SmolLM2-GGUF", ["alpha", "beta"], "beta", None, None),
        ("gpt-4o", ["default"], "default", None, None),  # one group serves any name
        ("gpt-4o", ["alpha", "beta"], None, 404, "model_not_found"),
        ("default", ["alpha", "beta"], None, 404, "model_not_found"),
        ("Alpha.Q4_1", ["alpha", "gamma"], None, 400, "model_ambiguous"),
    ],
)
def test_resolve_model(
    requested: str | None, served: list[str], group: str | None, status: int | None, code: str | None
) -> None:
    states = {**STATES, "gamma": LOCAL}
    if group is not None:
        assert resolve_model(requested, served, states) == group
        return
    with pytest.raises(OpenAIError) as err:
        resolve_model(requested, served, states)
    assert (err.value.status, err.value.code, err.value.param) == (status, code, "model")


def test_models_list_validates_as_sdk_models() -> None:
    body = models_list(["alpha", "default"], STATES, 1_700_000_000)
    assert body["object"] == "list"
    models = [Model.model_validate(m) for m in body["data"]]
    assert [m.id for m in models] == ["alpha", "default"]
    assert [m.model_dump().get("root") for m in models] == ["/models/Alpha.Q4_1.gguf", None]


# ---- agent payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        ({"GeneratedToken": {"ContentToken": "Hi"}}, Token("Hi", "content")),
        ({"GeneratedToken": {"UndeterminableToken": "?"}}, Token("?", "content")),
        ({"GeneratedToken": {"ReasoningToken": "hmm"}}, Token("hmm", "reasoning")),
        ({"GeneratedToken": {"ToolCallToken": "<tool_call>"}}, Token("<tool_call>", "tool_call")),
        (
            {"GeneratedToken": {"Done": {"usage": {"prompt_tokens": 3, "content_tokens": 2}}}},
            Done({"prompt_tokens": 3, "content_tokens": 2}),
        ),
        (
            {"GeneratedToken": {"UnrecognizedToolCallFormat": {"text": "raw", "ffi_error_message": "x"}}},
            Token("raw", "content"),
        ),
        ({"GeneratedToken": {"ChatTemplateError": "bad"}}, AgentError("ChatTemplateError", "bad")),
        (
            {"GeneratedToken": {"ToolCallValidationFailed": ["e1"]}},
            ToolCallFailed("ToolCallValidationFailed", '["e1"]'),
        ),
        ({"GeneratedToken": {"ToolCallParseFailed": "bad json"}}, ToolCallFailed("ToolCallParseFailed", "bad json")),
        ({"GeneratedToken": {"GrammarRejectedModelOutput": "x"}}, AgentError("GrammarRejectedModelOutput", "x")),
        ("Timeout", AgentError("UnknownPayload", "unexpected payload from the agent: 'Timeout'")),
    ],
)
def test_classify(payload: Any, event: Any) -> None:
    assert classify(payload) == event


def test_classify_tool_calls() -> None:
    payload = {
        "GeneratedToken": {
            "ToolCallParsed": [
                {"id": "call_a", "name": "get_weather", "arguments": {"ValidJson": {"city": "Oslo"}}},
                {"id": "", "name": "get_time", "arguments": {"InvalidJson": "{oops"}},
            ]
        }
    }
    event = classify(payload)
    assert isinstance(event, ToolCalls)
    first, second = event.calls
    assert first == {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    assert second["index"] == 1
    assert second["id"].startswith("call_")
    assert second["function"]["arguments"] == "{oops"


@pytest.mark.parametrize(
    ("kind", "message", "error_kind", "status", "code"),
    [
        ("ChatTemplateError", "x", None, 400, "chat_template_error"),
        ("GrammarSyntaxError", "x", None, 400, "grammar_syntax_error"),
        ("SamplerError", "the prompt has 9000", ErrorKind.PROMPT_EXCEEDS_CONTEXT, 400, "context_length_exceeded"),
        ("SamplerError", "x", ErrorKind.INVALID_REQUEST, 400, "invalid_request"),
        ("SamplerError", "context full: the prompt has 9000 tokens", None, 502, "sampler_error"),
        ("SamplerError", "llama_decode failed with code 1", None, 502, "sampler_error"),
        ("GrammarRejectedModelOutput", "x", None, 502, "grammar_rejected_model_output"),
        ("ToolCallParseFailed", "x", None, 502, "tool_call_parse_failed"),
        ("UnknownPayload", "x", None, 502, "unknown_payload"),
    ],
)
def test_agent_error_status_follows_the_agents_error_kind_not_the_text(
    kind: str, message: str, error_kind: ErrorKind | None, status: int, code: str
) -> None:
    error = agent_error(AgentError(kind, message, error_kind))
    assert (error.status, error.code) == (status, code)
    assert message in error.message


@pytest.mark.parametrize(
    ("error", "tokens", "length"),
    [
        (AgentError("SamplerError", "used up", ErrorKind.CONTEXT_FULL), 5, True),
        (AgentError("SamplerError", "used up", ErrorKind.CONTEXT_FULL), 0, False),
        (AgentError("SamplerError", "context full: the slot's context"), 5, False),
        (AgentError("SamplerError", "other"), 5, False),
    ],
)
def test_is_length_stop(error: AgentError, tokens: int, length: bool) -> None:
    assert is_length_stop(error, tokens) is length


def test_classify_carries_the_error_kind_the_agent_sent_beside_the_payload() -> None:
    message = {
        "type": "response",
        "request_id": "r",
        "response": {"GeneratedToken": {"SamplerError": "context full"}},
        "final": True,
        "error_kind": "context_full",
    }
    payload = received_payload(message)
    assert json.dumps(payload) == '{"GeneratedToken": {"SamplerError": "context full"}}'
    assert classify(payload) == AgentError("SamplerError", "context full", ErrorKind.CONTEXT_FULL)
    unknown = received_payload({**message, "error_kind": "from_a_newer_agent"})
    assert classify(unknown) == AgentError("SamplerError", "context full", None)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"Embedding": "Done"}, None),
        ({"Embedding": {"Embedding": {"embedding": [1.0]}}}, None),
        ({"Embedding": {"Error": "embeddings are not enabled"}}, 400),
        ({"Embedding": "EmbeddingRejectedDueToActiveTokenGeneration"}, 503),
        ({"Embedding": "NoEmbeddingsProduced"}, 502),
    ],
)
def test_embedding_failure(payload: Any, status: int | None) -> None:
    error = embedding_failure(payload)
    assert (None if error is None else error.status) == status


# ---- responses --------------------------------------------------------------------------------


USAGE = {
    "prompt_tokens": 10,
    "cached_prompt_tokens": 4,
    "content_tokens": 3,
    "reasoning_tokens": 2,
    "tool_call_tokens": 1,
    "undeterminable_tokens": 0,
}


@pytest.mark.parametrize(
    ("agent_usage", "seen", "prompt", "completion"),
    [(USAGE, 99, 10, 6), (None, 4, 0, 4), ({"prompt_tokens": 2, "content_tokens": 7}, 7, 2, 7)],
)
def test_usage_block(agent_usage: dict[str, int] | None, seen: int, prompt: int, completion: int) -> None:
    usage = usage_block(agent_usage, seen)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert usage["total_tokens"] == prompt + completion


def accumulated(*events: Any, length_stop: bool = False) -> Accumulated:
    acc = Accumulated(length_stop=length_stop)
    for event in events:
        acc.add(event)
    return acc


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("acc", "max_tokens", "reason"),
    [
        (accumulated(Token("a", "content"), Done({"content_tokens": 1})), 5, "stop"),
        (accumulated(Token("a", "content"), Done({"content_tokens": 5})), 5, "length"),
        (accumulated(Token("a", "content"), length_stop=True), 5, "length"),
        (accumulated(Token("x", "tool_call"), ToolCalls([CALL]), Done({"tool_call_tokens": 5})), 5, "tool_calls"),
        (accumulated(Token("a", "content")), None, "stop"),
    ],
)
def test_finish_reason(acc: Accumulated, max_tokens: int | None, reason: str) -> None:
    assert finish_reason(acc, max_tokens) == reason


FORCED = chat_params(chat(tools=[WEATHER, TIME], tool_choice="required"), 64)[1]


@pytest.mark.parametrize(
    ("text", "name", "arguments"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', "get_weather", '{"city": "Oslo"}'),
        ('{"name":"get_time","arguments":{}} ', "get_time", "{}"),
        ('{"name": "get_weather", "arguments": {"city": "Os', None, None),
        ('{"name": "other", "arguments": {}}', None, None),
        ('{"name": "get_time"}', None, None),
        ("[]", None, None),
    ],
)
def test_forced_tool_calls(text: str, name: str | None, arguments: str | None) -> None:
    calls = forced_tool_calls(text, FORCED)
    if name is None:
        assert calls == []
        return
    (call,) = calls
    assert call["function"] == {"name": name, "arguments": arguments}
    assert call["id"].startswith("call_")


def test_failed_tool_call_falls_back_to_its_raw_text_as_content() -> None:
    acc = accumulated(Token("Sure: ", "content"), Token('{"name": "nope"', "tool_call"), Token("}", "tool_call"))
    replacement = acc.add(ToolCallFailed("ToolCallValidationFailed", '["nope: no such tool"]'))
    assert replacement == Token('{"name": "nope"}', "content")
    acc.add(Done({"content_tokens": 1, "tool_call_tokens": 2}))
    assert acc.text == 'Sure: {"name": "nope"}'
    assert acc.tool_calls == []
    assert acc.tool_text == []
    assert finish_reason(acc, 100) == "stop"
    body = chat_completion("chatcmpl-3", "m", 1, acc, 100)
    assert body["choices"][0]["message"]["content"] == 'Sure: {"name": "nope"}'
    assert body["usage"]["completion_tokens"] == 3


def test_chat_completion_validates_with_the_sdk() -> None:
    acc = accumulated(Token("Hel", "content"), Token("lo", "content"), Token("why", "reasoning"), Done(USAGE))
    body = chat_completion("chatcmpl-1", "default", 1, acc, 100)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Hello"
    assert parsed.choices[0].finish_reason == "stop"
    assert body["choices"][0]["message"]["reasoning_content"] == "why"
    assert parsed.usage is not None
    assert parsed.usage.completion_tokens == 6
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 4

    tool = accumulated(Token("{...}", "tool_call"), ToolCalls([CALL]), Done({"tool_call_tokens": 1}))
    parsed = ChatCompletion.model_validate(chat_completion("chatcmpl-2", "m", 1, tool, 100))
    message = parsed.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].id == "call_1"
    assert "index" not in chat_completion("chatcmpl-2", "m", 1, tool, 100)["choices"][0]["message"]["tool_calls"][0]
    assert parsed.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("delta", "finish", "include_usage"),
    [
        ({"role": "assistant", "content": ""}, None, False),
        ({"content": "x"}, None, True),
        ({"tool_calls": [CALL]}, None, False),
        ({}, "stop", True),
        (None, None, True),
    ],
)
def test_chat_chunks_validate_with_the_sdk(
    delta: dict[str, Any] | None, finish: str | None, include_usage: bool
) -> None:
    usage = usage_block(USAGE, 0) if delta is None else None
    body = chat_chunk("chatcmpl-1", "m", 1, delta, finish, usage, include_usage)
    parsed = ChatCompletionChunk.model_validate(body)
    assert ("usage" in body) is include_usage
    assert len(parsed.choices) == (0 if delta is None else 1)


def test_text_completion_and_chunks_validate_with_the_sdk() -> None:
    acc = accumulated(Token("Once", "content"), Done({"prompt_tokens": 2, "content_tokens": 1}))
    parsed = Completion.model_validate(text_completion("cmpl-1", "m", 1, acc, 1))
    assert parsed.choices[0].text == "Once"
    assert parsed.choices[0].finish_reason == "length"
    # Intermediate chunks carry finish_reason null, as OpenAI streams them (the SDK does
    # not validate stream chunks; its model would demand a reason).
    assert text_chunk("cmpl-1", "m", 1, "x")["choices"] == [
        {"index": 0, "text": "x", "logprobs": None, "finish_reason": None}
    ]
    Completion.model_validate(text_chunk("cmpl-1", "m", 1, "", "stop"))
    usage_only = text_chunk("cmpl-1", "m", 1, None, None, usage_block(None, 3), True)
    assert Completion.model_validate(usage_only).usage is not None


@pytest.mark.parametrize("vector", [[0.0], [1.0, -0.5, 0.25], [math.pi, -1e-8, 123456.0]])
def test_base64_embeddings_round_trip(vector: list[float]) -> None:
    encoded = encode_embedding(vector, "base64")
    assert isinstance(encoded, str)
    assert all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(decode_embedding(encoded), vector, strict=True)
    )
    assert encode_embedding(vector, "float") == vector


def test_embeddings_response_validates_with_the_sdk() -> None:
    body = embeddings_response("default", [[0.6, 0.8], [1.0, 0.0]], "float")
    parsed = CreateEmbeddingResponse.model_validate(body)
    assert [d.index for d in parsed.data] == [0, 1]
    assert parsed.data[0].embedding == [0.6, 0.8]
