"""Images through real processes: a balancer and a ``paddler agent --engine llama`` on
SmolLM2 with a multimodal projector (tests/engine/projector.py: a real libmtmd
projector file of SmolVLM's kind, seeded random weights), driven by the real
``openai`` SDK and ``paddler-client``.

No real vision-language model can be had here, so the answers are not checked for
meaning: the tests check that the image reaches the model (its tokens are counted,
different images give different greedy answers, the same image the same answer on
every API) and every way an image can be refused, with the slot released after each.
"""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paddler_client import ClientInference
from paddler_client.continue_from_conversation_history_params import ContinueFromConversationHistoryParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.conversation_message_content_part import ImageUrlContentPart, TextContentPart
from paddler_client.image_url import ImageUrl
from paddler_client.inference_message import InferenceMessageKind
from PIL import Image

from tests.engine.projector import IMAGE_TOKENS, write_test_projector
from tests.harness import Balancer, Processes, wait_until
from tests.openai.conftest import openai_client

pytestmark = pytest.mark.engine

QUESTION = "What colour is this picture?"
MAX_TOKENS = 12


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED = png((220, 20, 20))
BLUE = png((20, 20, 220))


def png_declaring(width: int, height: int) -> str:
    """A PNG whose header declares ``width`` x ``height`` pixels and whose data is a few
    bytes: a decompression bomb's shape, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(data).decode()


def messages(image: str | None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": QUESTION}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


async def _agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(balancer.management_url + "/api/v1/agents")
        agents: list[dict[str, Any]] = response.json()["agents"]
        return agents


async def _start(processes: Processes, balancer: Balancer, model_path: Path, projector: Path) -> None:
    state = {
        "model": {"LocalToAgent": str(model_path)},
        "multimodal_projection": {"LocalToAgent": str(projector)},
        "inference_parameters": {"context_size": 2048, "temperature": 0.0, "image_resize_to_fit": 512},
    }
    async with httpx.AsyncClient() as http:
        response = await http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state)
        assert response.status_code == 204, response.text
    processes.agent(balancer, slots=1, name="vision", engine="llama")

    async def applied() -> bool:
        agents = await _agents(balancer)
        return len(agents) == 1 and agents[0]["state_application_status"] == "Applied"

    await wait_until(applied, timeout=120, what="model and projector loaded")


@pytest.fixture(scope="module")
def pool(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One agent with ONE slot: a request that leaked its slot would leave every later
    test waiting for one (504)."""
    tmp = tmp_path_factory.mktemp("images")
    projector = write_test_projector(tmp / "mmproj-test.gguf")
    processes = Processes(tmp)
    try:
        balancer = processes.balancer("--inference-item-timeout", "60s", "--buffered-request-timeout", "20s")
        asyncio.run(_start(processes, balancer, model_path, projector))
        yield balancer
    finally:
        processes.close()


async def _chat(balancer: Balancer, image: str | None) -> tuple[str, int]:
    async with openai_client(balancer) as client:
        completion = await client.chat.completions.create(
            model="default",
            messages=messages(image),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    assert completion.usage is not None
    return completion.choices[0].message.content or "", completion.usage.prompt_tokens


async def _slots_free(balancer: Balancer) -> None:
    async def free() -> bool:
        agents = await _agents(balancer)
        return len(agents) == 1 and agents[0]["slots_processing"] == 0 and agents[0]["slots_total"] == 1

    await wait_until(free, timeout=10, what="the agent's slot free again")


async def test_image_reaches_the_model_and_different_images_give_different_answers(pool: Balancer) -> None:
    red, red_prompt = await _chat(pool, RED)
    blue, blue_prompt = await _chat(pool, BLUE)
    _, text_prompt = await _chat(pool, None)
    assert red
    assert blue
    assert red != blue, "the image did not change the greedy answer: it never reached the model"
    assert red_prompt == blue_prompt >= text_prompt + IMAGE_TOKENS
    assert red == (await _chat(pool, RED))[0], "same image, same greedy answer"
    await _slots_free(pool)


async def test_responses_api_input_image_gets_the_same_answer_as_chat_completions(pool: Balancer) -> None:
    chat, _ = await _chat(pool, RED)
    async with openai_client(pool) as client:
        response = await client.responses.create(
            model="default",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": QUESTION},
                        {"type": "input_image", "image_url": RED, "detail": "auto"},
                    ],
                }
            ],
            max_output_tokens=MAX_TOKENS,
            temperature=0,
        )
    assert response.output_text == chat
    assert response.usage is not None
    assert response.usage.input_tokens >= IMAGE_TOKENS
    await _slots_free(pool)


