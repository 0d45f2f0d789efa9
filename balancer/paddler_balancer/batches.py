"""Request runners: async iterators of payload batches, shared by every transport.

A runner yields ``(generated_by, [(payload, final), ...])`` until a final payload;
it raises :class:`InferenceFailure` for buffer full / timeouts / a lost agent.
Transports await the first batch before sending headers, so failures before any
output become HTTP statuses and failures after become an error line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from paddler_balancer.service import Balancer
from paddler_balancer.streams import InferenceFailure
from paddler_core.desired_state import SamplingOverrides
from paddler_core.inference import GenerateEmbeddingBatchParams
from paddler_core.prefix import request_prefix_keys

Batch = tuple[str | None, list[tuple[Any, bool]]]
EMBEDDING_DONE: dict[str, Any] = {"Embedding": "Done"}


async def run_generation(
    balancer: Balancer,
    *,
    model_group: str,
    variant: str,
    params: dict[str, Any],
    request_id: str,
    overrides: SamplingOverrides | None = None,
) -> AsyncIterator[Batch]:
    async with balancer.generation(
        model_group=model_group,
        variant=variant,
        params=params,
        overrides=overrides,
        prefix_hashes=request_prefix_keys(variant, params),
        request_id=request_id,
    ) as generation:
        while True:
            batch = await generation.next_batch()
            yield generation.agent_id, batch
            if batch[-1][1]:
                return


def part_payloads(batch: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """What one part of a split embedding batch forwards: its own Done is dropped (one
    Done ends the merged stream); embeddings and a terminal error pass once, as they are."""
    return [(payload, final) for payload, final in batch if payload != EMBEDDING_DONE]


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


async def run_embedding(
    balancer: Balancer,
    *,
    model_group: str,
    params: GenerateEmbeddingBatchParams,
    request_id: str,
) -> AsyncIterator[Batch]:
    """Split the batch across the group's agents; merge their embeddings into one
    stream ending with one ``{"Embedding": "Done"}``. Each part is buffered like a
    generation (so embeddings scale from zero too)."""
    agents = max(1, len(balancer.pool.in_group(model_group)))
    chunks = split_evenly(params.input_batch, agents)
    merged: asyncio.Queue[Batch | InferenceFailure | None] = asyncio.Queue()

    async def run_part(index: int, docs: list[Any]) -> None:
        part = params.model_copy(update={"input_batch": docs}).model_dump(mode="json")
        try:
            async with balancer.embedding(
                model_group=model_group, params=part, request_id=f"{request_id}.{index}"
            ) as generation:
                while True:
                    batch = await generation.next_batch()
                    forwarded = part_payloads(batch)
                    if forwarded:
                        merged.put_nowait((generation.agent_id, forwarded))
                    if batch[-1][1]:
                        break
        except InferenceFailure as failure:
            merged.put_nowait(failure)
            return
        merged.put_nowait(None)

    tasks = [asyncio.create_task(run_part(i, c)) for i, c in enumerate(chunks)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, InferenceFailure):
                raise item
            yield item
            if any(final for _, final in item[1]):
                return  # a part failed with a terminal error payload: stop everything
        yield None, [(EMBEDDING_DONE, True)]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
