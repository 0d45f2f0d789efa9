"""Paddler's context semantics on the real model: ``context_size`` is the agent's whole
KV cache, shared by its slots. A conversation may use more than its share; a full
cache makes a request wait or be preempted and resumed, never answer garbage."""

from __future__ import annotations

import asyncio
import logging

import pytest
from conftest import GREEDY, EngineFactory, EngineUnderTest, Request, raw, wait_for

pytestmark = pytest.mark.engine

FILLER = (
    "The balancer keeps a registry of agents, their free slots and the model each one "
    "serves, and it routes every request to an agent that can take it at once. "
)
ENGINE_LOG = "paddler_agent.llama.decode_worker"


def story(topic: str) -> str:
    """A chat prompt (SmolLM2's format) that makes the model write at length."""
    return f"<|im_start|>user\nWrite a long story about {topic}.<|im_end|>\n<|im_start|>assistant\n"


def long_story(topic: str, notes: int) -> str:
    """``story`` with ``notes`` sentences of notes (about 30 tokens each) after it; the
    topic comes first, so two of these share only a few tokens of cached prefix."""
    text = f"Write a long story about {topic}. Notes: {FILLER * notes}"
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


async def alone(make_engine: EngineFactory, prompts: dict[str, tuple[str, int]], context_size: int) -> dict[str, str]:
    """Greedy text of each prompt run by itself on a fresh engine (closed afterwards,
    so its native thread does not compete with the engine under test)."""
    e = await make_engine(slots=1, context_size=context_size)
    texts: dict[str, str] = {}
    for rid, (prompt, max_tokens) in prompts.items():
        e.engine.generate(raw(rid, prompt, max_tokens, **GREEDY))
        texts[rid] = (await e.host.wait(rid)).text
    await e.engine.close()
    return texts


async def track_peak_use(e: EngineUnderTest, until: list[Request]) -> int:
    """Highest ``kv_cache_tokens_used`` on the board while ``until`` run."""
    peak = 0
    async with asyncio.timeout(120):
        while not all(r.done.is_set() for r in until):
            peak = max(peak, e.board.kv_cache_tokens_used)
            await asyncio.sleep(0.005)
    return peak


def first_event(e: EngineUnderTest, request_id: str) -> int:
    return next(i for i, (rid, _) in enumerate(e.host.events) if rid == request_id)


def final_event(e: EngineUnderTest, request_id: str) -> int:
    return next(i for i, (rid, final) in enumerate(e.host.events) if rid == request_id and final)


async def test_two_concurrent_long_conversations_share_the_cache_beyond_a_per_slot_share(
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=4, context_size=1024)
    share = 1024 // 4
    e.engine.generate(raw("lighthouse", long_story("a lighthouse keeper", 10), 120, **GREEDY))
    e.engine.generate(raw("desert", long_story("two robots crossing a desert", 10), 120, **GREEDY))
    requests = [e.host.request("lighthouse"), e.host.request("desert")]

    peak = await track_peak_use(e, requests)

    assert e.board.kv_cache_tokens_total == 1024
    for request in requests:
        usage = request.usage
        assert usage["prompt_tokens"] + usage["content_tokens"] > share, usage
    assert peak > 2 * share, f"peak KV use {peak} of 1024"


async def test_a_request_waits_while_the_cache_is_full_and_answers_as_it_would_alone(
    make_engine: EngineFactory,
) -> None:
    prompts = {
        "first": (long_story("a lighthouse keeper", 9), 100),
        "second": (long_story("a detective in a rainy city", 8), 24),
    }
    expected = await alone(make_engine, prompts, 512)
    e = await make_engine(slots=2, context_size=512)

    e.engine.generate(raw("first", *prompts["first"], **GREEDY))
    first = e.host.request("first")
    await wait_for(lambda: len(first.payloads) >= 2)
    e.engine.generate(raw("second", *prompts["second"], **GREEDY))
    second = await e.host.wait("second")
    await e.host.wait("first")

    # Both prompts (about 290 and 260 tokens) cannot be in the 512-cell cache at once.
    assert first.usage["prompt_tokens"] + second.usage["prompt_tokens"] > 512
    assert first_event(e, "second") > final_event(e, "first"), "the second request did not wait"
    assert (first.text, second.text) == (expected["first"], expected["second"])


async def test_a_preempted_request_resumes_and_answers_as_it_would_alone(
    make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ENGINE_LOG)
    prompts = {
        "older": (story("a lighthouse keeper who finds a map"), 270),
        "younger": (story("two robots crossing a desert"), 270),
    }
    expected = await alone(make_engine, prompts, 512)
    e = await make_engine(slots=2, context_size=512)

    e.engine.generate(raw("older", *prompts["older"], **GREEDY))
    e.engine.generate(raw("younger", *prompts["younger"], **GREEDY))
    older, younger = await e.host.wait("older"), await e.host.wait("younger")

    messages = [r.getMessage() for r in caplog.records if r.name == ENGINE_LOG]
    assert any(m.startswith("request preempted") and "request_id=younger" in m for m in messages), messages
    assert any(m.startswith("request resumed") and "request_id=younger" in m for m in messages), messages
    # About 20 + 20 prompt tokens and 2 x 270 generated do not fit in 512 cells together.
    assert older.usage["content_tokens"] + younger.usage["content_tokens"] == 540
    assert (older.text, younger.text) == (expected["older"], expected["younger"])
    assert e.board.slots_processing == 0


async def test_a_prompt_longer_than_the_whole_cache_is_refused_without_waiting_for_a_slot(
    make_engine: EngineFactory,
) -> None:
    e = await make_engine(slots=1, context_size=256)
    e.engine.generate(raw("busy", story("a child who learns to sail"), 200, **GREEDY))
    busy = e.host.request("busy")
    await wait_for(lambda: len(busy.payloads) >= 1)

    e.engine.generate(raw("huge", long_story("bread", 12), 8, **GREEDY))
    huge = await e.host.wait("huge")

    error = huge.final["GeneratedToken"]["SamplerError"]
    assert error.startswith("context full: the prompt")
    assert "KV cache" in error
    assert "256" in error
    assert not busy.done.is_set(), "the refusal waited for the busy slot"
    e.engine.stop("busy")
