"""``POST /v1/responses`` against real balancer + simulated-agent processes, driven with
the real ``openai`` SDK (``client.responses.create`` / ``client.responses.stream``).

The simulated engine answers a JSON-schema grammar with the schema's simplest value,
so forced function calls and structured output are checked end to end here; the
real model does the same in test_responses_engine.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.harness import Balancer, Processes, wait_until
from tests.openai.conftest import (
    agents,
    logged_requests,
    openai_client,
    requests_total,
    wait_busy,
    wait_for_agents,
)

WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A balancer (with --compat-openai-addr) and one 2-slot simulated agent."""
    processes = Processes(tmp_path_factory.mktemp("responses-shared"))
    try:
        balancer = processes.balancer("--compat-openai-addr", "127.0.0.1:0")
        balancer.process.wait_for_urls(["compat_openai"])
        processes.agent(balancer, slots=2, name="sim", extra=("--simulated-tokens-per-second", "200"))
        asyncio.run(wait_for_agents(balancer, 1))
        yield balancer
    finally:
        processes.close()


async def test_create_with_string_input_returns_a_message_and_usage(shared_pool: Balancer) -> None:
    async with openai_client(shared_pool) as client:
        response = await client.responses.create(
            model="default", input="Say hello", instructions="Be brief.", max_output_tokens=7, temperature=0.2
        )
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status == "incomplete"  # the simulated agent writes until the limit
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens == 7
    assert response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 7
    assert response.instructions == "Be brief."


async def test_stream_sends_the_event_sequence_and_usage(shared_pool: Balancer) -> None:
    async with openai_client(shared_pool) as client:
        stream = await client.responses.create(model="default", input="Say hello", max_output_tokens=5, stream=True)
        events = [event async for event in stream]
        plain = await client.responses.create(model="default", input="Say hello", max_output_tokens=5)
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # max_output_tokens cut it, as OpenAI reports
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == plain.output_text  # same prompt, same deterministic tokens
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.output_text == streamed
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 5
    assert events[0].type == "response.created"
    assert events[0].response.id == last.response.id


class City(BaseModel):
    city: str
    country: str
    population: int


async def test_json_schema_text_format_is_parsed_by_the_sdk(shared_pool: Balancer) -> None:
    async with openai_client(shared_pool) as client:
        parsed = await client.responses.parse(model="default", input="Describe Paris", text_format=City)
        async with client.responses.stream(model="default", input="Describe Paris", text_format=City) as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, City)
    assert final.status == "completed"
    assert final.output_parsed == parsed.output_parsed
    assert "".join(deltas) == final.output_text
    assert final.usage is not None
    assert final.usage.output_tokens == len(deltas)


async def test_forced_function_call_and_its_output_round_trip(shared_pool: Balancer) -> None:
    async with openai_client(shared_pool) as client:
        response = await client.responses.create(
            model="default",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]}],
            tools=[WEATHER_TOOL],
            tool_choice="required",
        )
        (call,) = response.output
        assert call.type == "function_call"
        assert call.name == "get_weather"
        assert call.call_id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "x"}
        assert response.status == "completed"
        answer = await client.responses.create(
            model="default",
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'},
            ],
            tools=[WEATHER_TOOL],
            max_output_tokens=4,
        )
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text


