"""``paddler agent --engine llama-server`` in front of a real llama-server (SmolLM2),
behind a real balancer, driven by paddler-client 4.0.0 and the openai SDK."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from paddler_client import ClientInference
from paddler_client.continue_from_conversation_history_params import ContinueFromConversationHistoryParams
from paddler_client.continue_from_raw_prompt_params import ContinueFromRawPromptParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.inference_message import InferenceMessageKind

from tests.harness import Balancer, Processes, wait_until
from tests.llama_server.conftest import PARALLEL, SERVER_ARGS, LlamaServers, Stack, start_stack

pytestmark = pytest.mark.engine


async def agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + "/api/v1/agents")
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["agents"]
        return found


async def buffered(balancer: Balancer) -> int:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + "/api/v1/buffered_requests")
        return int(response.json()["buffered_requests_current"])


async def wait_serving(stack: Stack, slots: int = PARALLEL) -> None:
    async def serving() -> bool:
        found = await agents(stack.balancer)
        return len(found) == 1 and found[0]["slots_total"] == slots and not found[0]["issues"]

    await wait_until(serving, timeout=30, interval=0.1, what=f"agent serving {slots} llama-server slots")


async def server_busy_slots(http: httpx.AsyncClient, server_url: str) -> int:
    response = await http.get(server_url + "/slots")
    response.raise_for_status()
    return sum(1 for slot in response.json() if slot["is_processing"])


_GAUGE = re.compile(r"^llamacpp:(requests_processing|requests_deferred) (\S+)$", re.M)


async def server_gauges(http: httpx.AsyncClient, server_url: str) -> dict[str, float]:
    response = await http.get(server_url + "/metrics")
    response.raise_for_status()
    return {name: float(value) for name, value in _GAUGE.findall(response.text)}


@pytest.fixture
async def stack(shared_stack: Stack) -> Stack:
    await wait_serving(shared_stack)
    return shared_stack


def chat(text: str, max_tokens: int = 24) -> ContinueFromConversationHistoryParams:
    return ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[ConversationMessage(role="user", content=text)],
        enable_thinking=False,
        max_tokens=max_tokens,
    )


async def test_paddler_client_gets_an_answer_from_llama_server(stack: Stack) -> None:
    inference = ClientInference(stack.balancer.inference_url)
    try:
        text, usage = "", None
        async for message in await inference.continue_from_conversation_history(chat("What is the capital of France?")):
            if message.kind == InferenceMessageKind.CONTENT_TOKEN:
                text += message.token or ""
            elif message.is_done:
                assert message.summary is not None
                usage = message.summary.usage
            else:
                assert message.is_token, f"request failed: {message}"
    finally:
        await inference.close()
    # The pool's default sampling (temperature > 0) on a 135M model: which words come is
    # chance (CI once got "L'Alcazaba is the capital city of Spain"); that an answer comes
    # is the point. Greedy output is compared with the server's own in the next test.
    assert text.strip()
    assert usage is not None
    assert usage.prompt_tokens > 10
    assert 0 < usage.content_tokens <= 24


async def test_openai_sdk_streams_a_chat_completion_from_llama_server(stack: Stack) -> None:
    async with AsyncOpenAI(base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    assert "Paris" in "".join(parts)
    assert usage is not None
    assert usage.completion_tokens > 0
    assert usage.prompt_tokens > 10


async def test_greedy_answer_equals_the_servers_own_completion(stack: Stack) -> None:
    """Sampling parameters reach the server: at temperature 0 the balancer's answer is
    exactly what llama-server returns to a client that asks it directly."""
    prompt = "The three primary colors are"
    inference = ClientInference(stack.balancer.inference_url)
    try:
        ours = ""
        params = ContinueFromRawPromptParams(raw_prompt=prompt, max_tokens=16)
        state = {"temperature": 0.0, "penalty_repeat": 1.0, "penalty_presence": 0.0}
        async with httpx.AsyncClient() as http:
            current = (await http.get(stack.balancer.management_url + "/api/v1/balancer_desired_state")).json()
            current["inference_parameters"].update(state)
            put = await http.put(stack.balancer.management_url + "/api/v1/balancer_desired_state", json=current)
            assert put.status_code == 204
            async for message in await inference.continue_from_raw_prompt(params):
                if message.kind == InferenceMessageKind.CONTENT_TOKEN:
                    ours += message.token or ""
            direct = await http.post(
                stack.server.url + "/completion",
                json={
                    "prompt": prompt,
                    "n_predict": 16,
                    "temperature": 0.0,
                    "repeat_penalty": 1.0,
                    "presence_penalty": 0.0,
                },
                timeout=60,
            )
    finally:
        await inference.close()
    assert ours
    assert ours == direct.json()["content"]


async def test_eight_concurrent_requests_never_run_more_than_four_at_once_on_the_server(stack: Stack) -> None:
    """The balancer holds what the server's 4 slots cannot take: the server never queues
    (deferred stays 0), never runs more than 4, and all 8 are answered."""
    peak = {"processing": 0.0, "deferred": 0.0, "buffered": 0}
    done = asyncio.Event()

    async def watch(http: httpx.AsyncClient) -> None:
        while not done.is_set():
            gauges = await server_gauges(http, stack.server.url)
            peak["processing"] = max(peak["processing"], gauges["requests_processing"])
            peak["deferred"] = max(peak["deferred"], gauges["requests_deferred"])
            peak["buffered"] = max(peak["buffered"], await buffered(stack.balancer))
            await asyncio.sleep(0.01)

    async def one(client: AsyncOpenAI, n: int) -> str:
        response = await client.completions.create(
            model="default", prompt=f"Story number {n}: once upon a time", max_tokens=40, temperature=0
        )
        return response.choices[0].text

    async with (
        httpx.AsyncClient(timeout=10) as http,
        AsyncOpenAI(base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        watcher = asyncio.create_task(watch(http))
        try:
            texts = await asyncio.gather(*(one(client, n) for n in range(8)))
        finally:
            done.set()
            await watcher
    assert len(texts) == 8
    assert all(texts)
    assert peak["processing"] == PARALLEL, peak
    assert peak["deferred"] == 0, peak
    assert peak["buffered"] >= 1, peak


async def test_client_disconnect_frees_the_servers_slot(stack: Stack) -> None:
    async with httpx.AsyncClient(timeout=30) as http:

        async def streaming() -> None:
            body = {"raw_prompt": "Count from one to one thousand: one, two,", "max_tokens": 2000}
            async with http.stream(
                "POST", stack.balancer.inference_url + "/api/v1/continue_from_raw_prompt", json=body
            ) as response:
                async for _line in response.aiter_lines():
                    pass

        client = asyncio.create_task(streaming())

        async def server_generating() -> bool:
            return await server_busy_slots(http, stack.server.url) == 1

        await wait_until(server_generating, timeout=20, what="llama-server generating")
        client.cancel()  # the client goes away mid-stream
        with pytest.raises(asyncio.CancelledError):
            await client

        async def slot_free() -> bool:
            return await server_busy_slots(http, stack.server.url) == 0

        started = time.monotonic()
        await wait_until(slot_free, timeout=10, what="llama-server's slot freed")
        assert time.monotonic() - started < 5
    found = await agents(stack.balancer)
    assert found[0]["slots_in_flight"] == 0


async def test_desired_model_other_than_the_servers_is_reported_not_applicable(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        state_url = stack.balancer.management_url + "/api/v1/balancer_desired_state"
        current = (await http.get(state_url)).json()
        try:
            other = {**current, "model": {"LocalToAgent": "/models/some-other-model.gguf"}}
            assert (await http.put(state_url, json=other)).status_code == 204

            async def reported() -> bool:
                agent = (await agents(stack.balancer))[0]
                return bool(agent["state_application_status"] == "AttemptedAndNotAppliable")

            await wait_until(reported, timeout=10, what="model change reported as not applicable")
            agent = (await agents(stack.balancer))[0]
            (issue,) = agent["issues"]
            assert list(issue) == ["ModelNotApplicableToLlamaServer"]
            assert "some-other-model.gguf" in issue["ModelNotApplicableToLlamaServer"]["message"]
            assert agent["slots_total"] == PARALLEL  # the server's model keeps serving

            same = {**current, "model": {"LocalToAgent": str(stack.server.model)}}
            assert (await http.put(state_url, json=same)).status_code == 204

            async def applied() -> bool:
                agent = (await agents(stack.balancer))[0]
                return bool(agent["state_application_status"] == "Applied" and not agent["issues"])

            await wait_until(applied, timeout=10, what="the server's own model applied")
        finally:
            await http.put(state_url, json=current)


async def test_killed_server_is_an_issue_and_buffered_requests_are_served_after_restart(
    llama_servers: LlamaServers, paddler: Processes
) -> None:
    server = llama_servers.start(*SERVER_ARGS)
    stack = start_stack(paddler, server, "--buffered-request-timeout", "120s")
    await wait_serving(stack)

    server.kill()

    async def out_of_pool() -> bool:
        agent = (await agents(stack.balancer))[0]
        return agent["slots_total"] == 0 and any("LlamaServerUnreachable" in issue for issue in agent["issues"])

    await wait_until(out_of_pool, timeout=10, what="dead server reported, slots gone")

    async with AsyncOpenAI(base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0) as client:
        pending = asyncio.create_task(
            client.completions.create(model="default", prompt="Hello, my name is", max_tokens=8, temperature=0)
        )

        async def held() -> bool:
            return await buffered(stack.balancer) == 1

        await wait_until(held, timeout=10, what="request buffered while the server is down")

        await asyncio.to_thread(server.start)
        response = await asyncio.wait_for(pending, timeout=60)
    assert response.choices[0].text
    await wait_serving(stack)


async def test_agent_serves_a_server_without_the_slots_endpoint(
    llama_servers: LlamaServers, paddler: Processes
) -> None:
    """With --no-slots the slot count still comes from /props and requests are served."""
    server = llama_servers.start("--parallel", "2", "--ctx-size", "2048", "--no-slots")
    stack = start_stack(paddler, server)
    await wait_serving(stack, slots=2)
    async with AsyncOpenAI(base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0) as client:
        response = await client.completions.create(model="default", prompt="Hello", max_tokens=4, temperature=0)
    assert response.choices[0].text
    assert "no /slots endpoint" in stack.agent.output()


async def test_embeddings_from_a_server_started_with_embeddings(
    llama_servers: LlamaServers, paddler: Processes
) -> None:
    server = llama_servers.start("--parallel", "2", "--ctx-size", "2048", "--embeddings", "--pooling", "mean")
    stack = start_stack(paddler, server)
    await wait_serving(stack, slots=2)
    async with AsyncOpenAI(base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0) as client:
        response = await client.embeddings.create(model="default", input=["a cat", "a dog", "a spaceship"])
    vectors = [item.embedding for item in response.data]
    assert len(vectors) == 3
    assert len({len(v) for v in vectors}) == 1
    assert len(vectors[0]) > 100
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-3 for v in vectors)  # the OpenAI API's L2 norm


async def test_host_header_is_rewritten_for_a_server_behind_a_proxy(
    llama_servers: LlamaServers, paddler: Processes
) -> None:
    """A proxy that routes by Host only forwards requests for ``llm.internal``."""
    from aiohttp import ClientSession, web

    server = llama_servers.start("--parallel", "2", "--ctx-size", "2048")
    hosts: list[str] = []
    session = ClientSession()

    async def proxy(request: web.Request) -> web.StreamResponse:
        hosts.append(request.host)
        if request.host != "llm.internal":
            return web.Response(status=404, text="unknown virtual host")
        async with session.request(request.method, server.url + request.path_qs, data=await request.read()) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": upstream.content_type})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        stack = start_stack(
            paddler,
            server,
            url=f"http://127.0.0.1:{port}",
            agent_args=("--llama-server-host-header", "llm.internal"),
        )
        await wait_serving(stack, slots=2)
        async with AsyncOpenAI(
            base_url=stack.balancer.inference_url + "/v1", api_key="unused", max_retries=0
        ) as client:
            response = await client.completions.create(model="default", prompt="Hello", max_tokens=4, temperature=0)
        assert response.choices[0].text
        assert hosts
        assert set(hosts) == {"llm.internal"}
    finally:
        await runner.cleanup()
        await session.close()
