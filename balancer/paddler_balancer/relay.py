"""One request's payloads, from the agent to the client, on every transport.

Runners (:func:`run_generation`, :func:`run_embedding`) are async generators of payload
batches, shared by every transport: each yields ``(generated_by, [(payload, final), ...])``
until a final payload and raises :class:`InferenceFailure` for buffer full, timeouts or
a lost agent.

:func:`forward` is the one streaming state machine every transport goes through. It
awaits the first batch before anything is sent, so a failure before any output is
raised (the transport answers it with an HTTP status, or a WebSocket message); then it
opens the sink (headers), writes each batch through an :class:`Encoder`, and ends with
the encoder's closing frames (an error line or chunk when the runner failed
mid-stream). Leaving it for any reason (the client went away, the handler was
cancelled) closes the runner, which leaves the buffer or frees the slot.

Encoders: :class:`NdjsonEncoder` (native HTTP), :class:`WebSocketEncoder` (the native
inference socket) and ``openai.stream.SseEncoder`` (OpenAI's chat, completions and
Responses event streams). Sinks: :class:`HttpSink`, :class:`WebSocketSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web

from paddler_balancer.service import Balancer
from paddler_balancer.streams import InferenceFailure
from paddler_core.desired_state import SamplingOverrides
from paddler_core.inference import (
    TIMEOUT,
    TOO_MANY_BUFFERED_REQUESTS,
    Envelope,
    GenerateEmbeddingBatchParams,
    error_envelope,
    response_envelope,
)
from paddler_core.prefix import request_prefix_keys

# ---- runners -------------------------------------------------------------------------------

Batch = tuple[str | None, list[tuple[Any, bool]]]
Runner = AsyncGenerator[Batch, None]
EMBEDDING_DONE: dict[str, Any] = {"Embedding": "Done"}
NO_EMBEDDINGS_PRODUCED: dict[str, Any] = {"Embedding": "NoEmbeddingsProduced"}
"""Paddler 4.1's notice, once before ``Done``, that a batch produced no embedding (every
document was over the batch size, each reported with ``DocumentExceedsBatchSize``)."""


async def run_generation(
    balancer: Balancer,
    *,
    model_group: str,
    variant: str,
    params: dict[str, Any],
    request_id: str,
    overrides: SamplingOverrides | None = None,
) -> Runner:
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


async def run_refused(payload: Any) -> Runner:
    """A request answered on the balancer, without an agent: one final payload (Paddler's
    ``ToolSchemaInvalid``, which it streams rather than answering with a status)."""
    yield None, [(payload, True)]


def part_payloads(batch: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """What one part of a split embedding batch forwards: its own Done and
    NoEmbeddingsProduced are dropped (the merged stream says each once, for the whole
    batch); embeddings and a terminal error pass once, as they are."""
    return [(payload, final) for payload, final in batch if payload not in (EMBEDDING_DONE, NO_EMBEDDINGS_PRODUCED)]


def is_embedding(payload: Any) -> bool:
    """``{"Embedding": {"Embedding": {...}}}``: one document's vector."""
    inner = payload.get("Embedding") if isinstance(payload, dict) else None
    return isinstance(inner, dict) and "Embedding" in inner


def embedding_end(produced: bool) -> list[tuple[Any, bool]]:
    """The merged stream's last payloads: ``Done``, after Paddler's ``NoEmbeddingsProduced``
    when no part produced an embedding."""
    return [(EMBEDDING_DONE, True)] if produced else [(NO_EMBEDDINGS_PRODUCED, False), (EMBEDDING_DONE, True)]


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
) -> Runner:
    """Split the batch across the group's agents; merge their embeddings into one
    stream ending with one ``{"Embedding": "Done"}`` (after one ``NoEmbeddingsProduced``
    when no document was embedded). Each part is buffered like a
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
        produced = False
        while remaining:
            item = await merged.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, InferenceFailure):
                raise item
            produced = produced or any(is_embedding(payload) for payload, _ in item[1])
            yield item
            if any(final for _, final in item[1]):
                return  # a part failed with a terminal error payload: stop everything
        yield None, embedding_end(produced)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- the state machine ----------------------------------------------------------------------

NO_RESPONSE = "the agent ended the request without a response"

_Frame = TypeVar("_Frame")


class Encoder(Protocol[_Frame]):
    """Turns a runner's batches into a transport's frames."""

    @property
    def done(self) -> bool:
        """The encoder saw the end of the request inside a batch (an OpenAI stream stops
        at an error or a length stop); otherwise the runner's end ends the stream."""
        ...

    def encode(self, batch: Batch) -> list[_Frame]:
        """The frames of one batch. For the first batch it may raise instead, to refuse
        the request before anything is sent."""
        ...

    def end(self, failure: InferenceFailure | None) -> list[_Frame]:
        """The closing frames: ``failure`` is what ended the runner mid-stream, if anything."""
        ...