async def test_stream_of_a_named_function_call_sends_argument_deltas(shared_pool: Balancer) -> None:
    async with (
        openai_client(shared_pool) as client,
        client.responses.stream(
            model="default",
            input="Weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
        ) as stream,
    ):
        events = [event async for event in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    delta = next(e for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(delta.delta) == {"city": "x"}
    (call,) = final.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert final.usage is not None
    assert final.usage.output_tokens > 0


async def test_compat_openai_addr_serves_responses(shared_pool: Balancer) -> None:
    compat = shared_pool.process.urls["compat_openai"]
    async with openai_client(shared_pool, base_url=compat) as client:
        response = await client.responses.create(model="default", input="Say hello", max_output_tokens=3)
    assert response.usage is not None
    assert response.usage.output_tokens == 3


async def _post(balancer: Balancer, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(balancer.inference_url + "/v1/responses", json=body)


async def test_invalid_requests_are_400_in_the_error_envelope(shared_pool: Balancer) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "default"}, "input"),
        ({"input": []}, "input"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ]
    for body, param in cases:
        response = await _post(shared_pool, body)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert str(error["param"]).startswith(param), (body, error)


async def test_buffer_full_is_503(paddler: Processes) -> None:
    balancer = paddler.balancer("--max-buffered-requests", "0")
    paddler.agent(balancer, slots=1, name="sim", extra=("--simulated-tokens-per-second", "2"))
    await wait_for_agents(balancer, 1)
    async with openai_client(balancer, max_retries=1) as client:
        busy = await client.responses.create(model="default", input="x", max_output_tokens=20, stream=True)
        first = await anext(aiter(busy))
        assert first.type == "response.created"
        with pytest.raises(openai.InternalServerError) as err:
            await client.responses.create(model="default", input="x", max_output_tokens=2)
        await busy.close()
    assert err.value.status_code == 503
    assert err.value.code == "buffer_full"
    assert logged_requests(balancer, "responses", 503) == 2  # first try + the SDK's retry
    assert await requests_total(balancer, "503") == 2


async def test_buffer_timeout_is_504_for_create_and_stream(paddler: Processes) -> None:
    balancer = paddler.balancer("--buffered-request-timeout", "300ms")  # no agents
    async with openai_client(balancer) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.responses.create(model="default", input="x")
        with pytest.raises(openai.InternalServerError) as stream_err:
            async with client.responses.stream(model="default", input="x") as stream:
                await stream.get_final_response()
    assert err.value.status_code == 504
    assert err.value.code == "buffer_timeout"
    assert stream_err.value.status_code == 504  # nothing streamed yet: an HTTP status


async def _idle(balancer: Balancer) -> bool:
    return all(a["slots_in_flight"] == 0 and a["slots_processing"] == 0 for a in await agents(balancer))


async def _buffered(balancer: Balancer) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + "/api/v1/buffered_requests")
    count: int = response.json()["buffered_requests_current"]
    return count


async def test_client_disconnect_frees_the_slot(paddler: Processes) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="sim", extra=("--simulated-tokens-per-second", "5"))
    await wait_for_agents(balancer, 1)
    async with openai_client(balancer) as client:
        async with client.responses.stream(model="default", input="x", max_output_tokens=100) as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    break
            await wait_busy(balancer)
        await wait_until(lambda: _idle(balancer), timeout=5, what="slot freed after disconnect")
        again = await client.responses.create(model="default", input="x", max_output_tokens=2)
    assert again.usage is not None
    assert again.usage.output_tokens == 2


async def test_client_disconnect_releases_the_buffered_request(paddler: Processes) -> None:
    balancer = paddler.balancer()  # no agent: the request waits in the buffer
    async with openai_client(balancer) as client:
        waiting = asyncio.create_task(client.responses.create(model="default", input="x", max_output_tokens=2))

        async def buffered() -> bool:
            return await _buffered(balancer) == 1

        await wait_until(buffered, timeout=5, what="request buffered")
        waiting.cancel()

        async def released() -> bool:
            return await _buffered(balancer) == 0

        await wait_until(released, timeout=5, what="buffered request released after disconnect")
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def test_agent_lost_mid_stream_sends_error_then_response_failed(paddler: Processes) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(balancer, slots=1, name="slow", extra=("--simulated-tokens-per-second", "5"))
    await wait_for_agents(balancer, 1)
    async with openai_client(balancer) as client:
        stream = await client.responses.create(model="default", input="x", max_output_tokens=50, stream=True)
        events = []
        async for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta":
                agent.kill()
    error, failed = events[-2:]
    assert error.type == "error"
    assert error.code == "agent_lost"
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "server_error"
