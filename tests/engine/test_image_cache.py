"""Images in the shared KV cache, on the engine itself (SmolLM2 + the test projector of
tests/engine/projector.py): a request with an image that is preempted when the cache
fills re-encodes its image when it resumes and answers as it would alone."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import GREEDY, FakeHost, raw, state_for
from PIL import Image

from paddler_agent.engine import StatusBoard
from paddler_core.desired_state import ModelSource
from paddler_core.protocol import GenerateMessage, StateApplicationStatus, parse_generate_message
from tests.engine.projector import IMAGE_TOKENS, write_test_projector

pytestmark = pytest.mark.engine

ENGINE_LOG = "paddler_agent.llama.decode_worker"
Factory = Callable[..., Awaitable[tuple[Any, FakeHost]]]


def picture() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (30, 160, 60)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def about_picture(request_id: str, max_tokens: int) -> GenerateMessage:
    content = [
        {"type": "text", "text": "Write a long story about this picture."},
        {"type": "image_url", "image_url": {"url": picture()}},
    ]
    return parse_generate_message(
        dict(
            request_id=request_id,
            variant="ContinueFromConversationHistory",
            params={
                "conversation_history": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "add_generation_prompt": True,
                "enable_thinking": False,
            },
            overrides=GREEDY,
        )
    )


@pytest.fixture
async def engines(model_path: Path, tmp_path: Path) -> AsyncIterator[Factory]:
    from paddler_agent.llama.engine import LlamaEngine

    projector = write_test_projector(tmp_path / "mmproj-test.gguf")
    made: list[Any] = []

    async def factory(slots: int, context_size: int) -> tuple[Any, FakeHost]:
        host, board = FakeHost(), StatusBoard()
        host.board = board
        engine = LlamaEngine(host, board, slots, model_cache_dir=tmp_path / "models")
        made.append(engine)
        state = state_for(model_path, context_size=context_size).model_copy(
            update={"multimodal_projection": ModelSource.local(str(projector))}
        )
        await engine.apply_desired_state(state)
        assert board.state_application_status == StateApplicationStatus.APPLIED, board.issues
        return engine, host

    yield factory
    for engine in made:
        await engine.close()


async def test_a_preempted_request_with_an_image_re_encodes_it_and_answers_as_it_would_alone(
    engines: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ENGINE_LOG)
    story = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
    solo, solo_host = await engines(slots=1, context_size=256)
    solo.generate(about_picture("alone", 130))
    expected = await solo_host.wait("alone")
    await solo.close()

    engine, host = await engines(slots=2, context_size=256)
    engine.generate(raw("older", story, 130, **GREEDY))
    engine.generate(about_picture("younger", 130))
    older, younger = await host.wait("older"), await host.wait("younger")

    messages = [r.getMessage() for r in caplog.records if r.name == ENGINE_LOG]
    assert any(m.startswith("request preempted") and "request_id=younger" in m for m in messages), messages
    encoded = [m for m in messages if m.startswith("image evaluated") and "request_id=younger" in m]
    assert len(encoded) >= 2, "the image was not encoded again when the request resumed"
    assert older.usage["content_tokens"] == 130
    assert younger.usage["input_image_tokens"] == IMAGE_TOKENS == expected.usage["input_image_tokens"]
    assert younger.text == expected.text
    assert host.board is not None
    assert host.board.slots_processing == 0
