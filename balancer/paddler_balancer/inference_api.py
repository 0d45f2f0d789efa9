"""Paddler's native inference API (the inference address).

``POST /api/v1/continue_from_raw_prompt``, ``.../continue_from_conversation_history``
and ``.../generate_embedding_batch`` stream NDJSON; ``GET /api/v1/inference_socket``
multiplexes requests by id over one WebSocket (``paddler-client``'s transport).

Model groups: a request goes to the default group unless the ``X-Paddler-Model-Group``
header or the ``model_group`` query parameter names another (on the WebSocket: for
every request of that socket, given when it opens). A group the pool does not serve
(no desired state, no agent) is 404 ``model_group_not_found`` listing those it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from paddler_balancer.http_util import MAX_BODY_BYTES, json_error, read_json, validation_message
from paddler_balancer.keys import BALANCER_KEY
from paddler_balancer.openai.model_groups import served_groups
from paddler_balancer.relay import (
    HttpSink,
    NdjsonEncoder,
    Runner,
    WebSocketEncoder,
    WebSocketSink,
    forward,
    run_embedding,
    run_generation,
    run_refused,
)
from paddler_balancer.service import Balancer
from paddler_balancer.streams import InferenceFailure
from paddler_core.desired_state import DEFAULT_MODEL_GROUP
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    GenerateEmbeddingBatchParams,
    GenerationError,
    GenerationParams,
    RequestKind,
    error_envelope,
    generated_error_payload,
    parse_generation_request,
)
from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r'"Request"\s*:\s*\{\s*"id"\s*:\s*"([^"\\]{1,200})"')

MODEL_GROUP_HEADER = "X-Paddler-Model-Group"
MODEL_GROUP_PARAM = "model_group"


def served_model_groups(balancer: Balancer) -> list[str]:
    """Every group with desired state or agents (the default one on a fresh balancer)."""
    stored = {name: entry.state for name, entry in balancer.store.groups.items()}
    with_agents = {agent.model_group for agent in balancer.pool.agents.values()}
    return served_groups(stored, with_agents, DEFAULT_MODEL_GROUP)


class UnknownModelGroup(Exception):
    def __init__(self, requested: str, served: list[str]) -> None:
        super().__init__(f"model group {requested!r} does not exist; this pool serves: {', '.join(served)}")

    def response(self) -> web.Response:
        return json_error(404, str(self), "model_group_not_found")


def requested_model_group(request: web.Request) -> str:
    """The group named by the header or query parameter, else the default group;
    raises UnknownModelGroup."""
    requested = request.headers.get(MODEL_GROUP_HEADER) or request.query.get(MODEL_GROUP_PARAM)
    if not requested:
        return DEFAULT_MODEL_GROUP
    served = served_model_groups(request.app[BALANCER_KEY])
    if requested not in served:
        raise UnknownModelGroup(requested, served)
    return requested


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_post("/api/v1/continue_from_raw_prompt", continue_from_raw_prompt)
    app.router.add_post("/api/v1/continue_from_conversation_history", continue_from_conversation_history)
    app.router.add_post("/api/v1/generate_embedding_batch", generate_embedding_batch)
    app.router.add_get("/api/v1/inference_socket", inference_socket)


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="OK")


async def continue_from_raw_prompt(request: web.Request) -> web.StreamResponse:
    return await _generation_ndjson(request, RequestKind.RAW_PROMPT)


async def continue_from_conversation_history(request: web.Request) -> web.StreamResponse:
    return await _generation_ndjson(request, RequestKind.CONVERSATION)


async def _generation_ndjson(request: web.Request, variant: RequestKind) -> web.StreamResponse:
    body = await read_json(request)
    try:
        params = parse_generation_request(variant, body)
        group = requested_model_group(request)
    except ValidationError as err:
        return json_error(400, validation_message(err), "invalid_request")
    except UnknownModelGroup as unknown:
        return unknown.response()
    request_id = uuid.uuid4().hex
    runner = generation_runner(request.app[BALANCER_KEY], group, variant.value, params, request_id)
    return await stream_ndjson(request, request_id, runner)


def generation_runner(
    balancer: Balancer, group: str, variant: str, params: GenerationParams, request_id: str
) -> Runner:
    """The request's payloads from an agent; or, as Paddler 4.1 streams it, one
    ``ToolSchemaInvalid`` naming a tool whose ``parameters`` is no JSON Schema (no agent is
    asked). The OpenAI API answers that with a 400 instead (openai.request_models)."""
    problem = params.tool_schema_problem() if isinstance(params, ContinueFromConversationHistoryParams) else None
    if problem is not None:
        return run_refused(generated_error_payload(GenerationError.TOOL_SCHEMA_INVALID, problem))
    dumped = params.model_dump(mode="json", by_alias=True, exclude_none=True)
    return run_generation(balancer, model_group=group, variant=variant, params=dumped, request_id=request_id)


async def generate_embedding_batch(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    try:
        params = GenerateEmbeddingBatchParams.model_validate(body)
        group = requested_model_group(request)
    except ValidationError as err:
        return json_error(400, validation_message(err), "invalid_request")
    except UnknownModelGroup as unknown:
        return unknown.response()
    request_id = uuid.uuid4().hex
    runner = run_embedding(
        request.app[BALANCER_KEY],
        model_group=group,
        params=params,
        request_id=request_id,
    )
    return await stream_ndjson(request, request_id, runner)


async def stream_ndjson(request: web.Request, request_id: str, runner: Runner) -> web.StreamResponse:
    """A runner's payloads as NDJSON envelopes: the status first (a failure before any
    output is its HTTP status), then lines, an error line last if it failed mid-stream."""
    sink = HttpSink(request, {"Content-Type": "application/x-ndjson"})
    try:
        await forward(runner, NdjsonEncoder(request_id), sink)
    except InferenceFailure as failure:
        return json_error(failure.status, failure.message, failure.kind)
    return sink.response


# ---- WebSocket ------------------------------------------------------------------------------


async def inference_socket(request: web.Request) -> web.StreamResponse:
    balancer = request.app[BALANCER_KEY]
    try:
        group = requested_model_group(request)
    except UnknownModelGroup as unknown:
        return unknown.response()  # before the upgrade: the client's handshake fails with it
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_BODY_BYTES)
    await ws.prepare(request)
    tasks: dict[str, asyncio.Task[None]] = {}

    sink = WebSocketSink(ws)

    async def send(message: Mapping[str, Any]) -> None:
        await sink.write([json.dumps(message)])

    def start(request_id: str, make_runner: Callable[[], Runner]) -> None:
        async def run() -> None:
            encoder = WebSocketEncoder(request_id)
            try:
                await forward(make_runner(), encoder, sink)
            except InferenceFailure as failure:  # before any output: buffer full, timeouts
                await sink.write([encoder.failure(failure)])
            except (ConnectionResetError, asyncio.CancelledError):
                pass
            except Exception:  # a bug must fail this request only, never go unanswered
                log.exception("inference socket request failed request_id=%s", request_id)
                await send(error_envelope(request_id, 500, "internal error; see the balancer log"))
            finally:
                tasks.pop(request_id, None)

        tasks[request_id] = asyncio.create_task(run(), name=f"ws-request-{request_id}")

    mode_changed = asyncio.Event()
    balancer.pool.on_change(mode_changed.set)
    watcher = asyncio.create_task(_announce_generation_mode(balancer, group, mode_changed, send))
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            await _handle_socket_message(balancer, group, msg.data, send, start, tasks)
    finally:
        balancer.pool.remove_listener(mode_changed.set)
        watcher.cancel()
        for task in list(tasks.values()):
            task.cancel()
        for task in [*tasks.values(), watcher]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return ws


TOKEN_GENERATION_ENABLED = {"Notification": "TokenGenerationEnabled"}
TOKEN_GENERATION_DISABLED = {"Notification": "TokenGenerationDisabled"}


async def _announce_generation_mode(
    balancer: Balancer, group: str, changed: asyncio.Event, send: Callable[[Mapping[str, Any]], Any]
) -> None:
    """Paddler 4.1's notifications: ``TokenGenerationDisabled`` when the socket opens on
    a group whose desired state enables embeddings, then one notification each time
    that switches. (Our agents still generate in that mode; the notice is Paddler's
    wire, which its clients read.)"""

    def embeddings() -> bool:
        return balancer.store.get(group).inference_parameters.enable_embeddings

    last = embeddings()
    if last:
        await send(TOKEN_GENERATION_DISABLED)
    while True:
        await changed.wait()
        changed.clear()
        now = embeddings()
        if now != last:
            last = now
            await send(TOKEN_GENERATION_DISABLED if now else TOKEN_GENERATION_ENABLED)


def _stop_target(message: dict[str, Any]) -> str | None:
    """The request id a cancellation names: Paddler 4.1's
    ``{"Notification": {"StopRespondingTo": "<id>"}}``, or the older top-level
    ``{"StopRespondingTo": ...}`` / ``{"Cancel": {"id": ...}}``."""
    notification = message.get("Notification")
    if isinstance(notification, dict) and "StopRespondingTo" in notification:
        return str(notification["StopRespondingTo"])
    cancel = message.get("Cancel") or message.get("StopRespondingTo")
    if cancel is None:
        return None
    return str(cancel.get("id") if isinstance(cancel, dict) else cancel)


async def _handle_socket_message(
    balancer: Balancer,
    group: str,
    data: str,
    send: Callable[[Mapping[str, Any]], Any],
    start: Callable[[str, Callable[[], Runner]], None],
    tasks: dict[str, asyncio.Task[None]],
) -> None:
    try:
        message = parse_untrusted_json(data, "message")
    except UntrustedJsonError as err:
        await send(error_envelope(_request_id_hint(data), 400, str(err)))
        return
    if not isinstance(message, dict):
        await send(error_envelope("", 400, "message must be a JSON object"))
        return
    cancel_id = _stop_target(message)
    if cancel_id is not None:
        task = tasks.get(cancel_id)
        if task is not None:
            task.cancel()  # leaves the buffer, or stops the agent and frees the slot
        return
    envelope = message.get("Request")
    if not isinstance(envelope, dict) or not isinstance(envelope.get("request"), dict):
        await send(error_envelope("", 400, 'expected {"Request": {"id": ..., "request": {...}}}'))
        return
    request_id = str(envelope.get("id") or uuid.uuid4())
    body = envelope["request"]
    if len(body) != 1:
        await send(error_envelope(request_id, 400, "request must hold exactly one variant"))
        return
    ((variant, raw_params),) = body.items()
    if request_id in tasks:
        await send(error_envelope(request_id, 400, f"request id {request_id} is already in flight"))
        return
    # The client's id names the request on this socket only; the agent sees the
    # balancer's own id, so two clients using the same id never collide there.
    internal_id = uuid.uuid4().hex
    try:
        if variant == RequestKind.EMBEDDING:
            embed_params = GenerateEmbeddingBatchParams.model_validate(raw_params)
            start(
                request_id,
                lambda: run_embedding(balancer, model_group=group, params=embed_params, request_id=internal_id),
            )
            return
        params = parse_generation_request(variant, raw_params)
    except (ValidationError, ValueError) as err:
        text = validation_message(err) if isinstance(err, ValidationError) else str(err)
        await send(error_envelope(request_id, 400, text))
        return
    start(request_id, lambda: generation_runner(balancer, group, variant, params, internal_id))


def _request_id_hint(data: str) -> str:
    """The client's request id of a message we could not parse, when it is plain to see
    (so the client can match the error to its request); "" otherwise."""
    match = _REQUEST_ID.search(data[:4096])
    return match.group(1) if match else ""
