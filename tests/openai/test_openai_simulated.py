"""The OpenAI-compatible API against real balancer + simulated-engine agent processes,
driven with the real ``openai`` SDK (only the base URL changed)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from paddler_balancer.openai.output import decode_embedding
from tests.harness import Balancer, Processes
from tests.openai.conftest import (
    API_KEY,
    agents,
    logged_requests,
    openai_client,
    requests_total,
    wait_busy,
    wait_for_agents,
    wait_logged,
)

USER = [{"role": "user", "content": "Say hello"}]


async def pool(paddler: Processes, *balancer_args: str, slots: int = 2, tps: float = 200.0) -> Balancer:
    balancer = paddler.balancer(*balancer_args)
    paddler.agent(balancer, slots=slots, name="sim", extra=("--simulated-tokens-per-second", str(tps)))
    await wait_for_agents(balancer, 1)
    return balancer


@pytest.fixture(scope="module")
def shared_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A balancer with one 2-slot simulated agent, shared by the tests that need no
    special flags (process start-up is most of their cost)."""
    processes = Processes(tmp_path_factory.mktemp("openai-shared"))
    try:
        balancer = processes.balancer()
        processes.agent(balancer, slots=2, name="sim", extra=("--simulated-tokens-per-second", "200"))
        asyncio.run(wait_for_agents(balancer, 1))
        yield balancer
    finally:
        processes.close()


# ---- generation ---------------------------------------------------------------------------


async def test_chat_non_streaming_and_streaming_agree_and_usage_counts_tokens(shared_pool: Balancer) -> None:
    balancer = shared_pool
    async with openai_client(balancer) as client:
        plain = await client.chat.completions.create(
            model="default",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]},
            ],
            max_tokens=7,
            temperature=0.2,
            top_p=0.9,
            seed=42,
            stop=["\n\n"],
            presence_penalty=0.5,
            frequency_penalty=0.1,
        )
        stream = await client.chat.completions.create(
            model="default",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]},
            ],
            max_completion_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]

    assert plain.object == "chat.completion"
    assert plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 7
    assert plain.usage.prompt_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + 7

    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert streamed == choice.message.content  # same prompt, same deterministic tokens
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(content_chunks) == 7
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_without_usage_ends_with_done_line(shared_pool: Balancer) -> None:
    balancer = shared_pool
    body = {"model": "default", "messages": USER, "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient() as http:
        response = await http.post(balancer.inference_url + "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


async def test_completions_plain_and_streaming(shared_pool: Balancer) -> None:
    balancer = shared_pool
    async with openai_client(balancer) as client:
        plain = await client.completions.create(model="default", prompt="Once upon a time")
        listed = await client.completions.create(model="default", prompt=["Once upon a time"], max_tokens=5)
        stream = await client.completions.create(
            model="default",
            prompt="Once upon a time",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    assert plain.object == "text_completion"
    assert plain.usage is not None
    assert plain.usage.completion_tokens == 16
    assert plain.choices[0].finish_reason == "length"
    assert listed.choices[0].text == plain.choices[0].text[: len(listed.choices[0].text)]
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == listed.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(texts) == 5


# ---- models -------------------------------------------------------------------------------


async def test_models_single_group(shared_pool: Balancer) -> None:
    balancer = shared_pool
    async with openai_client(balancer) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["default"]
        assert (await client.models.retrieve("default")).id == "default"
    # model omitted: the pool serves one model, so it answers
    response = await _post(balancer, "/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": 2}))
    assert response.status_code == 200
    assert response.json()["model"] == "default"


async def _put_group(balancer: Balancer, group: str, path: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state",
            json={"model": {"LocalToAgent": path}},
        )
        assert response.status_code == 204, response.text


async def test_models_two_groups_route_by_model_and_display_name(paddler: Processes) -> None:
    balancer = paddler.balancer()
    await _put_group(balancer, "alpha", "/models/Alpha-Chat.Q4_1.gguf")
    await _put_group(balancer, "beta", "/models/beta-embed.gguf")
    for group in ("alpha", "beta"):
        paddler.agent(balancer, slots=1, name=group, extra=("--model-group", group))
    await wait_for_agents(balancer, 2)
    async with openai_client(balancer) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["alpha", "beta"]
        assert [m.model_dump().get("root") for m in models.data] == [
            "/models/Alpha-Chat.Q4_1.gguf",
            "/models/beta-embed.gguf",
        ]
        await client.chat.completions.create(model="alpha", messages=USER, max_tokens=2)
        await client.chat.completions.create(model="Alpha-Chat.Q4_1", messages=USER, max_tokens=2)  # file stem
        await client.embeddings.create(model="beta-embed.gguf", input="x")  # file name
        with pytest.raises(openai.BadRequestError) as omitted:
            await client.chat.completions.create(model="", messages=USER, max_tokens=2)
        assert omitted.value.code == "model_required"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
    assert await requests_total(balancer, "200", "alpha") == 2
    assert await requests_total(balancer, "200", "beta") == 1


# ---- embeddings ---------------------------------------------------------------------------


async def test_embeddings_float_and_base64(shared_pool: Balancer) -> None:
    balancer = shared_pool
    inputs = ["first document", "second document", "third"]
    async with openai_client(balancer) as client:
        floats = await client.embeddings.create(model="default", input=inputs, encoding_format="float")
        single = await client.embeddings.create(model="default", input="first document", encoding_format="float")
    async with httpx.AsyncClient() as http:
        raw = await http.post(
            balancer.inference_url + "/v1/embeddings",
            json={"model": "default", "input": inputs, "encoding_format": "base64"},
        )
    assert [d.index for d in floats.data] == [0, 1, 2]
    for item in floats.data:
        assert len(item.embedding) == 16  # the simulated engine's dimension
        assert math.isclose(math.sqrt(sum(v * v for v in item.embedding)), 1.0, rel_tol=1e-6)
    assert single.data[0].embedding == floats.data[0].embedding
    assert floats.data[0].embedding != floats.data[1].embedding
    encoded = raw.json()["data"]
    for item, b64 in zip(floats.data, encoded, strict=True):
        assert isinstance(b64["embedding"], str)
        decoded = decode_embedding(b64["embedding"])
        assert len(decoded) == 16
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(decoded, item.embedding, strict=True))


