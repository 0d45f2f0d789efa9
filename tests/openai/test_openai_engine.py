"""The OpenAI-compatible API on the real model: balancer + ``--engine llama`` agent on
SmolLM2-135M (scripts/fetch-model.sh), driven with the real ``openai`` SDK."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.harness import REPO, Balancer, Processes
from tests.openai.conftest import agents, openai_client, wait_for_agents

pytestmark = pytest.mark.engine

TOOLS_TEMPLATE = REPO / "tests" / "fixtures" / "chat_templates" / "qwen_tools.jinja"
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_path() -> str:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "fetch-model.sh")], check=True, capture_output=True, text=True, cwd=REPO
    )
    path = out.stdout.strip().splitlines()[-1]
    assert Path(path).is_file(), path
    return path


async def _put_state(balancer: Balancer, state: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state)
        assert response.status_code == 204, response.text


def _loaded(model: str) -> Any:
    return lambda a: a["model_path"] == model and a["state_application_status"] == "Applied"


async def _start_pool(processes: Processes, balancer: Balancer, model_path: str) -> None:
    await _put_state(
        balancer,
        {
            "model": {"LocalToAgent": model_path},
            "inference_parameters": {"enable_embeddings": True, "context_size": 2048},
            "chat_template_override": {"content": TOOLS_TEMPLATE.read_text()},
            "use_chat_template_override": True,
        },
    )
    processes.agent(balancer, slots=2, name="llama", engine="llama")
    await wait_for_agents(balancer, 1, _loaded(model_path))


@pytest.fixture(scope="module")
def engine_pool(model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One 2-slot llama agent serving SmolLM2 with embeddings on and a tools-aware
    chat template override (Hermes / Qwen style), shared by this module's tests
    (loading the model is the slow part); stopped at the end even on failure."""
    processes = Processes(tmp_path_factory.mktemp("openai-engine"))
    try:
        balancer = processes.balancer("--inference-item-timeout", "60s")
        asyncio.run(_start_pool(processes, balancer, model_path))
        yield balancer
    finally:
        processes.close()


USER = [{"role": "user", "content": "Write one short sentence about the sea."}]


async def test_usage_counts_the_generated_tokens(engine_pool: Balancer) -> None:
    async with openai_client(engine_pool) as client:
        plain = await client.chat.completions.create(model="default", messages=USER, max_tokens=12, temperature=0)
        stream = await client.chat.completions.create(
            model="default",
            messages=USER,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert plain.usage is not None
    assert plain.usage.prompt_tokens > 5
    assert plain.choices[0].finish_reason in ("stop", "length")
    if plain.choices[0].finish_reason == "length":
        assert plain.usage.completion_tokens == 12
    else:
        assert 0 < plain.usage.completion_tokens < 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content  # greedy: same text
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == plain.usage.completion_tokens
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 0 < len(pieces) <= usage.completion_tokens  # one chunk per token, held-back text merges


async def test_seed_and_stop_reach_the_sampler(engine_pool: Balancer) -> None:
    prompt = "The three primary colors are"
    async with openai_client(engine_pool) as client:
        runs = [
            await client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=1.5, seed=s)
            for s in (7, 7, 8, 9)
        ]
        stopped = await client.completions.create(
            model="default", prompt="Count: 1, 2, 3,", max_tokens=20, temperature=0, stop=[","]
        )
    texts = [r.choices[0].text for r in runs]
    assert texts[0] == texts[1]  # same seed, same sample
    assert len(set(texts[1:])) > 1  # other seeds differ
    assert "," not in stopped.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"


async def test_json_schema_response_parses_and_validates(engine_pool: Balancer) -> None:
    async with openai_client(engine_pool) as client:
        reply = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Invent a person. Answer in JSON with name and age."}],
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
        )
        loose = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
            max_tokens=60,
            temperature=0,
            response_format={"type": "json_object"},
        )
    person = json.loads(reply.choices[0].message.content or "")
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str)
    assert isinstance(person["age"], int)
    assert 0 <= person["age"] <= 150
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)
    else:
        assert (loose.choices[0].message.content or "").startswith("{")


async def test_json_answer_beside_offered_tools_stays_content(engine_pool: Balancer) -> None:
    """With tools offered, the agent reads an answer that starts with ``{`` as a tool
    call; when it is not a valid call the text comes back as content, not an error."""
    async with openai_client(engine_pool) as client:
        reply = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Describe a cat as a JSON object with a color field."}],
            tools=[WEATHER_TOOL],
            response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}},
            max_tokens=40,
            temperature=0,
        )
    choice = reply.choices[0]
    assert choice.message.tool_calls is None
    content = choice.message.content or ""
    assert content.startswith('{"color":')
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content)["color"], str)
    else:  # greedy output may run on inside the string until max_tokens
        assert choice.finish_reason == "length"


CAT_SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "maxLength": 20}},
    "required": ["color"],
    "additionalProperties": False,
}


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int


async def test_sdk_structured_output_parse(engine_pool: Balancer) -> None:
    """``client.chat.completions.parse`` sends a strict json_schema built from a model."""
    async with openai_client(engine_pool) as client:
        completion = await client.chat.completions.parse(
            model="default",
            messages=[{"role": "user", "content": "Invent a person with a name and an age."}],
            response_format=Person,
            max_tokens=60,
            temperature=0,
        )
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.name


async def test_forced_tool_call_is_parsed_into_tool_calls(engine_pool: Balancer) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    async with openai_client(engine_pool) as client:
        reply = await client.chat.completions.create(
            model="default", messages=messages, tools=[WEATHER_TOOL], tool_choice=choice, max_tokens=40, temperature=0
        )
        stream = await client.chat.completions.create(
            model="default",
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=40,
            temperature=0,
            stream=True,
        )
        chunks = [c async for c in stream]
        # The call goes back into the conversation, with the tool's answer.
        (call,) = reply.choices[0].message.tool_calls or []
        follow_up = await client.chat.completions.create(
            model="default",
            messages=[
                *messages,
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'},
            ],
            tools=[WEATHER_TOOL],
            max_tokens=20,
            temperature=0,
        )
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.content is None
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)
    assert arguments["city"]

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed_calls) == 1
    assert streamed_calls[0].function is not None
    assert streamed_calls[0].function.name == "get_weather"
    assert json.loads(streamed_calls[0].function.arguments or "")["city"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert follow_up.choices[0].message.content is not None or follow_up.choices[0].message.tool_calls


async def test_embeddings_have_the_model_dimension(engine_pool: Balancer) -> None:
    (agent,) = await agents(engine_pool)
    async with httpx.AsyncClient() as http:
        url = f"{engine_pool.management_url}/api/v1/agent/{agent['id']}/model_metadata"
        metadata = (await http.get(url)).json()["metadata"]
    n_embd = int(metadata[metadata["general.architecture"] + ".embedding_length"])
    assert n_embd == 576  # SmolLM2-135M
    async with openai_client(engine_pool) as client:
        result = await client.embeddings.create(
            model="default", input=["The sea is calm.", "A quiet ocean.", "Tax forms are due."], encoding_format="float"
        )
        b64 = await client.embeddings.create(model="default", input="The sea is calm.", encoding_format="base64")
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == n_embd for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4) for v in vectors)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])  # similar texts are closer
    from paddler_balancer.openai.output import decode_embedding

    encoded = b64.data[0].embedding
    decoded = decode_embedding(encoded) if isinstance(encoded, str) else encoded
    assert len(decoded) == n_embd
    assert all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-6) for a, b in zip(decoded, vectors[0], strict=True))
