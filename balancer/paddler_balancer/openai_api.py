"""OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``.

Served on the inference address beside the native API and, optionally, alone on
``--compat-openai-addr``. Applications written for OpenAI work by changing only
their base URL to ``http://<inference-addr>/v1``.

* ``model`` selects the model group (``GET /v1/models`` lists them). A group also
  answers to its model's display names (file name, file stem, Hugging Face repo
  id, the full description); omitting ``model`` works while the pool serves one
  group. Unknown: 404 ``model_not_found``.
* Errors use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
  with the HTTP status while nothing has been streamed yet (400 invalid request,
  401 wrong key, 404 unknown model, 503 buffer full, 504 buffer or item timeout,
  502 agent lost); once streaming started, an error chunk ``data: {"error": ...}``
  then ``data: [DONE]``.
* Each request ends with one structured log line ``openai request endpoint=...
  status=...`` (client retries can be counted from it).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from paddler_balancer.batches import Batch, run_embedding, run_generation
from paddler_balancer.http_util import BodyError, Handler, check_json_content_type, read_body
from paddler_balancer.inference_api import BALANCER_KEY, served_model_groups
from paddler_balancer.openai_types import (
    SSE_DONE,
    Accumulated,
    AgentError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Event,
    OpenAIError,
    Token,
    ToolCallFailed,
    ToolCalls,
    ToolDefinition,
    agent_error,
    chat_chunk,
    chat_completion,
    chat_delta,
    chat_params,
    classify,
    completion_id,
    completion_params,
    embedding_failure,
    embedding_params,
    embeddings_response,
    finish_reason,
    forced_tool_calls,
    invalid_request,
    is_length_stop,
    models_list,
    now,
    parse_body,
    resolve_model,
    sampling_overrides,
    sse,
    text_chunk,
    text_completion,
    usage_block,
)
from paddler_balancer.service import Balancer
from paddler_balancer.streams import InferenceFailure
from paddler_core.desired_state import BalancerDesiredState
from paddler_core.inference import RequestKind

log = logging.getLogger(__name__)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for the legacy completions endpoint."""

_M = TypeVar("_M", bound=BaseModel)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", endpoint("chat.completions", chat_completions))
    r.add_post("/v1/completions", endpoint("completions", completions))
    r.add_post("/v1/embeddings", endpoint("embeddings", embeddings))
    r.add_get("/v1/models", endpoint("models.list", list_models))
    r.add_get("/v1/models/{model}", endpoint("models.retrieve", retrieve_model))


# ---- plumbing -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one request ended with, for its log line."""

    status: int = 200
    model_group: str = "-"
    tokens: int = 0


Endpoint = Callable[[web.Request, Outcome], Awaitable[web.StreamResponse]]


