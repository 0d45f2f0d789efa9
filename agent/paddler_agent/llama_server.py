"""LlamaServerEngine: the agent's slots are those of an existing ``llama-server``.

For teams that already run llama.cpp's own server (a CUDA, ROCm, Vulkan or Metal
build they trust): the agent sits beside one server, registers with the balancer
like any agent, and forwards the balancer's requests to it over HTTP.

What comes from the server
--------------------------
* **Readiness**: ``GET /health`` every :data:`POLL_INTERVAL_S`. A server that does not
  answer (dead, restarting) or answers non-200 (loading its model) is an agent issue
  (``LlamaServerUnreachable`` / ``LlamaServerNotReady``) and ``slots_total`` drops to 0,
  so its slots leave the pool and the balancer buffers requests until it is back. A
  stream that breaks wakes the poller at once.
* **Slots**: ``GET /props`` (``total_slots``, the model path, chat template, BOS/EOS),
  read again every time the server becomes ready (a restart may change them).
  ``--slots`` on the agent is optional and caps how many of them the balancer uses.
* **Busy slots**: ``GET /slots`` (``is_processing``) when the server exposes it. With
  ``--no-slots`` it answers 501; the agent then reports only its own in-flight
  requests as busy (it cannot see other clients of the same server). Routing never
  depends on it: the balancer counts its own in-flight requests against
  ``slots_total``.

Requests
--------
Both request variants go to ``POST /completion`` with ``stream: true``. A conversation
is rendered here with the agent's chat template module (the server's template from
``/props``, or the desired state's override) and its output classified into content,
reasoning and tool-call tokens, exactly like the built-in engine, so every balancer
API (native, OpenAI chat/completions with tools, grammars) behaves the same in front
of either engine. Each streamed chunk becomes one ``GeneratedToken`` payload; the
final chunk's counters become ``Done``'s usage. Embeddings go to ``POST /embedding``
(the server needs ``--embeddings``; otherwise the request ends with the server's
own message).

Cancel: ``stop`` cancels the request's task, which closes its HTTP connection;
llama-server notices the closed stream and frees the slot.

Desired state
-------------
The model is the server's. A desired-state model that names the server's file (same
path or file name) is applied; any other model is reported as not applicable
(``ModelNotApplicableToLlamaServer`` issue, ``AttemptedAndNotAppliable``) while the
server's model keeps serving. ``"None"`` means "whatever the server serves". Sampling
parameters (temperature, top-k/p, min-p, penalties, seed, stop strings) become
per-request fields; engine parameters (context size, batch, KV cache types, GPU
layers, embeddings, pooling) are the server's own flags and are ignored here.

``host_header`` rewrites the Host header of every request, for servers behind a
proxy that routes by virtual host.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from dataclasses import replace
from typing import Any

import aiohttp

from paddler_agent.engine import Engine, EngineHost, StatusBoard
from paddler_agent.llama_server_wire import (
    EmbeddingError,
    LlamaServerError,
    Payload,
    ServerProps,
    StreamTranslator,
    busy_slots,
    embedding_vectors,
    error_of_response,
    model_matches,
    prepare_completion,
    sse_events,
)
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import (
    BalancerDesiredState,
    InferenceParameters,
    ModelSource,
)
from paddler_core.embeddings import normalize_embedding
from paddler_core.generated_output import embedding, embedding_done, embedding_error, generation_error
from paddler_core.inference import ErrorKind, GenerationError
from paddler_core.protocol import AgentIssue, EmbedMessage, GenerateMessage, StateApplicationStatus

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
"""How often the agent reads ``/health`` (and ``/slots``) while nothing else happens."""
PROBE_TIMEOUT_S = 5.0
READINESS_CHECK_TIMEOUT_S = 2.0
"""Seconds the agent's ``/ready`` waits for llama-server's ``/health`` (within the kubelet's probe timeout)."""
CONNECT_TIMEOUT_S = 5.0
STREAM_READ_TIMEOUT_S = 600.0
"""No byte from the server for this long ends a request (the balancer's own item
timeout, 30 s by default, normally fires first)."""

_SERVER_ISSUES = {AgentIssueVariant.LLAMA_SERVER_UNREACHABLE, AgentIssueVariant.LLAMA_SERVER_NOT_READY}

# ---- the engine --------------------------------------------------------------------------------


class LlamaServerEngine(Engine):
    """Slots of one llama-server; see the module docstring."""

    def __init__(
        self,
        host: EngineHost,
        board: StatusBoard,
        slots: int | None,
        *,
        url: str,
        host_header: str | None = None,
        api_key: str | None = None,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        super().__init__(host, board, slots or 0)
        self.slot_cap = slots
        """``--slots`` on the agent: use at most this many of the server's slots."""
        self.url = url.rstrip("/")
        self.poll_interval_s = poll_interval_s
        headers: dict[str, str] = {}
        if host_header:
            headers["Host"] = host_header
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=STREAM_READ_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=0),
        )
        self.props: ServerProps | None = None
        self._defaults = InferenceParameters()
        self._template_override: str | None = None
        self._desired_model = ModelSource.none()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._server_busy = 0
        self._wake = asyncio.Event()
        self._closed = False
        board.state_application_status = StateApplicationStatus.FRESH
        self._monitor = asyncio.get_running_loop().create_task(self._watch(), name="llama-server-monitor")

    # -- requests -----------------------------------------------------------------------------

    def generate(self, message: GenerateMessage) -> None:
        self._start(message.request_id, self._generate(message))

    def embed(self, message: EmbedMessage) -> None:
        self._start(message.request_id, self._embed(message))

    def _start(self, request_id: str, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"llama-server-request-{request_id}")
        self._tasks[request_id] = task
        task.add_done_callback(functools.partial(self._finished, request_id))
        self._busy_changed()

    def _finished(self, request_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id]
            self._busy_changed()

    def stop(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # closes the HTTP stream: llama-server frees the slot
            self._busy_changed()

    def _emit(self, request_id: str, payload: Payload, final: bool, error_kind: ErrorKind | None = None) -> None:
        if request_id in self._tasks:
            self.host.emit(request_id, payload, final, error_kind)

    async def _generate(self, message: GenerateMessage) -> None:
        rid = message.request_id
        try:
            props = self._serving_props()
            prepared = prepare_completion(message, self._defaults, props, self._template_override)
            translator = StreamTranslator(prepared)
            async with self._session.post(f"{self.url}/completion", json=prepared.body) as response:
                if response.status != 200:
                    raise error_of_response(response.status, await response.text())
                try:
                    async for chunk in sse_events(response.content):
                        for payload in translator.feed(chunk):
                            self._emit(rid, payload, False)
                        if translator.final is not None:
                            break
                except asyncio.CancelledError:
                    response.close()  # drop the connection: llama-server stops and frees the slot
                    raise
            if translator.final is None:
                raise LlamaServerError(
                    GenerationError.SAMPLER_ERROR, "llama-server ended the stream before the last token"
                )
            *body, last = translator.finish()
            for payload in body:
                self._emit(rid, payload, False)
            self._emit(rid, last, True, translator.error_kind)
        except LlamaServerError as e:
            log.info("request failed request_id=%s kind=%s error=%s", rid, e.kind, e.message)
            self._emit(rid, generation_error(e.kind, e.message), True, e.error_kind)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("llama-server stream broke request_id=%s error=%r", rid, e)
            self._wake.set()
            text = f"llama-server at {self.url} failed during the request: {_describe(e)}"
            self._emit(rid, generation_error(GenerationError.SAMPLER_ERROR, text), True)

    async def _embed(self, message: EmbedMessage) -> None:
        rid = message.request_id
        try:
            self._serving_props()
            params = message.params
            documents = params.input_batch
            body = {"content": [d.content for d in documents], "embd_normalize": -1}
            async with self._session.post(f"{self.url}/embedding", json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise EmbeddingError(error_of_response(response.status, text).message)
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError as e:
                raise EmbeddingError(f"llama-server answered something that is not JSON: {e}") from e
            vectors = embedding_vectors(decoded, len(documents))
            method = params.normalization_method
            pooling = self._defaults.pooling_type.value
            for doc, vector in zip(documents, vectors, strict=True):
                self._emit(rid, embedding(doc.id, normalize_embedding(vector, method), method, pooling), False)
            self._emit(rid, embedding_done(), True)
        except (EmbeddingError, LlamaServerError) as e:
            self._emit(rid, embedding_error(e.message), True)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._wake.set()
            self._emit(rid, embedding_error(f"llama-server at {self.url} failed: {_describe(e)}"), True)

    def _serving_props(self) -> ServerProps:
        props = self.props
        if props is None or self.board.slots_total == 0:
            raise LlamaServerError(
                GenerationError.SAMPLER_ERROR, f"llama-server at {self.url} is not serving; see the agent's issues"
            )
        return props

    def model_metadata(self) -> dict[str, str] | None:
        return self.props.metadata() if self.props is not None else None

    # -- desired state ------------------------------------------------------------------------

    async def apply_desired_state(self, state: BalancerDesiredState) -> None:
        self._defaults = state.inference_parameters
        override = state.chat_template_override
        self._template_override = override.content if state.use_chat_template_override and override else None
        self._desired_model = state.model
        self._judge_model()

    def _judge_model(self) -> None:
        """Applied when the desired model is the server's (or None); otherwise an issue."""
        board = self.board
        props = self.props
        if props is None:
            return  # judged once the server has answered /props
        board.issues = [i for i in board.issues if i.variant != AgentIssueVariant.MODEL_NOT_APPLICABLE_TO_LLAMA_SERVER]
        source = self._desired_model
        if model_matches(source, props.model_path):
            board.state_application_status = StateApplicationStatus.APPLIED
        else:
            message = (
                f"the desired model {source.describe()!r} cannot be loaded by this agent: it forwards to "
                f"llama-server at {self.url}, which serves {props.model_path!r}. Change the server's --model "
                "(or the desired state) instead; the server's model keeps serving"
            )
            board.issues.append(
                AgentIssue(variant=AgentIssueVariant.MODEL_NOT_APPLICABLE_TO_LLAMA_SERVER, params={"message": message})
            )
            board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
            log.warning("desired model not applicable desired=%s served=%s", source.describe(), props.model_path)
        self.host.status_changed()

    # -- watching the server ------------------------------------------------------------------

    async def backend_problem(self) -> str | None:
        """Asks llama-server's ``/health`` now (the agent's ``/ready``); a failure also wakes the
        poller, so the slots leave the pool at once rather than at its next turn."""
        try:
            timeout = aiohttp.ClientTimeout(total=READINESS_CHECK_TIMEOUT_S)
            async with self._session.get(f"{self.url}/health", timeout=timeout) as response:
                if response.status == 200:
                    return None
                detail = error_of_response(response.status, await response.text()).message
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            detail = _describe(e)
        self._wake.set()
        return f"llama-server at {self.url} does not answer /health: {detail}"

    async def _watch(self) -> None:
        while not self._closed:
            await self._poll_once()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()

    async def _poll_once(self) -> None:
        try:
            async with self._session.get(f"{self.url}/health", timeout=_probe_timeout()) as response:
                if response.status != 200:
                    detail = error_of_response(response.status, await response.text()).message
                    self._server_down(
                        AgentIssueVariant.LLAMA_SERVER_NOT_READY, f"llama-server at {self.url} is not ready: {detail}"
                    )
                    return
            if self.props is None or self.board.slots_total == 0:
                self._server_up(await self._read_props())
            if self.props is not None and self.props.slots_endpoint:
                await self._read_slots()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            self._server_down(
                AgentIssueVariant.LLAMA_SERVER_UNREACHABLE, f"llama-server at {self.url} is unreachable: {_describe(e)}"
            )

    async def _read_props(self) -> ServerProps:
        async with self._session.get(f"{self.url}/props", timeout=_probe_timeout()) as response:
            if response.status != 200:
                raise ValueError(f"/props answered HTTP {response.status}")
            return ServerProps.from_json(await response.json(content_type=None))

    async def _read_slots(self) -> None:
        async with self._session.get(f"{self.url}/slots", timeout=_probe_timeout()) as response:
            if response.status == 501 and self.props is not None:
                log.info("llama-server has no /slots endpoint (HTTP 501); busy slots are the agent's own requests")
                self.props = _without_slots_endpoint(self.props)
                busy = 0
            elif response.status != 200:
                return  # e.g. an API key that does not cover /slots: keep the last value
            else:
                busy = busy_slots(await response.json(content_type=None))
        if busy != self._server_busy:
            self._server_busy = busy
            self._busy_changed()

    def _server_up(self, props: ServerProps) -> None:
        previous = self.props
        self.props = props
        slots = min(props.total_slots, self.slot_cap) if self.slot_cap else props.total_slots
        self.slots = slots
        board = self.board
        board.issues = [i for i in board.issues if i.variant not in _SERVER_ISSUES]
        board.slots_total = slots
        board.desired_slots_total = slots
        board.model_path = props.model_path
        if not props.slots_endpoint:
            log.info("llama-server has no /slots endpoint (--no-slots); busy slots are the agent's own requests")
        if previous is None or previous.model_path != props.model_path:
            log.info("llama-server ready url=%s model=%s slots=%d", self.url, props.model_path, slots)
        else:
            log.info("llama-server back url=%s slots=%d", self.url, slots)
        self._judge_model()
        self.host.status_changed()

    def _server_down(self, variant: AgentIssueVariant, message: str) -> None:
        board = self.board
        known = [i for i in board.issues if i.variant in _SERVER_ISSUES]
        if board.slots_total == 0 and known and known[0].variant == variant:
            return
        if board.slots_total:
            log.warning("llama-server unavailable, its slots leave the pool: %s", message)
        board.slots_total = 0
        self._server_busy = 0
        board.issues = [i for i in board.issues if i.variant not in _SERVER_ISSUES]
        board.issues.append(AgentIssue(variant=variant, params={"message": message, "url": self.url}))
        self._busy_changed()
        self.host.status_changed()

    def _busy_changed(self) -> None:
        busy = max(len(self._tasks), self._server_busy)
        if busy != self.board.slots_processing:
            self.board.slots_processing = busy
            self.host.status_changed()

    async def close(self) -> None:
        self._closed = True
        tasks = [self._monitor, *self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._session.close()


def _probe_timeout() -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)


def _without_slots_endpoint(props: ServerProps) -> ServerProps:
    return replace(props, slots_endpoint=False)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