async def test_native_api_counts_image_tokens_and_answers_like_openai(pool: Balancer) -> None:
    chat, _ = await _chat(pool, BLUE)
    params = ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[
            ConversationMessage(
                role="user",
                content=[TextContentPart(text=QUESTION), ImageUrlContentPart(image_url=ImageUrl(url=BLUE))],
            )
        ],
        enable_thinking=False,
        max_tokens=MAX_TOKENS,
    )
    inference = ClientInference(pool.inference_url)
    text = ""
    try:
        async for message in await inference.continue_from_conversation_history(params):
            if message.kind == InferenceMessageKind.CONTENT_TOKEN:
                text += message.token or ""
            elif message.is_done:
                assert message.summary is not None
                assert message.summary.usage.input_image_tokens == IMAGE_TOKENS
                break
            else:
                raise AssertionError(f"request failed: {message}")
    finally:
        await inference.close()
    assert text == chat


async def test_bytes_that_are_not_an_image_are_refused_with_400_on_every_api(pool: Balancer) -> None:
    not_an_image = "data:image/png;base64," + base64.b64encode(b"just some text, not a picture").decode()
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as chat_error:
            await client.chat.completions.create(
                model="default",
                messages=messages(not_an_image),  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
            )
        with pytest.raises(openai.BadRequestError) as responses_error:
            await client.responses.create(
                model="default",
                input=[
                    {"role": "user", "content": [{"type": "input_image", "image_url": not_an_image, "detail": "auto"}]}
                ],
            )
    for error in (chat_error.value, responses_error.value):
        assert error.code == "image_decoding_failed"
        assert "cannot be decoded" in str(error)
    params = ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[
            ConversationMessage(role="user", content=[ImageUrlContentPart(image_url=ImageUrl(url=not_an_image))])
        ],
        enable_thinking=False,
        max_tokens=MAX_TOKENS,
    )
    inference = ClientInference(pool.inference_url)
    try:
        found = [m async for m in await inference.continue_from_conversation_history(params)]
    finally:
        await inference.close()
    assert [m.kind for m in found] == [InferenceMessageKind.IMAGE_DECODING_FAILED]
    await _slots_free(pool)


async def test_image_declaring_a_huge_size_is_refused_before_decoding_and_the_agent_keeps_serving(
    pool: Balancer,
) -> None:
    bomb = png_declaring(100_000, 100_000)
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(
                model="default",
                messages=messages(bomb),  # type: ignore[arg-type]
                max_tokens=MAX_TOKENS,
            )
    assert error.value.code == "image_decoding_failed"
    assert "100000x100000" in str(error.value)
    await _slots_free(pool)
    red, _ = await _chat(pool, RED)
    assert red


async def test_large_image_is_shrunk_to_image_resize_to_fit_and_answered(pool: Balancer) -> None:
    """4000x3000 pixels (12 MP, under the pixel budget) with image_resize_to_fit 512:
    decoded, shrunk, answered like the same colour at a small size."""
    small, _ = await _chat(pool, png((220, 20, 20), size=(40, 30)))
    large, _ = await _chat(pool, png((220, 20, 20), size=(4000, 3000)))
    assert large == small
    await _slots_free(pool)
