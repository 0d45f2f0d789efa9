"""Which prompt tokens one decode step evaluates (paddler_agent.llama.prefill.prompt_chunk):
at most the step's budget, and for a prompt with images the text before its next image
(image placeholders are negative token ids)."""

from __future__ import annotations

import pytest

from paddler_agent.llama.prefill import MediaLayout, prompt_chunk

TEXT = MediaLayout.TEXT_ONLY
IMAGES = MediaLayout.WITH_IMAGES


@pytest.mark.parametrize(
    ("pending", "budget", "layout", "chunk"),
    [
        ([1, 2, 3], 10, TEXT, [1, 2, 3]),
        ([1, 2, 3], 2, TEXT, [1, 2]),
        ([1, 2, -1, -1, 3], 10, IMAGES, [1, 2]),
        ([1, 2, -1, -1, 3], 1, IMAGES, [1]),
        ([-1, -1, 3], 10, IMAGES, []),
        ([1, 2, 3], 10, IMAGES, [1, 2, 3]),
        ([1, 2, 3], 0, TEXT, []),
    ],
)
def test_prompt_chunk(pending: list[int], budget: int, layout: MediaLayout, chunk: list[int]) -> None:
    assert prompt_chunk(pending, budget, layout) == chunk


def test_the_chunk_is_a_copy_the_caller_may_keep() -> None:
    pending = [1, 2, 3]
    chunk = prompt_chunk(pending, 2, TEXT)
    del pending[:2]
    assert chunk == [1, 2]
