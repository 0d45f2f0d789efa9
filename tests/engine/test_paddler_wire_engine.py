"""Paddler 4.1's wire on the real model, through real processes (balancer + llama
agent on SmolLM2): grammar initialisation failures, images sent to a model without
a projector, embedding documents over n_batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import Balancer, Processes, wait_until
from tests.openai.conftest import openai_client

pytestmark = pytest.mark.engine

N_BATCH = 64
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


async def _start(processes: Processes, balancer: Balancer, model_path: Path) -> None:
    state = {
        "model": {"LocalToAgent": str(model_path)},
        "inference_parameters": {"context_size": 1024, "n_batch": N_BATCH, "enable_embeddings": True},
    }
    async with httpx.AsyncClient() as http:
        response = await http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state)
        assert response.status_code == 204, response.text
    processes.agent(balancer, slots=1, name="llama", engine="llama")

    async def applied() -> bool:
        async with httpx.AsyncClient() as http:
            agents = (await http.get(balancer.management_url + "/api/v1/agents")).json()["agents"]
        return len(agents) == 1 and agents[0]["state_application_status"] == "Applied"

    await wait_until(applied, timeout=120, what="model loaded")


@pytest.fixture(scope="module")
def pool(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    processes = Processes(tmp_path_factory.mktemp("wire-engine"))
    try:
        balancer = processes.balancer("--inference-item-timeout", "60s")
        asyncio.run(_start(processes, balancer, model_path))
        yield balancer
    finally:
        processes.close()


async def _ndjson(balancer: Balancer, path: str, body: dict[str, Any]) -> list[Any]:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(balancer.inference_url + path, json=body)
    assert response.status_code == 200, response.text
    return [json.loads(line)["Response"]["response"] for line in response.text.splitlines() if line]


async def test_grammar_that_cannot_be_initialised_is_reported_as_grammar_initialization_failed(pool: Balancer) -> None:
    no_root = {"type": "gbnf", "grammar": 'answer ::= "yes" | "no"'}
    payloads = await _ndjson(
        pool, "/api/v1/continue_from_raw_prompt", {"raw_prompt": "Answer:", "max_tokens": 4, "grammar": no_root}
    )
    (final,) = payloads
    assert "GrammarInitializationFailed" in final["GeneratedToken"], final
    assert "root" in final["GeneratedToken"]["GrammarInitializationFailed"]
    broken = {"type": "gbnf", "grammar": "root ::= ("}
    payloads = await _ndjson(
        pool, "/api/v1/continue_from_raw_prompt", {"raw_prompt": "Answer:", "max_tokens": 4, "grammar": broken}
    )
    assert "GrammarInitializationFailed" in payloads[-1]["GeneratedToken"]


async def test_image_part_sent_to_a_model_without_projector_is_rejected(pool: Balancer) -> None:
    history = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, IMAGE]}]
    payloads = await _ndjson(
        pool,
        "/api/v1/continue_from_conversation_history",
        {"conversation_history": history, "max_tokens": 20, "add_generation_prompt": True, "enable_thinking": False},
    )
    (final,) = payloads  # refused before any token: the model invents nothing
    assert "MultimodalNotSupported" in final["GeneratedToken"], final
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="default", messages=history, max_tokens=20)  # type: ignore[arg-type]
    assert err.value.code == "multimodal_not_supported"


async def test_embedding_batch_of_only_oversized_documents_ends_with_no_embeddings_produced(pool: Balancer) -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    batch = [{"id": "a", "content": long_text}, {"id": "b", "content": long_text + " more"}]
    payloads = await _ndjson(
        pool, "/api/v1/generate_embedding_batch", {"input_batch": batch, "normalization_method": "L2"}
    )
    oversized = [p["Embedding"]["DocumentExceedsBatchSize"]["source_document_id"] for p in payloads[:-2]]
    assert sorted(oversized) == ["a", "b"]
    assert payloads[-2:] == [{"Embedding": "NoEmbeddingsProduced"}, {"Embedding": "Done"}]


async def test_oversized_embedding_document_is_reported_on_its_own_while_the_rest_is_embedded(pool: Balancer) -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    batch = [
        {"id": "short", "content": "A short document."},
        {"id": "long", "content": long_text},
        {"id": "other", "content": "Another short one."},
    ]
    payloads = await _ndjson(
        pool, "/api/v1/generate_embedding_batch", {"input_batch": batch, "normalization_method": "L2"}
    )
    oversized = [p["Embedding"]["DocumentExceedsBatchSize"] for p in payloads if "DocumentExceedsBatchSize" in str(p)]
    assert len(oversized) == 1
    assert oversized[0]["source_document_id"] == "long"
    assert oversized[0]["n_batch"] == N_BATCH
    assert oversized[0]["document_tokens"] > N_BATCH
    embedded = {
        p["Embedding"]["Embedding"]["source_document_id"]
        for p in payloads
        if isinstance(p["Embedding"], dict) and "Embedding" in p["Embedding"]
    }
    assert embedded == {"short", "other"}
    assert payloads[-1] == {"Embedding": "Done"}
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as err:
            await client.embeddings.create(model="default", input=["fine", long_text])
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "input.1"