def error_response(err: OpenAIError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def endpoint(name: str, handler: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        outcome = Outcome()
        try:
            try:
                response = await handler(request, outcome)
                if outcome.status == 200:
                    outcome.status = response.status
            except (OpenAIError, ValidationError) as raised:
                err = invalid_request(raised) if isinstance(raised, ValidationError) else raised
                outcome.status = err.status
                response = error_response(err)
        except BaseException:
            outcome.status = 499  # the client went away (handler cancelled)
            raise
        finally:
            log.info(
                "openai request endpoint=%s status=%d model_group=%s tokens=%d duration_ms=%d",
                name,
                outcome.status,
                outcome.model_group,
                outcome.tokens,
                (time.monotonic() - started) * 1000,
            )
        return response

    return handle


def validate(model: type[_M], body: dict[str, Any]) -> _M:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise invalid_request(err) from None


def _failure(failure: InferenceFailure) -> OpenAIError:
    return OpenAIError(failure.status, failure.message, code=failure.kind)


def _groups(balancer: Balancer) -> tuple[list[str], dict[str, BalancerDesiredState]]:
    served = served_model_groups(balancer)
    return served, {g: balancer.store.get(g) for g in served}


def resolve_group(balancer: Balancer, requested: str | None, outcome: Outcome) -> tuple[str, BalancerDesiredState]:
    served, states = _groups(balancer)
    group = resolve_model(requested, served, states)
    outcome.model_group = group
    return group, states[group]


async def request_body(request: web.Request) -> dict[str, Any]:
    try:
        check_json_content_type(request)
        raw = await read_body(request)
    except BodyError as err:
        raise OpenAIError(err.status, err.message, code=err.kind) from None
    return parse_body(raw)


# ---- models ---------------------------------------------------------------------------------


async def list_models(request: web.Request, _outcome: Outcome) -> web.StreamResponse:
    balancer = request.app[BALANCER_KEY]
    served, states = _groups(balancer)
    return web.json_response(models_list(served, states, _CREATED))


async def retrieve_model(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    balancer = request.app[BALANCER_KEY]
    group, state = resolve_group(balancer, request.match_info["model"], outcome)
    (entry,) = models_list([group], {group: state}, _CREATED)["data"]
    return web.json_response(entry)


_CREATED = now()
"""The ``created`` timestamp of listed models: when the balancer started."""


# ---- generation -----------------------------------------------------------------------------


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
class ChatRenderer(DoneTerminated):
    response_id: str
    model: str
    created: int
    include_usage: bool
    max_tokens: int
    forced: list[ToolDefinition]
    acc: Accumulated

    def _chunk(self, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
        return chat_chunk(self.response_id, self.model, self.created, delta, finish, None, self.include_usage)

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]:
        if isinstance(event, ToolCalls):
            return [self._chunk({"tool_calls": event.calls})]
        if self.forced:
            return []  # the forced call is parsed and sent as tool_calls at the end
        delta = chat_delta(event)
        return [self._chunk(delta)] if delta is not None else []

    def closing(self) -> list[dict[str, Any]]:
        chunks = []
        if self.forced and not self.acc.tool_calls:
            calls = forced_tool_calls(self.acc.text, self.forced)
            self.acc.tool_calls.extend(calls)
            chunks.append(self._chunk({"tool_calls": calls} if calls else {"content": self.acc.text}))
        chunks.append(self._chunk({}, finish_reason(self.acc, self.max_tokens)))
        if self.include_usage:
            usage = usage_block(self.acc.usage, self.acc.tokens)
            chunks.append(chat_chunk(self.response_id, self.model, self.created, None, None, usage, True))
        return chunks


@dataclass
class TextRenderer(DoneTerminated):
    response_id: str
    model: str
    created: int
    include_usage: bool
    max_tokens: int
    acc: Accumulated

    def opening(self) -> list[dict[str, Any]]:
        return []

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]:
        if isinstance(event, Token) and event.kind == "content":
            return [text_chunk(self.response_id, self.model, self.created, event.text, None, None, self.include_usage)]
        return []

    def closing(self) -> list[dict[str, Any]]:
        finish = finish_reason(self.acc, self.max_tokens)
        chunks = [text_chunk(self.response_id, self.model, self.created, "", finish, None, self.include_usage)]
        if self.include_usage:
            usage = usage_block(self.acc.usage, self.acc.tokens)
            chunks.append(text_chunk(self.response_id, self.model, self.created, None, None, usage, True))
        return chunks


Absorbed = tuple[list[Token | ToolCalls], OpenAIError | None, bool]
"""(events to render, the terminal error if any, whether the generation ended)."""


def _events(batch: Batch) -> list[Event]:
    return [classify(payload) for payload, _final in batch[1]]


def _absorb(acc: Accumulated, events: list[Event]) -> Absorbed:
    """Add events to ``acc``: (events to render, terminal error, finished)."""
    shown: list[Token | ToolCalls] = []
    for event in events:
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


async def collect(runner: AsyncIterator[Batch], acc: Accumulated) -> None:
    """Run a generation to its end into ``acc``; raises OpenAIError."""
    async with contextlib.aclosing(runner):  # type: ignore[type-var]
        try:
            async for batch in runner:
                _shown, error, finished = _absorb(acc, _events(batch))
                if error is not None:
                    raise error
                if finished:
                    return
        except InferenceFailure as failure:
            raise _failure(failure) from None


async def stream_sse(
    request: web.Request, runner: AsyncIterator[Batch], renderer: Renderer, outcome: Outcome
) -> web.StreamResponse:
    """SSE. The first batch is awaited before the headers, so a failure before any
    output is an HTTP status; later failures are an error chunk, then ``[DONE]``."""
    async with contextlib.aclosing(runner):  # type: ignore[type-var]
        first = await _first_events(runner, renderer.acc)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        try:
            error = await _pump(response, runner, renderer, first)
            outcome.tokens = renderer.acc.tokens
            if error is not None:
                outcome.status = error.status
                log.info("openai stream failed status=%d code=%s message=%s", error.status, error.code, error.message)
                chunks = renderer.failed(error)
            else:
                chunks = renderer.closing()
            await response.write(b"".join(renderer.encode(c) for c in chunks) + renderer.trailer)
            await response.write_eof()
        except ConnectionResetError:
            outcome.status = 499  # the client went away mid-stream; leaving frees the slot
        return response


async def _first_events(runner: AsyncIterator[Batch], acc: Accumulated) -> Absorbed:
    """The first batch, or the OpenAIError to answer with before any header."""
    try:
        first = await anext(runner)
    except InferenceFailure as failure:
        raise _failure(failure) from None
    except StopAsyncIteration:
        raise OpenAIError(502, "the agent ended the request without a response", code="agent_lost") from None
    shown, error, finished = _absorb(acc, _events(first))
    if error is not None and not shown:
        raise error
    return shown, error, finished


async def _pump(
    response: web.StreamResponse, runner: AsyncIterator[Batch], renderer: Renderer, first: Absorbed
) -> OpenAIError | None:
    """Write chunks until the generation ends; the error that ended it, if any."""
    shown, error, finished = first
    chunks = renderer.opening()
    while True:
        for event in shown:
            chunks.extend(renderer.on_event(event))
        if chunks:
            await response.write(b"".join(renderer.encode(c) for c in chunks))
            chunks = []
        if finished:
            return error
        try:
            batch = await anext(runner)
        except StopAsyncIteration:
            return None
        except InferenceFailure as failure:
            return _failure(failure)
        shown, error, finished = _absorb(renderer.acc, _events(batch))


@dataclass
class ChatRun:
    """A conversation generation, resolved and mapped, not started yet."""

    runner: AsyncIterator[Batch]
    group: str
    max_tokens: int
    forced: list[ToolDefinition]


def start_chat(request: web.Request, req: ChatCompletionRequest, outcome: Outcome) -> ChatRun:
    """Resolve the model group and map ``req`` to a native conversation request (also
    what ``/v1/responses`` runs); raises OpenAIError for a bad request."""
    balancer = request.app[BALANCER_KEY]
    group, state = resolve_group(balancer, req.model, outcome)
    params, forced = chat_params(req, state.inference_parameters.context_size)
    runner = run_generation(
        balancer,
        model_group=group,
        variant=RequestKind.CONVERSATION.value,
        params=params,
        request_id=uuid.uuid4().hex,
        overrides=sampling_overrides(req),
    )
    return ChatRun(runner, group, int(params["max_tokens"]), forced)


async def collect_chat(run: ChatRun, outcome: Outcome) -> Accumulated:
    """Run a conversation to its end; a forced tool call is parsed from its output."""
    acc = Accumulated()
    await collect(run.runner, acc)
    if run.forced and not acc.tool_calls:
        acc.tool_calls.extend(forced_tool_calls(acc.text, run.forced))
    outcome.tokens = acc.tokens
    return acc


async def chat_completions(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(ChatCompletionRequest, await request_body(request))
    run = start_chat(request, req, outcome)
    model, created, response_id = req.model or run.group, now(), completion_id("chatcmpl")
    if req.stream:
        acc = Accumulated()
        renderer = ChatRenderer(response_id, model, created, req.include_usage, run.max_tokens, run.forced, acc)
        return await stream_sse(request, run.runner, renderer, outcome)
    acc = await collect_chat(run, outcome)
    return web.json_response(chat_completion(response_id, model, created, acc, run.max_tokens))


async def completions(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(CompletionRequest, await request_body(request))
    balancer = request.app[BALANCER_KEY]
    group, _state = resolve_group(balancer, req.model, outcome)
    params = completion_params(req, COMPLETIONS_DEFAULT_MAX_TOKENS)
    runner = run_generation(
        balancer,
        model_group=group,
        variant=RequestKind.RAW_PROMPT.value,
        params=params,
        request_id=uuid.uuid4().hex,
        overrides=sampling_overrides(req),
    )
    model, created, response_id = req.model or group, now(), completion_id("cmpl")
    max_tokens: int = params["max_tokens"]
    acc = Accumulated()
    if req.stream:
        renderer = TextRenderer(response_id, model, created, req.include_usage, max_tokens, acc)
        return await stream_sse(request, runner, renderer, outcome)
    await collect(runner, acc)
    outcome.tokens = acc.tokens
    return web.json_response(text_completion(response_id, model, created, acc, max_tokens))


# ---- embeddings -----------------------------------------------------------------------------


async def embeddings(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(EmbeddingRequest, await request_body(request))
    balancer = request.app[BALANCER_KEY]
    group, _state = resolve_group(balancer, req.model, outcome)
    params = embedding_params(req)
    runner = run_embedding(balancer, model_group=group, params=params, request_id=uuid.uuid4().hex)
    vectors: dict[str, list[float]] = {}
    async with contextlib.aclosing(runner):  # type: ignore[type-var]
        try:
            async for _agent, items in runner:
                for payload, _final in items:
                    _take_embedding(payload, vectors)
        except InferenceFailure as failure:
            raise _failure(failure) from None
    ordered = [vectors.get(doc.id) for doc in params.input_batch]
    if any(v is None for v in ordered):
        raise OpenAIError(502, "the agents returned fewer embeddings than inputs", code="missing_embeddings")
    found = [v for v in ordered if v is not None]
    return web.json_response(embeddings_response(req.model or group, found, req.encoding_format))


def _take_embedding(payload: Any, vectors: dict[str, list[float]]) -> None:
    error = embedding_failure(payload)
    if error is not None:
        raise error
    inner = payload["Embedding"]
    if isinstance(inner, dict):
        embedding = inner["Embedding"]
        vectors[str(embedding["source_document_id"])] = [float(x) for x in embedding["embedding"]]