# ---- errors -------------------------------------------------------------------------------


async def _post(balancer: Balancer, path: str, content: bytes | str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            balancer.inference_url + path, content=content, headers={"Content-Type": "application/json", **headers}
        )


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


async def test_invalid_requests_are_400_naming_the_field_and_not_retried(shared_pool: Balancer) -> None:
    balancer = shared_pool
    malformed = await _post(balancer, "/v1/chat/completions", b'{"messages": [')
    assert malformed.status_code == 400
    assert _error(malformed)["code"] == "invalid_json"

    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "default"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": USER, "temperature": "hot"}, "temperature"),
        ({"messages": USER, "temperature": 3}, "temperature"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format.type"),
    ]
    for body, param in cases:
        response = await _post(balancer, "/v1/chat/completions", json.dumps(body))
        assert response.status_code == 400, body
        error = _error(response)
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param, (body, error)
        assert param in error["message"]

    bad_embed = await _post(balancer, "/v1/embeddings", json.dumps({"input": [1, 2, 3]}))
    assert bad_embed.status_code == 400
    assert _error(bad_embed)["param"].startswith("input")
    bad_prompt = await _post(balancer, "/v1/completions", json.dumps({"prompt": ["a", "b"]}))
    assert bad_prompt.status_code == 400

    before = logged_requests(balancer, "chat.completions", 400)
    async with openai_client(balancer, max_retries=2) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="default", messages=USER, n=2)
    assert err.value.status_code == 400
    assert err.value.param == "n"
    await wait_logged(balancer, "chat.completions", 400, before + 1)
    await asyncio.sleep(0.3)  # a retry would have arrived by now
    assert logged_requests(balancer, "chat.completions", 400) == before + 1


