"""OpenAI's event streams over :func:`relay.forward`: the chat and text completion
renderers (chunks, ``data: [DONE]``), the SSE encoder that reads agent payloads as
events for them (and for the Responses renderer), and the non-streamed collect.

A stream's first batch is read before any header, so a failure before any output is an
HTTP status; an error later is an error chunk (or ``error`` + ``response.failed`` event),
then the stream's end.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from aiohttp import web

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.events import (
    Accumulated,
    AgentError,
    Event,
    Token,
    ToolCallFailed,
    ToolCalls,
    agent_error,
    classify,
    is_length_stop,
)
from paddler_balancer.openai.output import (
    CHAT_CHUNK,
    TEXT_CHUNK,
    chat_delta,
    completion_choice,
    completion_chunk,
    finish_reason,
    settle_forced_call,
    usage_block,
)
from paddler_balancer.openai.request_models import ToolDefinition
from paddler_balancer.relay import Batch, HttpSink, Runner, forward
from paddler_balancer.streams import InferenceFailure

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


def inference_error(failure: InferenceFailure) -> OpenAIError:
    return OpenAIError(failure.status, failure.message, code=failure.kind)


# ---- renderers ------------------------------------------------------------------------------


class Renderer(Protocol):
    """Turns a generation's events into streamed chunks and chunks into SSE bytes."""

    acc: Accumulated

    def opening(self) -> list[dict[str, Any]]: ...

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]: ...

    def closing(self) -> list[dict[str, Any]]: ...

    def failed(self, error: OpenAIError) -> list[dict[str, Any]]:
        """The chunks that report an error after streaming started."""
        ...

    def encode(self, chunk: dict[str, Any]) -> bytes: ...

    @property
    def trailer(self) -> bytes:
        """Written after the last chunk (``data: [DONE]`` for chat and text)."""
        ...


class DoneTerminated:
    """Chat and text completions: ``data:`` lines, an error chunk in the error envelope,
    ``data: [DONE]`` at the end."""

    def failed(self, error: OpenAIError) -> list[dict[str, Any]]:
        return [error.body()]

    def encode(self, chunk: dict[str, Any]) -> bytes:
        return sse(chunk)

    @property
    def trailer(self) -> bytes:
        return SSE_DONE


@dataclass
class CompletionRenderer(DoneTerminated):
    """What chat and text completion streams share: the chunks' envelope, and their end
    (the chunk with the finish reason, then the usage-only chunk when asked for)."""

    response_id: str
    model: str
    created: int
    include_usage: bool
    max_tokens: int

    object_name: ClassVar[str]
    """The chunks' ``object``."""
    choice_key: ClassVar[str]
    """What a chunk's choice carries: ``delta`` or ``text``."""

    def _chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return completion_chunk(
            self.object_name, self.response_id, self.model, self.created, choice, usage, self.include_usage
        )

    def _shown(self, value: Any) -> dict[str, Any]:
        """A chunk that shows ``value`` (a delta, or text) and no finish reason yet."""
        return self._chunk(completion_choice(self.choice_key, value, None))

    def _ending(self, acc: Accumulated, last: Any) -> list[dict[str, Any]]:
        """The chunk showing ``last`` with the finish reason, then usage if asked for."""
        chunks = [self._chunk(completion_choice(self.choice_key, last, finish_reason(acc, self.max_tokens)))]
        if self.include_usage:
            chunks.append(self._chunk(None, usage_block(acc.usage, acc.tokens)))
        return chunks


@dataclass
class ChatRenderer(CompletionRenderer):
    forced: list[ToolDefinition]
    acc: Accumulated

    object_name: ClassVar[str] = CHAT_CHUNK
    choice_key: ClassVar[str] = "delta"

    def opening(self) -> list[dict[str, Any]]:
        return [self._shown({"role": "assistant", "content": ""})]

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]:
        if isinstance(event, ToolCalls):
            return [self._shown({"tool_calls": event.calls})]
        if self.forced:
            return []  # the forced call is parsed and sent as tool_calls at the end
        delta = chat_delta(event)
        return [self._shown(delta)] if delta is not None else []

    def closing(self) -> list[dict[str, Any]]:
        chunks = []
        calls = settle_forced_call(self.acc, self.forced)
        if calls is not None:
            chunks.append(self._shown({"tool_calls": calls} if calls else {"content": self.acc.text}))
        return chunks + self._ending(self.acc, {})


