"""The decode thread's KV-cache decisions (paddler_agent.llama.kv_policy), on token lists
alone: no model, no llama.cpp. Which slot a request takes is in test_cached_sequences.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from paddler_agent.llama.jobs import Slot
from paddler_agent.llama.kv_policy import (
    COPY_MIN_TOKENS,
    cells_to_start,
    common_prefix_length,
    eviction_order,
    prefix_plan,
)

SYSTEM = list(range(100, 140))


@pytest.mark.parametrize(
    ("a", "b", "length"),
    [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2), ([1, 2, 3], [1, 9, 3], 1), ([5], [6], 0)],
)
def test_common_prefix_length(a: list[int], b: list[int], length: int) -> None:
    assert common_prefix_length(a, b) == length


@pytest.mark.parametrize(
    ("caches", "target", "shared", "prompt", "donor", "reuse"),
    [
        # the target's own cache is the longest: keep it, no copy
        (([*SYSTEM, 1], SYSTEM[:10]), 0, 41, [*SYSTEM, 1, 2], None, 41),
        # another slot holds a longer prefix (a system prompt): copy it
        (([], SYSTEM), 0, 0, [*SYSTEM, 7], 1, len(SYSTEM)),
        # a donor only COPY_MIN_TOKENS - 1 longer is not worth it (the target keeps its own)
        (([*SYSTEM[:5]], SYSTEM[: 5 + COPY_MIN_TOKENS - 1]), 0, 5, [*SYSTEM, 7], None, 5),
        # the whole prompt cached: one token is still evaluated (its logits start the answer)
        (([], SYSTEM), 0, 0, SYSTEM, 1, len(SYSTEM) - 1),
        (([*SYSTEM],), 0, len(SYSTEM), SYSTEM, None, len(SYSTEM) - 1),
    ],
)
def test_prefix_plan(
    caches: tuple[list[int], ...], target: int, shared: int, prompt: list[int], donor: int | None, reuse: int
) -> None:
    slots = [Slot(i, tokens=list(tokens)) for i, tokens in enumerate(caches)]
    chosen, reused = prefix_plan(prompt, slots, slots[target], shared)
    assert (chosen.index if chosen is not None else None, reused) == (donor, reuse)


def test_eviction_order_is_idle_caches_least_recently_used_first() -> None:
    busy: Any = SimpleNamespace()
    slots = [
        Slot(0, tokens=[1], last_used=5.0),
        Slot(1, tokens=[2], last_used=1.0),
        Slot(2, tokens=[], last_used=0.0),  # nothing cached: nothing to evict
        Slot(3, tokens=[3], last_used=0.5, seq=busy),  # running: not idle
        Slot(4, tokens=[4], last_used=3.0),
    ]
    assert [s.index for s in eviction_order(slots, keep=slots[4])] == [1, 0]


@pytest.mark.parametrize(
    ("prompt", "reuse", "capacity", "running", "cells"),
    [
        (10, 0, 100, [], 11),  # the prompt and a cell for its first token
        (10, 4, 100, [], 7),  # reused cells are already there
        (100, 0, 100, [], 100),  # a prompt that fills the cache: no headroom to ask for
        (10, 0, 100, [3, 0], 11 + 4 + 1),  # running sequences: their pending tokens and one cell each
    ],
)
def test_cells_to_start(prompt: int, reuse: int, capacity: int, running: list[int], cells: int) -> None:
    sequences: Any = [SimpleNamespace(pending=[0] * n) for n in running]
    assert cells_to_start(prompt, reuse, capacity, sequences) == cells
