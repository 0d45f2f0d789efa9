"""``POST /v1/responses`` on the real model: balancer + ``--engine llama`` agent on
SmolLM2-135M, driven with the real ``openai`` SDK (``responses.create`` /
``responses.stream``): function tools, json_schema, usage, 503/504 and a client
disconnect that frees its slot."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.harness import REPO, Balancer, Processes, wait_until
from tests.openai.conftest import agents, openai_client, wait_busy, wait_for_agents

pytestmark = pytest.mark.engine

TOOLS_TEMPLATE = REPO / "tests" / "fixtures" / "chat_templates" / "qwen_tools.jinja"
WEATHER_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}},
        "required": ["city"],
    },
}
QUESTION = "What is the weather in Paris?"
LONG = "Count from 1 to 500, separated by commas: 1, 2, 3,"


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=150)


async def _start_pool(processes: Processes, balancer: Balancer, model_path: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            balancer.management_url + "/api/v1/balancer_desired_state",
            json={
                "model": {"LocalToAgent": model_path},
                "inference_parameters": {"context_size": 2048},
                "chat_template_override": {"content": TOOLS_TEMPLATE.read_text()},
                "use_chat_template_override": True,
            },
        )
        assert response.status_code == 204, response.text
    processes.agent(balancer, slots=1, name="llama", engine="llama")
    await wait_for_agents(
        balancer, 1, lambda a: a["model_path"] == model_path and a["state_application_status"] == "Applied"
    )


@pytest.fixture(scope="module")
def engine_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One 1-slot llama agent on SmolLM2 with a tools-aware template; a buffer of one
    request that waits at most 500 ms (so 503 and 504 are quick to provoke)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "fetch-model.sh")], check=True, capture_output=True, text=True)
    model_path = out.stdout.strip().splitlines()[-1]
    assert Path(model_path).is_file(), model_path
    processes = Processes(tmp_path_factory.mktemp("responses-engine"))
    try:
        balancer = processes.balancer(
            "--inference-item-timeout", "60s", "--max-buffered-requests", "1", "--buffered-request-timeout", "500ms"
        )
        asyncio.run(_start_pool(processes, balancer, model_path))
        yield balancer
    finally:
        processes.close()


async def test_forced_function_call_then_its_output_gets_an_answer(engine_pool: Balancer) -> None:
    async with openai_client(engine_pool) as client:
        response = await client.responses.create(
            model="default",
            input=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_output_tokens=40,
            temperature=0,
        )
        (call,) = response.output
        assert call.type == "function_call"
        assert call.name == "get_weather"
        arguments = json.loads(call.arguments)
        assert isinstance(arguments["city"], str)
        assert arguments["city"]
        assert response.usage is not None
        assert response.usage.output_tokens > 0
        answer = await client.responses.create(
            model="default",
            input=[
                {"role": "user", "content": QUESTION},
                {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
                {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature_c": 21}'},
            ],
            tools=[WEATHER_TOOL],
            tool_choice="none",
            max_output_tokens=30,
            temperature=0,
        )
        question_alone = await client.responses.create(
            model="default", input=QUESTION, tools=[WEATHER_TOOL], tool_choice="none", max_output_tokens=1
        )
    assert answer.output[0].type == "message"
    assert answer.output_text.strip()
    assert answer.usage is not None
    assert question_alone.usage is not None
    # the call and its output are in the prompt
    assert answer.usage.input_tokens > question_alone.usage.input_tokens + 10


async def test_stream_of_a_named_function_call_sends_argument_deltas(engine_pool: Balancer) -> None:
    async with (
        openai_client(engine_pool) as client,
        client.responses.stream(
            model="default",
            input=QUESTION,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=40,
            temperature=0,
        ) as stream,
    ):
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"
    (call,) = final.output
    assert call.type == "function_call"
    assert json.loads(call.arguments)["city"]
    assert final.usage is not None
    assert final.usage.output_tokens > 0


async def test_json_schema_stream_is_parsed_and_counts_usage(engine_pool: Balancer) -> None:
    async with (
        openai_client(engine_pool) as client,
        client.responses.stream(
            model="default",
            input="Invent a person: a name and an age.",
            text_format=Person,
            max_output_tokens=60,
            temperature=0,
        ) as stream,
    ):
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.status == "completed"
    assert isinstance(final.output_parsed, Person)
    assert "".join(deltas) == final.output_text
    assert final.usage is not None
    assert final.usage.output_tokens == len(deltas)
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


async def _buffered(balancer: Balancer) -> int:
    async with httpx.AsyncClient() as http:
        count: int = (await http.get(balancer.management_url + "/api/v1/buffered_requests")).json()[
            "buffered_requests_current"
        ]
    return count


async def _idle(balancer: Balancer) -> bool:
    return all(a["slots_in_flight"] == 0 and a["slots_processing"] == 0 for a in await agents(balancer))


async def test_busy_slot_gives_503_when_the_buffer_is_full_and_504_when_the_wait_expires(
    engine_pool: Balancer,
) -> None:
    # The slot is held by a raw-prompt count under a grammar that never completes, so the
    # model cannot end early (SmolLM2 answers LONG itself in 26 tokens and frees the slot).
    async with (
        openai_client(engine_pool) as client,
        httpx.AsyncClient(timeout=60) as http,
        http.stream(
            "POST",
            f"{engine_pool.inference_url}/api/v1/continue_from_raw_prompt",
            json={
                "raw_prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
                "max_tokens": 1000,
                "grammar": {"type": "gbnf", "grammar": 'root ::= " " [0-9]+ "," root'},
            },
        ) as busy_response,
    ):
        busy = busy_response.aiter_lines()
        await wait_busy(engine_pool)
        waiting = asyncio.create_task(client.responses.create(model="default", input="Hi", max_output_tokens=2))

        async def buffered() -> bool:
            return await _buffered(engine_pool) == 1

        await wait_until(buffered, timeout=5, what="second request buffered")
        with pytest.raises(openai.InternalServerError) as full:
            await client.responses.create(model="default", input="Hi", max_output_tokens=2)
        with pytest.raises(openai.InternalServerError) as expired:
            await waiting
        assert await anext(aiter(busy))  # the busy stream is still running
    assert full.value.status_code == 503
    assert full.value.code == "buffer_full"
    assert expired.value.status_code == 504
    assert expired.value.code == "buffer_timeout"
    await wait_until(lambda: _idle(engine_pool), timeout=10, what="slot freed after the stream closed")


async def test_client_disconnect_frees_the_slot(engine_pool: Balancer) -> None:
    async with openai_client(engine_pool) as client:
        async with client.responses.stream(
            model="default", input=LONG, max_output_tokens=1000, temperature=0
        ) as stream:
            async for event in stream:
                if event.type == "response.output_text.delta":
                    break
            await wait_busy(engine_pool)
        await wait_until(lambda: _idle(engine_pool), timeout=5, what="slot freed after disconnect")
        again = await client.responses.create(model="default", input="Say hi.", max_output_tokens=3, temperature=0)
    assert again.usage is not None
    assert 0 < again.usage.output_tokens <= 3