class Sink(Protocol[_Frame]):
    """Where frames go: an HTTP response or a WebSocket."""

    async def open(self) -> None: ...

    async def write(self, frames: list[_Frame]) -> None: ...

    async def close(self) -> None: ...


async def forward(runner: Runner, encoder: Encoder[_Frame], sink: Sink[_Frame]) -> None:
    """Stream ``runner`` through ``encoder`` into ``sink``. Raises InferenceFailure (or what
    the encoder raises on the first batch) while nothing has been sent yet."""
    async with contextlib.aclosing(runner):
        try:
            first = await anext(runner)
        except StopAsyncIteration:
            raise InferenceFailure(502, NO_RESPONSE, "agent_lost") from None
        frames = encoder.encode(first)
        await sink.open()
        failure: InferenceFailure | None = None
        while True:
            await sink.write(frames)
            if encoder.done:
                break
            try:
                batch = await anext(runner)
            except StopAsyncIteration:
                break
            except InferenceFailure as raised:
                failure = raised
                break
            frames = encoder.encode(batch)
        await sink.write(encoder.end(failure))
        await sink.close()


# ---- sinks ----------------------------------------------------------------------------------


class HttpSink:
    """A streamed HTTP response: headers when opened, one write per batch."""

    def __init__(self, request: web.Request, headers: dict[str, str]) -> None:
        self.request = request
        self.response = web.StreamResponse(headers=headers)

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def write(self, frames: list[bytes]) -> None:
        if frames:
            await self.response.write(b"".join(frames))

    async def close(self) -> None:
        await self.response.write_eof()


@dataclass
class WebSocketSink:
    """One request's messages on a shared WebSocket (one message per frame)."""

    ws: web.WebSocketResponse

    async def open(self) -> None:
        pass  # the socket is open already; requests are multiplexed on it

    async def write(self, frames: list[str]) -> None:
        for frame in frames:
            if not self.ws.closed:
                await self.ws.send_str(frame)

    async def close(self) -> None:
        pass  # the socket outlives the request


# ---- native encoders ------------------------------------------------------------------------


@dataclass
class NdjsonEncoder:
    """Paddler's native HTTP stream: one ``Response`` envelope per line, an ``Error``
    envelope as the last line when the request failed mid-stream."""

    request_id: str
    done: bool = False

    def encode(self, batch: Batch) -> list[bytes]:
        agent_id, items = batch
        return [_line(response_envelope(self.request_id, payload, agent_id)) for payload, _ in items]

    def end(self, failure: InferenceFailure | None) -> list[bytes]:
        if failure is None:
            return []
        return [_line(error_envelope(self.request_id, failure.status, failure.message))]


def _line(message: Envelope) -> bytes:
    return (json.dumps(message) + "\n").encode()


@dataclass
class WebSocketEncoder:
    """Paddler's inference socket: one message per payload; a failure is Paddler's named
    response for buffer outcomes, else an ``Error`` envelope."""

    request_id: str
    done: bool = False

    def encode(self, batch: Batch) -> list[str]:
        agent_id, items = batch
        return [json.dumps(response_envelope(self.request_id, payload, agent_id)) for payload, _ in items]

    def end(self, failure: InferenceFailure | None) -> list[str]:
        return [] if failure is None else [self.failure(failure)]

    def failure(self, failure: InferenceFailure) -> str:
        return json.dumps(failure_payload(self.request_id, failure))


def failure_payload(request_id: str, failure: InferenceFailure) -> Envelope:
    """Paddler's WebSocket shapes: named responses for buffer outcomes, else an Error."""
    if failure.kind == "buffer_full":
        return response_envelope(request_id, TOO_MANY_BUFFERED_REQUESTS)
    if failure.kind in ("buffer_timeout", "item_timeout"):
        return response_envelope(request_id, TIMEOUT)
    return error_envelope(request_id, failure.status, failure.message)
