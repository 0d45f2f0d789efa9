"""Hostile input at the balancer, through real processes (balancer + simulated agents).

Each test is one input from issue 10 that used to crash an agent, give a 500, close a
socket or hold a slot; now it gets a clear 4xx (or an error for that message only) and
everything else in flight carries on. After each test the shared stack is checked:
both agents still connected, no slot held, nothing buffered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import pytest

from tests.harness import Balancer, Processes, wait_until

SURROGATE = "\\ud800"  # a lone UTF-16 surrogate, as JSON text (valid JSON, not Unicode)
DEEP = "[" * 1000 + "]" * 1000
BIG_INT = "1" * 5000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    processes = Processes(tmp_path_factory.mktemp("hostile-input"))
    try:
        balancer = processes.balancer("--inference-item-timeout", "10s")
        for name in ("a1", "a2"):
            processes.agent(balancer, slots=2, name=name, extra=("--simulated-max-tokens", "8"))
        yield balancer
    finally:
        processes.close()


@pytest.fixture
async def balancer(stack: Balancer) -> AsyncIterator[Balancer]:
    """The shared stack, checked healthy before and after the test."""
    await wait_until(lambda: _healthy(stack), timeout=20, what="both agents connected, idle")
    yield stack
    await wait_until(lambda: _healthy(stack), timeout=20, what="both agents still connected, no slot held")


async def _healthy(balancer: Balancer) -> bool:
    async with httpx.AsyncClient() as http:
        agents = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()["agents"]
        buffered = (await http.get(f"{balancer.management_url}/api/v1/buffered_requests")).json()
    return (
        sorted(a["name"] for a in agents) == ["a1", "a2"]
        and all(a["slots_total"] == 2 and a["slots_in_flight"] == 0 for a in agents)
        and buffered["buffered_requests_current"] == 0
    )


async def post_raw(url: str, body: bytes | str, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type is not None else {}
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(url, content=body, headers=headers)


def raw_prompt_body(prompt_json: str, max_tokens: int = 4) -> str:
    return '{"raw_prompt": "' + prompt_json + '", "max_tokens": ' + str(max_tokens) + "}"


async def generate_ok(balancer: Balancer) -> list[dict[str, Any]]:
    """A plain request that must succeed (the agents still serve)."""
    response = await post_raw(f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", raw_prompt_body("hello"))
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert "Done" in lines[-1]["Response"]["response"]["GeneratedToken"]
    return lines


def error_message(response: httpx.Response) -> str:
    message: str = response.json()["error"]["message"]
    return message


# ---- 1. lone surrogates --------------------------------------------------------------------


async def test_lone_surrogate_in_a_raw_prompt_is_a_400_and_the_agents_keep_serving(balancer: Balancer) -> None:
    response = await post_raw(
        f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", raw_prompt_body("hi " + SURROGATE)
    )

    assert response.status_code == 400
    assert "lone UTF-16 surrogate (\\ud800)" in error_message(response)
    await generate_ok(balancer)


async def test_lone_surrogate_in_conversation_content_is_a_400(balancer: Balancer) -> None:
    body = '{"conversation_history": [{"role": "user", "content": "' + SURROGATE + '"}], "max_tokens": 4}'

    response = await post_raw(f"{balancer.inference_url}/api/v1/continue_from_conversation_history", body)

    assert response.status_code == 400
    assert "surrogate" in error_message(response)


async def test_lone_surrogate_in_an_openai_chat_message_is_a_400(balancer: Balancer) -> None:
    body = '{"messages": [{"role": "user", "content": "' + SURROGATE + '"}], "max_tokens": 4}'

    response = await post_raw(f"{balancer.inference_url}/v1/chat/completions", body)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert "surrogate" in error_message(response)


async def test_lone_surrogate_on_the_inference_socket_is_answered_with_an_error(balancer: Balancer) -> None:
    message = (
        '{"Request": {"id": "s-1", "request": {"ContinueFromRawPrompt": '
        '{"raw_prompt": "' + SURROGATE + '", "max_tokens": 4}}}}'
    )
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{balancer.inference_url}/api/v1/inference_socket") as ws,
    ):
        await ws.send_str(message)
        reply = await ws.receive_json(timeout=10)

    assert reply["Error"]["request_id"] == "s-1"
    assert reply["Error"]["error"]["code"] == 400
    assert "surrogate" in reply["Error"]["error"]["description"]


# ---- 2. a prompt past the limits -------------------------------------------------------------


async def test_prompt_over_the_body_limit_is_413_while_a_bystander_finishes(balancer: Balancer) -> None:
    async def bystander() -> list[dict[str, Any]]:
        return await generate_ok(balancer)

    running = asyncio.create_task(bystander())
    huge = raw_prompt_body("é" * 12_000_000)  # 24 MB of UTF-8; ~72 MB once \u-escaped

    response = await post_raw(f"{balancer.inference_url}/api/v1/continue_from_raw_prompt", huge.encode())

    assert response.status_code == 413
    assert "larger than the limit" in error_message(response)
    lines = await running
    assert lines[-1]["Response"]["generated_by"]


# ---- 3. desired-state bounds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context_size", 10**30),
        ("n_batch", 10**12),
        ("embedding_batch_size", 10**9),
        ("top_k", 10**15),
        ("penalty_last_n", 10**12),
    ],
)
async def test_desired_state_out_of_bounds_is_a_400_and_not_stored(balancer: Balancer, field: str, value: int) -> None:
    url = f"{balancer.management_url}/api/v1/balancer_desired_state"
    async with httpx.AsyncClient() as http:
        before = (await http.get(url)).json()
        state = {**before, "inference_parameters": {**before["inference_parameters"], field: value}}
        response = await http.put(url, json=state)
        after = (await http.get(url)).json()

    assert response.status_code == 400
    assert f"inference_parameters.{field}: Input should be less than or equal to" in error_message(response)
    assert after == before


# ---- 5. numbers, nesting and charsets no parser should take ----------------------------------

ENDPOINTS = {
    "native": ("inference", "/api/v1/continue_from_raw_prompt"),
    "openai": ("inference", "/v1/chat/completions"),
    "management": ("management", "/api/v1/balancer_desired_state"),
}
BODIES = {
    "big-int": ('{"max_tokens": ' + BIG_INT + "}", "application/json", "5000 digits is too large"),
    "deep-nesting": ('{"x": ' + DEEP + "}", "application/json", "deeper than 64 levels"),
    "bogus-charset": ('{"max_tokens": 1}', "application/json; charset=bogus", "charset 'bogus' is not supported"),
}


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
@pytest.mark.parametrize("kind", sorted(BODIES))
async def test_unparseable_json_is_a_400_with_a_message(balancer: Balancer, endpoint: str, kind: str) -> None:
    service, path = ENDPOINTS[endpoint]
    body, content_type, expected = BODIES[kind]
    base = balancer.inference_url if service == "inference" else balancer.management_url
    async with httpx.AsyncClient(timeout=30) as http:
        method = http.put if endpoint == "management" else http.post
        response = await method(f"{base}{path}", content=body, headers={"Content-Type": content_type})

    assert response.status_code == 400
    assert expected in error_message(response)


async def test_inference_socket_answers_unparseable_messages_and_keeps_its_other_requests(balancer: Balancer) -> None:
    request = {"Request": {"id": "keep", "request": {"ContinueFromRawPrompt": {"raw_prompt": "hi", "max_tokens": 8}}}}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{balancer.inference_url}/api/v1/inference_socket") as ws,
    ):
        await ws.send_str(json.dumps(request))
        await ws.send_str(
            '{"Request": {"id": "big", "request": {"ContinueFromRawPrompt": {"max_tokens": ' + BIG_INT + "}}}}"
        )
        await ws.send_str('{"Request": {"id": "deep", "request": ' + DEEP + "}}")
        replies: list[dict[str, Any]] = []
        async with asyncio.timeout(15):
            while not any("Done" in str(r) for r in replies if "Response" in r):
                replies.append(await ws.receive_json())

    errors = {r["Error"]["request_id"]: r["Error"]["error"] for r in replies if "Error" in r}
    assert errors["big"]["code"] == 400
    assert "digits is too large" in errors["big"]["description"]
    assert errors["deep"]["code"] == 400
    assert "deeper than 64 levels" in errors["deep"]["description"]
    tokens = [r for r in replies if "Response" in r and r["Response"]["request_id"] == "keep"]
    assert "Done" in tokens[-1]["Response"]["response"]["GeneratedToken"]


# ---- 6. numbers that overflow a float ----------------------------------------------------------


async def test_rms_norm_epsilon_that_overflows_is_a_400_at_once(balancer: Balancer) -> None:
    body = '{"input_batch": [{"id": "d", "content": "text"}], "normalization_method": {"RmsNorm": {"epsilon": 1e999}}}'

    response = await post_raw(f"{balancer.inference_url}/api/v1/generate_embedding_batch", body)

    assert response.status_code == 400
    assert "1e999 is out of range" in error_message(response)


async def test_penalty_repeat_that_overflows_is_a_400_and_never_served_back(balancer: Balancer) -> None:
    url = f"{balancer.management_url}/api/v1/balancer_desired_state"
    async with httpx.AsyncClient() as http:
        before = (await http.get(url)).text
        body = before.replace('"penalty_repeat": 1.1', '"penalty_repeat": 1e999').replace(
            '"penalty_repeat":1.1', '"penalty_repeat":1e999'
        )
        assert "1e999" in body
        response = await http.put(url, content=body, headers={"Content-Type": "application/json"})
        after = (await http.get(url)).text

    assert response.status_code == 400
    assert "out of range" in error_message(response)
    assert "Infinity" not in after


# ---- 7. defaults and content types ---------------------------------------------------------------


async def test_embedding_without_normalization_method_uses_the_default(balancer: Balancer) -> None:
    body = '{"input_batch": [{"id": "d1", "content": "one"}, {"id": "d2", "content": "two"}]}'

    response = await post_raw(f"{balancer.inference_url}/api/v1/generate_embedding_batch", body)

    assert response.status_code == 200, response.text
    lines = [json.loads(line)["Response"]["response"] for line in response.text.splitlines()]
    embeddings = [p["Embedding"]["Embedding"] for p in lines if isinstance(p["Embedding"], dict)]
    assert sorted(e["source_document_id"] for e in embeddings) == ["d1", "d2"]
    assert all(e["normalization_method"] == "None" for e in embeddings)


@pytest.mark.parametrize("path", ["/api/v1/continue_from_raw_prompt", "/v1/completions"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_a_body_that_is_not_declared_json_is_415(balancer: Balancer, path: str, content_type: str) -> None:
    body = '{"raw_prompt": "hi", "prompt": "hi", "max_tokens": 2}'

    response = await post_raw(f"{balancer.inference_url}{path}", body, content_type)

    assert response.status_code == 415
    assert f"Content-Type must be application/json, not {content_type}" in error_message(response)
