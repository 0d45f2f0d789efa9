"""The native NDJSON and WebSocket APIs address any model group (``X-Paddler-Model-Group``
header or ``model_group`` query parameter), through paddler-client 4.0.0 as a user
would configure it: a header on its httpx client, a query on its base URL."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets
from paddler_client import ClientInference
from paddler_client.continue_from_conversation_history_params import ContinueFromConversationHistoryParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.embedding_input_document import EmbeddingInputDocument
from paddler_client.embedding_normalization_method import EmbeddingNormalizationMethod
from paddler_client.generate_embedding_batch_params import GenerateEmbeddingBatchParams

from tests.harness import Balancer, Processes, wait_until

PARAMS = ContinueFromConversationHistoryParams(
    add_generation_prompt=True,
    conversation_history=[ConversationMessage(role="user", content="hi")],
    enable_thinking=False,
    max_tokens=3,
)


async def _agent_groups(balancer: Balancer) -> dict[str, str]:
    async with httpx.AsyncClient() as http:
        agents = (await http.get(balancer.management_url + "/api/v1/agents")).json()["agents"]
    return {a["id"]: a["model_group"] for a in agents if a["slots_total"] > 0}


async def _start(paddler: Processes, balancer: Balancer) -> None:
    async with httpx.AsyncClient() as http:
        for group in ("alpha", "beta"):
            url = f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state"
            response = await http.put(url, json={"model": {"LocalToAgent": f"/models/{group}.gguf"}})
            assert response.status_code == 204, response.text
    paddler.agent(balancer, slots=1, name="plain")
    for group in ("alpha", "beta"):
        paddler.agent(balancer, slots=1, name=group, extra=("--model-group", group))

    async def registered() -> bool:
        return sorted((await _agent_groups(balancer)).values()) == ["alpha", "beta", "default"]

    await wait_until(registered, timeout=20, what="three agents, one per group")


@pytest.fixture(scope="module")
def three_groups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """Agents in the default group and in groups alpha and beta, shared by this module."""
    processes = Processes(tmp_path_factory.mktemp("native-groups"))
    try:
        balancer = processes.balancer()
        asyncio.run(_start(processes, balancer))
        yield balancer
    finally:
        processes.close()


async def test_ndjson_request_goes_to_the_group_in_the_header(three_groups: Balancer) -> None:
    groups = await _agent_groups(three_groups)
    headers = {"X-Paddler-Model-Group": "alpha"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as http,
        ClientInference(three_groups.inference_url, http_client=http) as client,
    ):
        messages = [m async for m in client.post_continue_from_conversation_history(PARAMS)]
        embeddings = [
            m
            async for m in client.generate_embedding_batch(
                GenerateEmbeddingBatchParams(
                    input_batch=[EmbeddingInputDocument(id="d", content="text")],
                    normalization_method=EmbeddingNormalizationMethod.l2(),
                )
            )
        ]
    assert {groups[m.generated_by] for m in messages if m.generated_by} == {"alpha"}
    assert embeddings
    assert {groups[m.generated_by] for m in embeddings if m.generated_by} == {"alpha"}


async def test_websocket_requests_go_to_the_group_in_the_query(three_groups: Balancer) -> None:
    groups = await _agent_groups(three_groups)
    async with ClientInference(three_groups.inference_url + "?model_group=beta") as client:
        stream = await client.continue_from_conversation_history(PARAMS)
        messages = [m async for m in stream]
    assert {groups[m.generated_by] for m in messages if m.generated_by} == {"beta"}


async def test_requests_without_a_group_go_to_the_default_group(three_groups: Balancer) -> None:
    groups = await _agent_groups(three_groups)
    async with ClientInference(three_groups.inference_url) as client:
        posted = [m async for m in client.post_continue_from_conversation_history(PARAMS)]
        socket = [m async for m in await client.continue_from_conversation_history(PARAMS)]
    assert {groups[m.generated_by] for m in posted + socket if m.generated_by} == {"default"}


async def test_unknown_group_is_404_listing_the_served_groups(three_groups: Balancer) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            three_groups.inference_url + "/api/v1/continue_from_raw_prompt?model_group=gamma",
            json={"raw_prompt": "x", "max_tokens": 1},
        )
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["kind"] == "model_group_not_found"
    assert "'gamma'" in error["message"]
    assert "alpha, beta, default" in error["message"]
    socket_url = three_groups.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(socket_url, additional_headers={"X-Paddler-Model-Group": "gamma"}):
            pass
    assert refused.value.response.status_code == 404


async def test_buffered_requests_can_be_read_per_model_group(paddler: Processes) -> None:
    # KEDA's metrics-api trigger of a ModelDeployment reads its own group's count.
    balancer = paddler.balancer("--buffered-request-timeout", "20s")
    async with httpx.AsyncClient(timeout=30) as http:
        for group in ("alpha", "beta"):
            url = f"{balancer.management_url}/api/v1/model_groups/{group}/desired_state"
            response = await http.put(url, json={"model": {"LocalToAgent": f"/models/{group}.gguf"}})
            assert response.status_code == 204, response.text

        async def buffered(query: str = "") -> int:
            body = (await http.get(f"{balancer.management_url}/api/v1/buffered_requests{query}")).json()
            return int(body["buffered_requests_current"])

        chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        pending = [
            asyncio.create_task(http.post(f"{balancer.inference_url}/v1/chat/completions", json=chat)) for _ in range(2)
        ]

        async def two_buffered() -> bool:
            return await buffered() == 2

        await wait_until(two_buffered, timeout=10, what="two requests buffered")
        assert (await buffered("?model_group=alpha"), await buffered("?model_group=beta")) == (2, 0)
        assert await buffered("?model_group=unknown") == 0
        paddler.agent(balancer, slots=2, name="alpha", extra=("--model-group", "alpha"))
        responses = await asyncio.wait_for(asyncio.gather(*pending), 20)
        assert [r.status_code for r in responses] == [200, 200]
        assert await buffered("?model_group=alpha") == 0