async def test_any_model_name_is_served_while_one_group_serves(shared_pool: Balancer) -> None:
    async with openai_client(shared_pool) as client:
        chat = await client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
        embedded = await client.embeddings.create(model="text-embedding-3-small", input="x")
        retrieved = await client.models.retrieve("gpt-4o")
    assert chat.model == "gpt-4o"
    assert chat.choices[0].message.content
    assert len(embedded.data) == 1
    assert retrieved.id == "default"
    assert await requests_total(shared_pool, "200", "default") > 0


async def test_unknown_model_is_404_listing_the_groups_and_not_retried(paddler: Processes) -> None:
    balancer = paddler.balancer()
    await _put_group(balancer, "alpha", "/models/alpha.gguf")
    await _put_group(balancer, "beta", "/models/beta.gguf")
    chat_before = logged_requests(balancer, "chat.completions", 404)
    embed_before = logged_requests(balancer, "embeddings", 404)
    async with openai_client(balancer, max_retries=2) as client:
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="gpt-4o", messages=USER)
        with pytest.raises(openai.NotFoundError):
            await client.embeddings.create(model="gpt-4o", input="x")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"
    assert err.value.param == "model"
    assert "gpt-4o" in err.value.message
    assert "alpha, beta" in err.value.message
    await asyncio.sleep(0.3)
    assert logged_requests(balancer, "chat.completions", 404) == chat_before + 1
    assert logged_requests(balancer, "embeddings", 404) == embed_before + 1


async def test_api_key_required_on_openai_and_native_routes(paddler: Processes) -> None:
    balancer = await pool(paddler, "--api-key", API_KEY)
    async with openai_client(balancer, api_key="sk-wrong", max_retries=2) as client:
        with pytest.raises(openai.AuthenticationError) as err:
            await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    async with openai_client(balancer) as client:
        ok = await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
        assert ok.choices[0].message.content
        assert [m.id for m in (await client.models.list()).data] == ["default"]
    native = await _post(balancer, "/api/v1/continue_from_raw_prompt", json.dumps({"raw_prompt": "x", "max_tokens": 1}))
    assert native.status_code == 401
    assert native.json()["error"]["code"] == 401
    async with httpx.AsyncClient() as http:
        assert (await http.get(balancer.inference_url + "/health")).status_code == 200
        missing = await http.get(balancer.inference_url + "/v1/models")
    assert missing.status_code == 401
    assert _error(missing)["type"] == "authentication_error"


async def test_buffer_full_is_503_and_retried_by_the_sdk(paddler: Processes) -> None:
    balancer = await pool(paddler, "--max-buffered-requests", "0", slots=1, tps=2)
    async with openai_client(balancer, max_retries=2) as client:
        busy = await client.chat.completions.create(model="default", messages=USER, max_tokens=20, stream=True)
        first = await anext(aiter(busy))
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
        await busy.close()
    assert err.value.status_code == 503
    assert err.value.code == "buffer_full"
    assert await requests_total(balancer, "503") == 3  # first try + the SDK's 2 retries
    assert logged_requests(balancer, "chat.completions", 503) == 3


async def test_buffer_timeout_is_504_and_retried_by_the_sdk(paddler: Processes) -> None:
    balancer = paddler.balancer("--buffered-request-timeout", "300ms")  # no agents at all
    async with openai_client(balancer, max_retries=2) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
        with pytest.raises(openai.InternalServerError) as embed_err:
            await client.embeddings.create(model="default", input="x")
    assert err.value.status_code == 504
    assert err.value.code == "buffer_timeout"
    assert embed_err.value.status_code == 504
    assert await requests_total(balancer, "504") == 6
    assert logged_requests(balancer, "chat.completions", 504) == 3


