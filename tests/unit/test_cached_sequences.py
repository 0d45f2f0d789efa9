"""Which idle sequence of the unified KV cache a new request runs in (pure: token lists
only), and the sequence ids a load config asks llama.cpp for."""

from __future__ import annotations

import pytest

from paddler_agent.llama.jobs import Slot
from paddler_agent.llama.kv_policy import pick_slot
from paddler_agent.llama.native import LoadConfig
from paddler_balancer.metrics import GroupGauges

SYSTEM = list(range(100, 140))
CONV_A = [*SYSTEM, *range(1, 41)]  # a tail longer than CONTINUE_MAX_DROP
CONV_B = [*SYSTEM, *range(200, 240)]


def slots(*caches: tuple[list[int], float]) -> list[Slot]:
    return [Slot(i, tokens=list(tokens), last_used=used) for i, (tokens, used) in enumerate(caches)]


@pytest.mark.parametrize(
    ("caches", "prompt", "chosen", "shared"),
    [
        # the next turn of conversation A continues A's sequence in place
        ((([], 0.0), (CONV_A, 1.0), (CONV_B, 2.0)), [*CONV_A, 5, 6], 1, len(CONV_A)),
        # a new conversation on the same system prompt leaves A and B cached: the empty one
        ((([], 0.0), (CONV_A, 1.0), (CONV_B, 2.0)), [*SYSTEM, 42], 0, 0),
        # no empty sequence: the least recently used one (B copies the system prompt back)
        (((CONV_B, 5.0), (CONV_A, 1.0)), [*SYSTEM, 42], 1, len(SYSTEM)),
        # a prompt that shares nothing takes the empty sequence too
        ((([], 0.0), (CONV_A, 1.0)), [9, 9, 9], 0, 0),
    ],
)
def test_pick_slot(caches: tuple[tuple[list[int], float], ...], prompt: list[int], chosen: int, shared: int) -> None:
    slot, held = pick_slot(prompt, slots(*caches))
    assert (slot.index, held) == (chosen, shared)


@pytest.mark.parametrize(("slots_", "sequences"), [(1, 4), (2, 8), (16, 64), (32, 64), (100, 100)])
def test_sequences_per_slot_are_capped_by_llama_cpp(slots_: int, sequences: int) -> None:
    config = LoadConfig("m.gguf", slots_, 8192, 2048, 2, 0, "q8_0", "q8_0", False, 32, "mean")  # type: ignore[arg-type]
    assert config.sequences == sequences


@pytest.mark.parametrize(("reused", "evaluated", "ratio"), [(0, 0, 0.0), (3, 1, 0.75), (0, 5, 0.0)])
def test_prompt_reuse_ratio(reused: int, evaluated: int, ratio: float) -> None:
    row = GroupGauges("default", 1, 2, 0, 0, prompt_tokens_reused=reused, prompt_tokens_evaluated=evaluated)
    assert row.prompt_reuse_ratio == ratio
