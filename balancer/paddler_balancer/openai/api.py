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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from paddler_balancer.http_util import BodyError, Handler, check_json_content_type, read_body
from paddler_balancer.inference_api import served_model_groups
from paddler_balancer.keys import BALANCER_KEY
from paddler_balancer.openai.errors import OpenAIError, invalid_request, parse_body
from paddler_balancer.openai.events import Accumulated, embedding_failure
from paddler_balancer.openai.mapping import (
    chat_params,
    completion_params,
    embedding_params,
    sampling_overrides,
)
from paddler_balancer.openai.model_groups import models_list, resolve_model
from paddler_balancer.openai.output import (
    chat_completion,
    completion_id,
    embeddings_response,
    now,
    settle_forced_call,
    text_completion,
)
from paddler_balancer.openai.request_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingRequest,
    ToolDefinition,
)
from paddler_balancer.openai.stream import ChatRenderer, Renderer, TextRenderer, collect, inference_error, stream_sse
from paddler_balancer.relay import Runner, run_embedding, run_generation
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


async def stream(request: web.Request, runner: Runner, renderer: Renderer, outcome: Outcome) -> web.StreamResponse:
    """Stream a generation as SSE; its tokens and end status go to ``outcome``."""
    response, status = await stream_sse(request, runner, renderer)
    outcome.tokens = renderer.acc.tokens
    if status != 200:
        outcome.status = status
    return response


@dataclass
class GenerationRun:
    """A generation, resolved and mapped, not started yet."""

    runner: Runner
    group: str
    max_tokens: int
    forced: list[ToolDefinition]
    """The tools whose call the grammar forces (none for a text completion)."""


Mapped = tuple[dict[str, Any], list[ToolDefinition]]
"""A request's native params (as JSON) and its forced tools."""


def start_generation(
    request: web.Request,
    req: SamplingRequest,
    outcome: Outcome,
    variant: RequestKind,
    mapped: Callable[[BalancerDesiredState], Mapped],
) -> GenerationRun:
    """Resolve the model group and map ``req`` (by ``mapped``, given the group's desired
    state) to a native request of ``variant``; raises OpenAIError for a bad request."""
    balancer = request.app[BALANCER_KEY]
    group, state = resolve_group(balancer, req.model, outcome)
    params, forced = mapped(state)
    runner = run_generation(
        balancer,
        model_group=group,
        variant=variant.value,
        params=params,
        request_id=uuid.uuid4().hex,
        overrides=sampling_overrides(req),
    )
    return GenerationRun(runner, group, int(params["max_tokens"]), forced)


def start_chat(request: web.Request, req: ChatCompletionRequest, outcome: Outcome) -> GenerationRun:
    """A conversation generation (also what ``/v1/responses`` runs), at most the
    context's size long by default."""

    def mapped(state: BalancerDesiredState) -> Mapped:
        return chat_params(req, state.inference_parameters.context_size)

    return start_generation(request, req, outcome, RequestKind.CONVERSATION, mapped)


def start_text(request: web.Request, req: CompletionRequest, outcome: Outcome) -> GenerationRun:
    """A raw prompt generation, OpenAI's default 16 tokens long."""

    def mapped(_state: BalancerDesiredState) -> Mapped:
        return completion_params(req, COMPLETIONS_DEFAULT_MAX_TOKENS), []

    return start_generation(request, req, outcome, RequestKind.RAW_PROMPT, mapped)


async def collect_run(run: GenerationRun, outcome: Outcome) -> Accumulated:
    """Run a generation to its end; a forced tool call is parsed from its output."""
    acc = Accumulated()
    await collect(run.runner, acc)
    settle_forced_call(acc, run.forced)
    outcome.tokens = acc.tokens
    return acc


@dataclass(frozen=True)
class CompletionKind:
    """What a chat and a text completion answer with, streamed or not."""

    id_prefix: str
    renderer: Callable[[str, str, int, bool, GenerationRun], Renderer]
    """The stream's renderer, from its id, model, creation time, include_usage and run."""
    body: Callable[[str, str, int, Accumulated, int | None], dict[str, Any]]
    """The non-streamed body, from its id, model, creation time, output and token limit."""


def _chat_renderer(response_id: str, model: str, created: int, usage: bool, run: GenerationRun) -> Renderer:
    return ChatRenderer(response_id, model, created, usage, run.max_tokens, run.forced, Accumulated())


def _text_renderer(response_id: str, model: str, created: int, usage: bool, run: GenerationRun) -> Renderer:
    return TextRenderer(response_id, model, created, usage, run.max_tokens, Accumulated())


CHAT = CompletionKind("chatcmpl", _chat_renderer, chat_completion)
TEXT = CompletionKind("cmpl", _text_renderer, text_completion)


async def answer(
    request: web.Request, req: SamplingRequest, run: GenerationRun, kind: CompletionKind, outcome: Outcome
) -> web.StreamResponse:
    """Stream ``run`` as SSE, or run it to its end and answer with the whole body."""
    model, created, response_id = req.model or run.group, now(), completion_id(kind.id_prefix)
    if req.stream:
        renderer = kind.renderer(response_id, model, created, req.include_usage, run)
        return await stream(request, run.runner, renderer, outcome)
    acc = await collect_run(run, outcome)
    return web.json_response(kind.body(response_id, model, created, acc, run.max_tokens))


async def chat_completions(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(ChatCompletionRequest, await request_body(request))
    return await answer(request, req, start_chat(request, req, outcome), CHAT, outcome)


async def completions(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(CompletionRequest, await request_body(request))
    return await answer(request, req, start_text(request, req, outcome), TEXT, outcome)


# ---- embeddings -----------------------------------------------------------------------------


async def embeddings(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    req = validate(EmbeddingRequest, await request_body(request))
    balancer = request.app[BALANCER_KEY]
    group, _state = resolve_group(balancer, req.model, outcome)
    params = embedding_params(req)
    runner = run_embedding(balancer, model_group=group, params=params, request_id=uuid.uuid4().hex)
    vectors: dict[str, list[float]] = {}
    async with contextlib.aclosing(runner):
        try:
            async for _agent, items in runner:
                for payload, _final in items:
                    _take_embedding(payload, vectors)
        except InferenceFailure as failure:
            raise inference_error(failure) from None
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