@dataclass
class TextRenderer(CompletionRenderer):
    acc: Accumulated

    object_name: ClassVar[str] = TEXT_CHUNK
    choice_key: ClassVar[str] = "text"

    def opening(self) -> list[dict[str, Any]]:
        return []

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]:
        if isinstance(event, Token) and event.kind == "content":
            return [self._shown(event.text)]
        return []

    def closing(self) -> list[dict[str, Any]]:
        return self._ending(self.acc, "")


Absorbed = tuple[list[Token | ToolCalls], OpenAIError | None, bool]
"""(events to render, the terminal error if any, whether the generation ended)."""


def _events(batch: Batch) -> list[Event]:
    return [classify(payload) for payload, _final in batch[1]]


def absorb(acc: Accumulated, batch: Batch) -> Absorbed:
    """Add a batch's events to ``acc``: (events to render, terminal error, finished)."""
    shown: list[Token | ToolCalls] = []
    for event in _events(batch):
        if isinstance(event, AgentError):
            if is_length_stop(event, acc.tokens):
                acc.length_stop = True
                return shown, None, True
            return shown, agent_error(event), True
        replacement = acc.add(event)
        if isinstance(event, ToolCallFailed):
            log.info("tool call not parsed kind=%s message=%s; returned as content", event.kind, event.message)
            if replacement is not None and replacement.text:
                shown.append(replacement)
        elif isinstance(event, Token | ToolCalls):
            shown.append(event)
    return shown, None, False


async def collect(runner: Runner, acc: Accumulated) -> None:
    """Run a generation to its end into ``acc``; raises OpenAIError."""
    async with contextlib.aclosing(runner):
        try:
            async for batch in runner:
                _shown, error, finished = absorb(acc, batch)
                if error is not None:
                    raise error
                if finished:
                    return
        except InferenceFailure as failure:
            raise inference_error(failure) from None


# ---- streaming ------------------------------------------------------------------------------


@dataclass
class SseEncoder:
    """Agent batches to a renderer's SSE frames (:class:`relay.Encoder`). The first batch
    is refused with its error when it holds nothing to show; the stream ends at an agent
    error or a length stop, with the renderer's closing (or failure) chunks and trailer."""

    renderer: Renderer
    done: bool = False
    error: OpenAIError | None = None
    _opened: bool = field(default=False, repr=False)

    def encode(self, batch: Batch) -> list[bytes]:
        shown, error, finished = absorb(self.renderer.acc, batch)
        chunks: list[dict[str, Any]] = []
        if not self._opened:
            if error is not None and not shown:
                raise error
            self._opened = True
            chunks = self.renderer.opening()
        for event in shown:
            chunks.extend(self.renderer.on_event(event))
        self.error, self.done = error, finished
        return [self.renderer.encode(chunk) for chunk in chunks]

    def end(self, failure: InferenceFailure | None) -> list[bytes]:
        if failure is not None:
            self.error = inference_error(failure)
        chunks = self.renderer.closing() if self.error is None else self.renderer.failed(self.error)
        return [*(self.renderer.encode(chunk) for chunk in chunks), self.renderer.trailer]


async def stream_sse(request: web.Request, runner: Runner, renderer: Renderer) -> tuple[web.StreamResponse, int]:
    """SSE through :func:`relay.forward`: the response and the status for the request's
    log line (an error's status when it failed mid-stream, 499 when the client left).
    Raises OpenAIError while nothing has been sent."""
    encoder = SseEncoder(renderer)
    sink = HttpSink(request, SSE_HEADERS)
    status = 200
    try:
        await forward(runner, encoder, sink)
    except InferenceFailure as failure:
        raise inference_error(failure) from None
    except ConnectionResetError:
        if not sink.response.prepared:
            raise
        status = 499  # the client went away mid-stream; leaving freed the slot
    else:
        if encoder.error is not None:
            error = encoder.error
            status = error.status
            log.info("openai stream failed status=%d code=%s message=%s", error.status, error.code, error.message)
    return sink.response, status