async def test_item_timeout_is_504(paddler: Processes) -> None:
    # One token a second: the second request, held while the silent agent cools down
    # (200 ms, see Balancer.agent_silent), still sees no token within 200 ms.
    balancer = await pool(paddler, "--inference-item-timeout", "200ms", slots=1, tps=1)
    async with openai_client(balancer) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="default", messages=USER, max_tokens=3)
        with pytest.raises(openai.InternalServerError) as stream_err:
            await client.chat.completions.create(model="default", messages=USER, max_tokens=3, stream=True)
    assert err.value.status_code == 504
    assert err.value.code == "item_timeout"
    assert stream_err.value.status_code == 504  # nothing streamed yet: an HTTP status


async def test_agent_killed_before_first_token_is_502(paddler: Processes) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(balancer, slots=1, name="slow", extra=("--simulated-tokens-per-second", "0.2"))
    await wait_for_agents(balancer, 1)
    async with openai_client(balancer) as client:
        request = asyncio.create_task(client.chat.completions.create(model="default", messages=USER, max_tokens=3))
        await wait_busy(balancer)
        agent.kill()
        with pytest.raises(openai.InternalServerError) as err:
            await request
    assert err.value.status_code == 502
    assert err.value.code == "agent_lost"


async def test_agent_killed_mid_stream_sends_error_chunk_then_done(paddler: Processes) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(balancer, slots=1, name="slow", extra=("--simulated-tokens-per-second", "5"))
    await wait_for_agents(balancer, 1)
    # The SDK turns the error chunk into an APIError.
    async with openai_client(balancer) as client:
        stream = await client.chat.completions.create(model="default", messages=USER, max_tokens=50, stream=True)
        received = []

        async def read_until_the_agent_dies() -> None:
            async for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    agent.kill()

        with pytest.raises(openai.APIError) as err:
            await read_until_the_agent_dies()
    assert len(received) >= 3
    assert "disconnected" in err.value.message
    assert isinstance(err.value.body, dict)
    assert err.value.body["code"] == "agent_lost"

    # On the wire: an error chunk, then [DONE].
    paddler.agent(balancer, slots=1, name="slow2", extra=("--simulated-tokens-per-second", "5"))
    await wait_for_agents(balancer, 1)
    lines: list[str] = []
    body = {"model": "default", "messages": USER, "max_tokens": 50, "stream": True}
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", balancer.inference_url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                paddler.started[-1].kill()
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == "agent_lost"
    assert error["type"] == "server_error"


async def test_client_disconnect_frees_the_slot(paddler: Processes) -> None:
    balancer = await pool(paddler, slots=1, tps=5)
    async with openai_client(balancer) as client:
        stream = await client.chat.completions.create(model="default", messages=USER, max_tokens=100, stream=True)
        await anext(aiter(stream))
        await wait_busy(balancer)
        await stream.close()

        async def idle() -> bool:
            return all(a["slots_in_flight"] == 0 and a["slots_processing"] == 0 for a in await agents(balancer))

        from tests.harness import wait_until

        await wait_until(idle, timeout=5, what="slot freed after disconnect")
        again = await client.chat.completions.create(model="default", messages=USER, max_tokens=2)
        assert again.choices[0].message.content


async def test_compat_openai_addr_serves_the_openai_api_alone(paddler: Processes) -> None:
    balancer = paddler.balancer("--compat-openai-addr", "127.0.0.1:0")
    balancer.process.wait_for_urls(["compat_openai"])
    compat = balancer.process.urls["compat_openai"]
    paddler.agent(balancer, slots=1, name="sim")
    await wait_for_agents(balancer, 1)
    async with openai_client(balancer, base_url=compat) as client:
        assert [m.id for m in (await client.models.list()).data] == ["default"]
        reply = await client.chat.completions.create(model="default", messages=USER, max_tokens=3)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
    async with httpx.AsyncClient() as http:
        native = await http.post(compat + "/api/v1/continue_from_raw_prompt", json={"raw_prompt": "x", "max_tokens": 1})
    assert native.status_code == 404
