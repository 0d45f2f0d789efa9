"""Pure helpers of the request runners."""

from __future__ import annotations

from typing import Any

import pytest

from paddler_balancer.relay import EMBEDDING_DONE, part_payloads, split_evenly

EMBEDDING = {"Embedding": {"Embedding": {"embedding": [1.0], "source_document_id": "a"}}}
ERROR = {"Embedding": {"Error": "context full"}}


@pytest.mark.parametrize(
    ("batch", "forwarded"),
    [
        ([(EMBEDDING, False), (EMBEDDING_DONE, True)], [(EMBEDDING, False)]),
        ([(EMBEDDING, False), (ERROR, True)], [(EMBEDDING, False), (ERROR, True)]),
        ([(ERROR, True)], [(ERROR, True)]),
        ([(EMBEDDING_DONE, True)], []),
    ],
)
def test_part_payloads_forward_each_payload_once_and_drop_the_parts_done(
    batch: list[tuple[Any, bool]], forwarded: list[tuple[Any, bool]]
) -> None:
    assert part_payloads(batch) == forwarded


@pytest.mark.parametrize(
    ("items", "parts", "sizes"),
    [(list(range(6)), 2, [3, 3]), (list(range(7)), 3, [3, 2, 2]), (list(range(2)), 5, [1, 1]), ([1], 1, [1])],
)
def test_split_evenly(items: list[int], parts: int, sizes: list[int]) -> None:
    chunks = split_evenly(items, parts)
    assert [len(c) for c in chunks] == sizes
    assert [x for c in chunks for x in c] == items
