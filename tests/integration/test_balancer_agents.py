"""Balancer + simulated agents as real processes, driven with paddler-client 4.0.0."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
from paddler_client import ClientInference, ClientManagement
from paddler_client.agent_desired_model import AgentDesiredModel
from paddler_client.balancer_desired_state import BalancerDesiredState
from paddler_client.continue_from_conversation_history_params import (
    ContinueFromConversationHistoryParams,
)
from paddler_client.continue_from_raw_prompt_params import ContinueFromRawPromptParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.embedding_input_document import EmbeddingInputDocument
from paddler_client.embedding_normalization_method import EmbeddingNormalizationMethod
from paddler_client.error import HttpError
from paddler_client.generate_embedding_batch_params import GenerateEmbeddingBatchParams
from paddler_client.inference_message import InferenceMessageKind

from tests.harness import Balancer, Processes, wait_until


def chat(text: str, max_tokens: int = 10) -> ContinueFromConversationHistoryParams:
    return ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[ConversationMessage(role="user", content=text)],
        enable_thinking=False,
        max_tokens=max_tokens,
    )


async def wait_for_agents(management: ClientManagement, count: int, slots: int | None = None) -> None:
    async def ready() -> bool:
        agents = (await management.get_agents()).agents
        return len(agents) == count and all(slots is None or a.slots_total == slots for a in agents)

    await wait_until(ready, timeout=15, what=f"{count} agents registered")


async def collect(inference: ClientInference, params: ContinueFromConversationHistoryParams) -> list[str]:
    tokens = []
    async for message in inference.post_continue_from_conversation_history(params):
        if message.is_token:
            assert message.token is not None
            tokens.append(message.token)
        elif message.kind != InferenceMessageKind.DONE:
            raise AssertionError(f"unexpected message {message}")
    return tokens


@pytest.fixture
async def clients_for(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    opened: list[ClientInference | ClientManagement] = []

    def make(balancer: Balancer) -> tuple[ClientInference, ClientManagement]:
        inference, management = ClientInference(balancer.inference_url), ClientManagement(balancer.management_url)
        opened.extend([inference, management])
        return inference, management

    yield make
    for client in opened:
        await client.close()


async def test_lists_agents_with_their_slots(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=2, name="alpha")
    paddler.agent(balancer, slots=3, name="beta")
    _, management = clients_for(balancer)

    await wait_for_agents(management, 2)

    agents = {a.name: a for a in (await management.get_agents()).agents}
    assert {n: a.slots_total for n, a in agents.items()} == {"alpha": 2, "beta": 3}
    assert all(a.slots_processing == 0 for a in agents.values())


async def test_six_concurrent_requests_on_two_agents_never_exceed_their_slots(
    paddler: Processes,
    clients_for,  # type: ignore[no-untyped-def]
) -> None:
    balancer = paddler.balancer()
    for name in ("a", "b"):
        paddler.agent(balancer, slots=2, name=name, extra=("--simulated-tokens-per-second", "50"))
    inference, management = clients_for(balancer)
    await wait_for_agents(management, 2, slots=2)

    results = await asyncio.gather(*(collect(inference, chat(f"question {i}", 15)) for i in range(6)))

    assert [len(r) for r in results] == [15] * 6
    for agent in (await management.get_agents()).agents:
        metadata = await management.get_model_metadata(agent.id)
        assert metadata is not None
        assert int(metadata.metadata["simulated.peak_slots_processing"]) <= 2
        assert metadata.metadata["simulated.requests_beyond_slots"] == "0"
        assert int(metadata.metadata["simulated.completed_requests"]) >= 1


async def test_returns_503_when_the_buffer_is_full(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--max-buffered-requests", "1")
    paddler.agent(balancer, slots=1, name="slow", extra=("--simulated-tokens-per-second", "5"))
    inference, management = clients_for(balancer)
    await wait_for_agents(management, 1, slots=1)

    busy = asyncio.create_task(collect(inference, chat("one", 10)))
    await wait_until(lambda: _in_flight(management, 1), what="first request in flight")
    buffered = asyncio.create_task(collect(inference, chat("two", 2)))
    await wait_until(lambda: _buffered(management, 1), what="second request buffered")

    with pytest.raises(HttpError) as raised:
        await collect(inference, chat("three", 2))
    assert raised.value.status_code == 503
    assert "buffered" in raised.value.message

    ws_stream = await inference.continue_from_conversation_history(chat("four", 2))
    messages = [m async for m in ws_stream]
    assert [m.kind for m in messages] == [InferenceMessageKind.TOO_MANY_BUFFERED_REQUESTS]

    assert len(await busy) == 10
    assert len(await buffered) == 2


async def test_returns_504_when_no_agent_frees_a_slot(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--buffered-request-timeout", "300ms")
    inference, management = clients_for(balancer)

    started = time.monotonic()
    with pytest.raises(HttpError) as raised:
        await collect(inference, chat("nobody home"))
    assert raised.value.status_code == 504
    assert 0.25 < time.monotonic() - started < 5
    assert (await management.get_buffered_requests()).buffered_requests_current == 0

    ws_stream = await inference.continue_from_conversation_history(chat("ws"))
    assert [m.kind async for m in ws_stream] == [InferenceMessageKind.TIMEOUT]


async def test_returns_504_when_the_agent_stops_sending_tokens(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--inference-item-timeout", "300ms")
    paddler.agent(balancer, slots=1, name="sleepy", extra=("--simulated-tokens-per-second", "1"))
    inference, management = clients_for(balancer)
    await wait_for_agents(management, 1, slots=1)

    with pytest.raises(HttpError) as raised:
        await collect(inference, chat("hello"))
    assert raised.value.status_code == 504
    await wait_until(lambda: _in_flight(management, 0), what="slot released after item timeout")


async def test_request_waits_for_an_agent_that_joins_later(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--buffered-request-timeout", "20s")
    inference, management = clients_for(balancer)

    pending = asyncio.create_task(collect(inference, chat("scale me from zero", 3)))
    await wait_until(lambda: _buffered(management, 1), what="request buffered with zero agents")
    paddler.agent(balancer, slots=1, name="late")

    assert len(await asyncio.wait_for(pending, 20)) == 3


async def test_agent_killed_mid_stream_fails_only_its_clients(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    doomed = paddler.agent(balancer, slots=1, name="doomed", extra=("--simulated-tokens-per-second", "10"))
    _, management = clients_for(balancer)
    await wait_for_agents(management, 1)
    paddler.agent(balancer, slots=1, name="survivor", extra=("--simulated-tokens-per-second", "10"))
    await wait_for_agents(management, 2)

    lines: dict[str, list[dict[str, object]]] = {"a": [], "b": []}

    async def stream(key: str) -> float:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"raw_prompt": f"prompt {key}", "max_tokens": 40}
            async with http.stream("POST", f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", json=body) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines[key].append(json.loads(line))
        return time.monotonic()

    tasks = [asyncio.create_task(stream(k)) for k in ("a", "b")]
    await wait_until(lambda: _in_flight(management, 2), what="both agents busy")
    await wait_until(lambda: asyncio.sleep(0, all(len(v) >= 3 for v in lines.values())), what="tokens flowing")
    doomed_id = next(a.id for a in (await management.get_agents()).agents if a.name == "doomed")
    killed_at = time.monotonic()
    doomed.kill()
    ended = await asyncio.gather(*tasks)

    outcomes = {}
    for key, received in lines.items():
        last = received[-1]
        outcomes[key] = "error" if "Error" in last else "done"
        if "Error" in last:
            assert last["Error"]["error"]["code"] == 502  # type: ignore[index]
            assert all(m["Response"]["generated_by"] == doomed_id for m in received[:-1])  # type: ignore[index]
            assert ended[list(lines).index(key)] - killed_at < 2.0
    assert sorted(outcomes.values()) == ["done", "error"]
    await wait_for_agents(management, 1)


async def test_disconnected_client_frees_its_slot(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="solo", extra=("--simulated-tokens-per-second", "5"))
    inference, management = clients_for(balancer)
    await wait_for_agents(management, 1, slots=1)

    async def read_two_tokens_then_leave() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            body = {"raw_prompt": "long story", "max_tokens": 100}
            async with http.stream("POST", f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += bool(line)
                    if seen == 2:
                        return

    await read_two_tokens_then_leave()

    await wait_until(lambda: _in_flight(management, 0), timeout=3, what="slot freed after disconnect")
    agent = (await management.get_agents()).agents[0]
    await wait_until(lambda: _processing(management, agent.id, 0), timeout=3, what="agent stopped generating")
    assert len(await collect(inference, chat("next", 2))) == 2


async def test_client_that_leaves_the_buffer_is_forgotten_at_once(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--buffered-request-timeout", "30s")
    _, management = clients_for(balancer)

    async def post_and_wait() -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            await http.post(
                f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", json={"raw_prompt": "x", "max_tokens": 1}
            )

    task = asyncio.create_task(post_and_wait())
    await wait_until(lambda: _buffered(management, 1), what="buffered")
    task.cancel()
    await wait_until(lambda: _buffered(management, 0), timeout=2, what="left the buffer")


async def test_desired_state_reaches_agents_and_survives_a_restart(
    paddler: Processes,
    clients_for,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    database = f"file://{tmp_path}/state.json"
    balancer = paddler.balancer("--state-database", database)
    paddler.agent(balancer, slots=1, name="follower")
    _, management = clients_for(balancer)
    await wait_for_agents(management, 1)

    state = BalancerDesiredState(model=AgentDesiredModel.local_to_agent("/models/one.gguf"))
    state.inference_parameters.temperature = 0.3
    await management.put_balancer_desired_state(state)

    async def agent_applied() -> bool:
        agents = (await management.get_agents()).agents
        return bool(agents) and agents[0].model_path == "/models/one.gguf"

    await wait_until(agent_applied, what="agent applied the model")

    balancer.process.stop()
    restarted = paddler.balancer("--state-database", database)
    _, management2 = clients_for(restarted)
    survived = await management2.get_balancer_desired_state()
    assert survived.model == AgentDesiredModel.local_to_agent("/models/one.gguf")
    assert survived.inference_parameters.temperature == 0.3


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"model": {"Nope": 1}}', "unknown model source"),
        ('{"inference_parameters": {"temperature": -1}}', "inference_parameters.temperature"),
        ('{"inference_parameters": {"top_k": "many"}}', "inference_parameters.top_k"),
        ('{"unexpected": true}', "unexpected"),
        ("not json", "not valid JSON"),
    ],
)
async def test_rejects_a_bad_desired_state_with_400(paddler: Processes, body: str, needle: str) -> None:
    balancer = paddler.balancer()
    async with httpx.AsyncClient() as http:
        response = await http.put(
            f"{balancer.management_url}/api/v1/balancer_desired_state",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400
        assert needle in response.json()["error"]["message"]
        current = await http.get(f"{balancer.management_url}/api/v1/balancer_desired_state")
        assert current.json()["model"] == "None"


async def test_embeddings_are_buffered_and_split_across_agents(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer("--buffered-request-timeout", "20s")
    inference, management = clients_for(balancer)
    documents = [EmbeddingInputDocument(id=str(i), content=f"document {i}") for i in range(6)]
    params = GenerateEmbeddingBatchParams(input_batch=documents, normalization_method=EmbeddingNormalizationMethod.l2())

    async def embed() -> list[object]:
        return [m async for m in inference.generate_embedding_batch(params)]

    pending = asyncio.create_task(embed())
    await wait_until(lambda: _buffered(management, 1), what="embedding buffered with zero agents")
    paddler.agent(balancer, slots=1, name="e1")
    paddler.agent(balancer, slots=1, name="e2")
    messages = await asyncio.wait_for(pending, 20)

    embeddings = [m for m in messages if m.kind == InferenceMessageKind.EMBEDDING]  # type: ignore[attr-defined]
    assert sorted(e.embedding_data.source_document_id for e in embeddings) == [str(i) for i in range(6)]  # type: ignore[attr-defined]
    assert messages[-1].kind == InferenceMessageKind.EMBEDDING_DONE  # type: ignore[attr-defined]
    for e in embeddings:
        norm = sum(v * v for v in e.embedding_data.embedding) ** 0.5  # type: ignore[attr-defined]
        assert norm == pytest.approx(1.0, abs=1e-6)


async def test_metrics_exist_and_read_zero_when_idle(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    _, management = clients_for(balancer)
    text = await management.get_metrics()
    for name in ("paddler_slots_total", "paddler_slots_processing", "paddler_requests_buffered", "paddler_agents"):
        assert f'{name}{{model_group="default"}} 0.0' in text
    assert "paddler_buffered_requests 0.0" in text


async def test_agents_stream_reports_a_joining_agent(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    _, management = clients_for(balancer)
    seen: list[int] = []

    async def watch() -> None:
        async for snapshot in management.agents_stream():
            seen.append(len(snapshot.agents))
            if snapshot.agents:
                return

    watcher = asyncio.create_task(watch())
    await wait_until(lambda: asyncio.sleep(0, bool(seen)), what="first snapshot")
    paddler.agent(balancer, slots=1, name="joiner")
    await asyncio.wait_for(watcher, 15)
    assert seen[0] == 0
    assert seen[-1] == 1


async def test_raw_prompt_over_the_websocket(paddler: Processes, clients_for) -> None:  # type: ignore[no-untyped-def]
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=2, name="ws")
    inference, management = clients_for(balancer)
    await wait_for_agents(management, 1)

    streams = [
        await inference.continue_from_raw_prompt(ContinueFromRawPromptParams(raw_prompt=f"p{i}", max_tokens=4))
        for i in range(3)
    ]
    results = [[m async for m in s] for s in streams]

    for messages in results:
        assert [m.is_token for m in messages] == [True] * 4 + [False]
        assert messages[-1].summary is not None
        assert messages[-1].summary.usage.content_tokens == 4


async def _in_flight(management: ClientManagement, expected: int) -> bool:
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{management._url}/api/v1/agents")).json()
    return sum(a["slots_in_flight"] for a in body["agents"]) == expected


async def _processing(management: ClientManagement, agent_id: str, expected: int) -> bool:
    agents = (await management.get_agents()).agents
    return any(a.id == agent_id and a.slots_processing == expected for a in agents)


async def _buffered(management: ClientManagement, expected: int) -> bool:
    return (await management.get_buffered_requests()).buffered_requests_current == expected
