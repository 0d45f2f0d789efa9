"""Pure mapping of the Responses API: input items to chat messages, and response
bodies and stream events checked against the ``openai`` SDK's own models."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.responses import Response, ResponseErrorEvent, ResponseFailedEvent, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.events import Accumulated, Done, Token, ToolCalls, openai_tool_call
from paddler_balancer.openai.mapping import chat_params
from paddler_balancer.openai.responses_output import ResponseHeader, ResponsesStream, output_items
from paddler_balancer.openai.responses_request import ResponsesRequest, chat_messages, chat_request

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m.model_dump(exclude_none=True) for m in chat_messages(ResponsesRequest.model_validate(body))]


def test_string_input_with_instructions_is_a_system_and_a_user_message() -> None:
    assert _messages({"input": "hi", "instructions": "Be brief."}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]


def test_function_calls_group_into_one_assistant_message_and_outputs_become_tool_messages() -> None:
    messages = _messages(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city": "Paris"}'},
                {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city": "Rome"}'},
                {"type": "function_call_output", "call_id": "c1", "output": "21"},
                {"type": "function_call_output", "call_id": "c2", "output": "25"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Warm."}]},
            ]
        }
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "assistant"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[2] == {"role": "tool", "content": "21", "tool_call_id": "c1"}
    assert messages[4]["content"] == [{"type": "text", "text": "Warm."}]


def test_image_parts_keep_their_data_uri_and_file_ids_are_refused() -> None:
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    (message,) = _messages({"input": [{"role": "user", "content": [image]}]})
    assert message["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(OpenAIError) as err:
        _messages({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]})
    assert err.value.status == 400
    assert err.value.param == "input.0.content.0"


@pytest.mark.parametrize(
    "body",
    [
        {"input": "x", "previous_response_id": "resp_1"},
        {"input": "x", "conversation": "conv_1"},
        {"input": "x", "background": True},
        {"input": [{"type": "item_reference", "id": "x"}]},
        {"input": "x", "tools": [{"type": "file_search"}]},
        {"input": ""},
    ],
)
def test_unsupported_or_empty_requests_fail_validation(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResponsesRequest.model_validate(body)


def test_text_format_and_tool_choice_map_to_the_chat_request() -> None:
    req = ResponsesRequest.model_validate(
        {
            "input": "x",
            "max_output_tokens": 9,
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}, "strict": True}},
        }
    )
    params, forced = chat_params(chat_request(req), 100)
    assert params["max_tokens"] == 9
    assert params["grammar"] == {"type": "json_schema", "schema": '{"type": "object"}'}
    assert forced == []
    named = ResponsesRequest.model_validate(
        {"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}}
    )
    _params, forced = chat_params(chat_request(named), 100)
    assert [t.function.name for t in forced] == ["get_weather"]


def _header(**body: Any) -> ResponseHeader:
    return ResponseHeader("resp_1", "default", 1, ResponsesRequest.model_validate({"input": "x", **body}))


def test_finished_response_validates_against_the_sdk_model() -> None:
    acc = Accumulated()
    for event in (Token("Hi", "content"), Token(" there", "content")):
        acc.add(event)
    acc.add(Done({"prompt_tokens": 4, "content_tokens": 2}))
    body = _header(max_output_tokens=5, tools=[TOOL]).finished(acc, 5, output_items(acc, forced=False))
    response = Response.model_validate(body)
    assert response.status == "completed"
    assert response.output_text == "Hi there"
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 2)
    cut = _header().finished(acc, 2, output_items(acc, forced=False))
    assert Response.model_validate(cut).incomplete_details is not None


def test_stream_events_validate_and_a_call_after_text_closes_the_message() -> None:
    acc = Accumulated()
    stream = ResponsesStream(_header(), 50, [], acc)
    call = openai_tool_call({"id": "call_1", "name": "w", "arguments": {"ValidJson": {"a": 1}}}, 0)
    events = stream.opening()
    for event in (Token("Hm", "content"), ToolCalls([call])):
        acc.add(event)
        events += stream.on_event(event)
    acc.add(Done({"prompt_tokens": 1, "content_tokens": 1, "tool_call_tokens": 3}))
    events += stream.closing()
    parsed = [EVENTS.validate_python(e) for e in events]
    assert [e.type for e in parsed] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = parsed[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].arguments == '{"a": 1}'
    failed = ResponsesStream(_header(), 50, [], Accumulated())
    failed.opening()
    error, response_failed = failed.failed(OpenAIError(502, "gone", code="agent_lost"))
    assert ResponseErrorEvent.model_validate(error).code == "agent_lost"
    failure = ResponseFailedEvent.model_validate(response_failed).response
    assert failure.status == "failed"
    assert failure.error is not None
    assert failure.error.code == "server_error"
