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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from paddler_agent.chat_template import ChatTemplateError, render_chat
from paddler_agent.engine import Engine, EngineHost, StatusBoard
from paddler_agent.llama.errors import RequestError
from paddler_agent.tool_calls import OutputClassifier, parse_tool_calls, prompt_opens_reasoning
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import (
    BalancerDesiredState,
    InferenceParameters,
    ModelSource,
)
from paddler_core.embeddings import normalize_embedding
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    EmbeddingPayload,
    ErrorKind,
    GbnfGrammar,
    GenerationError,
    GenerationParams,
    JsonSchemaGrammar,
    ResponsePayload,
    Tool,
    done_payload,
    generated_error_payload,
    token_payload,
    usage_dict,
)
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

Payload = ResponsePayload
FINAL_FIELDS = ("content", "stop", "stop_type", "tokens_predicted", "tokens_evaluated", "tokens_cached")


LlamaServerError = RequestError
"""The server answered a request with an error: the engine's own request error (``kind`` is
the payload variant, ``error_kind`` what it means to the balancer)."""


class EmbeddingError(Exception):
    """The server could not embed a batch; the message goes into ``{"Embedding": {"Error": ...}}``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---- what the server says about itself (pure) ------------------------------------------------


@dataclass(frozen=True)
class ServerProps:
    """The parts of ``GET /props`` the agent uses."""

    total_slots: int
    model_path: str
    model_alias: str = ""
    chat_template: str = ""
    bos_token: str = ""
    eos_token: str = ""
    n_ctx: int = 0
    build_info: str = ""
    slots_endpoint: bool = True

    @classmethod
    def from_json(cls, body: Any) -> ServerProps:
        if not isinstance(body, dict):
            raise ValueError(f"/props did not answer a JSON object: {str(body)[:200]}")
        total = body.get("total_slots")
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"/props has no usable total_slots: {total!r}")
        settings = body.get("default_generation_settings")
        n_ctx = settings.get("n_ctx", 0) if isinstance(settings, dict) else 0
        return cls(
            total_slots=total,
            model_path=str(body.get("model_path") or ""),
            model_alias=str(body.get("model_alias") or ""),
            chat_template=str(body.get("chat_template") or ""),
            bos_token=str(body.get("bos_token") or ""),
            eos_token=str(body.get("eos_token") or ""),
            n_ctx=int(n_ctx) if isinstance(n_ctx, int) else 0,
            build_info=str(body.get("build_info") or ""),
            slots_endpoint=bool(body.get("endpoint_slots", True)),
        )

    def metadata(self) -> dict[str, str]:
        """What ``model_metadata`` answers (the server does not expose GGUF metadata)."""
        meta = {
            "general.name": self.model_alias or PurePosixPath(self.model_path).name,
            "llama_server.model_path": self.model_path,
            "llama_server.total_slots": str(self.total_slots),
            "llama_server.n_ctx": str(self.n_ctx),
            "llama_server.build_info": self.build_info,
        }
        if self.chat_template:
            meta["tokenizer.chat_template"] = self.chat_template
        return meta


def busy_slots(body: Any) -> int:
    """Slots processing a request in a ``GET /slots`` answer."""
    if not isinstance(body, list):
        raise ValueError("/slots did not answer a list")
    return sum(1 for s in body if isinstance(s, dict) and s.get("is_processing"))


def _file_name(text: str) -> str:
    return PurePosixPath(urlsplit(text).path if "://" in text else text).name


def model_matches(source: ModelSource, server_model_path: str) -> bool:
    """Whether a desired-state model names the file the server serves. ``None`` does."""
    if source.is_none:
        return True
    served = _file_name(server_model_path)
    if source.kind == "LocalToAgent" and source.local_path is not None:
        return source.local_path == server_model_path or _file_name(source.local_path) == served
    if source.kind == "HuggingFace" and source.huggingface is not None:
        return _file_name(source.huggingface.filename) == served
    if source.kind == "Url" and source.url is not None:
        return _file_name(source.url.url) == served
    return False


# ---- request translation (pure) ----------------------------------------------------------------


def sampling_fields(params: InferenceParameters, n_ctx: int = 0) -> dict[str, Any]:
    """Per-request sampling fields of ``/completion`` for the group's parameters.
    ``penalty_last_n = -1`` (the whole context) becomes the slot's context size
    ``n_ctx``: llama-server refuses -1; without ``n_ctx`` the server's default stays."""
    fields: dict[str, Any] = {
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "repeat_penalty": params.penalty_repeat,
        "presence_penalty": params.penalty_presence,
        "frequency_penalty": params.penalty_frequency,
    }
    if params.penalty_last_n >= 0:
        fields["repeat_last_n"] = params.penalty_last_n
    elif n_ctx > 0:
        fields["repeat_last_n"] = n_ctx
    return fields


def grammar_fields(params: GenerationParams) -> dict[str, Any]:
    """``grammar`` (GBNF, root rule renamed to ``root``) or ``json_schema``; raises
    LlamaServerError for a schema that is not JSON."""
    grammar = params.grammar
    if isinstance(grammar, GbnfGrammar):
        text = grammar.grammar if grammar.root == "root" else f"root ::= {grammar.root}\n{grammar.grammar}"
        return {"grammar": text}
    if isinstance(grammar, JsonSchemaGrammar):
        try:
            schema = json.loads(grammar.schema_value)
        except json.JSONDecodeError as e:
            raise LlamaServerError(GenerationError.GRAMMAR_SYNTAX_ERROR, f"invalid JSON schema: {e}") from e
        return {"json_schema": schema}
    return {}


@dataclass(frozen=True)
class PreparedRequest:
    body: dict[str, Any]
    """The ``/completion`` request body."""
    tools: list[Tool] | None
    """Set for conversations: their output is classified (tools may be empty)."""
    starts_in_reasoning: bool = False
    max_tokens: int = 0


def prepare_completion(
    message: GenerateMessage,
    defaults: InferenceParameters,
    props: ServerProps,
    chat_template_override: str | None,
) -> PreparedRequest:
    """The ``/completion`` body for a balancer request; raises LlamaServerError."""
    params = message.params
    overrides = message.overrides
    sampling = overrides.apply(defaults) if overrides else defaults
    tools: list[Tool] | None = None
    if isinstance(params, ContinueFromRawPromptParams):
        prompt = params.raw_prompt
    else:
        prompt = render_conversation(params, props, chat_template_override)
        tools = list(params.tools)
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": params.max_tokens,
        "stream": True,
        "cache_prompt": True,
        # The last chunk otherwise echoes the prompt and every setting.
        "response_fields": list(FINAL_FIELDS),
        **sampling_fields(sampling, props.n_ctx),
        **grammar_fields(params),
    }
    if overrides is not None and overrides.seed is not None:
        body["seed"] = overrides.seed
    if overrides is not None and overrides.stop:
        body["stop"] = list(overrides.stop)
    return PreparedRequest(
        body=body,
        tools=tools,
        starts_in_reasoning=tools is not None and prompt_opens_reasoning(prompt),
        max_tokens=params.max_tokens,
    )


def render_conversation(params: ContinueFromConversationHistoryParams, props: ServerProps, override: str | None) -> str:
    if params.grammar is not None and params.enable_thinking:
        raise LlamaServerError(
            GenerationError.GRAMMAR_INCOMPATIBLE_WITH_THINKING,
            "a grammar cannot be combined with enable_thinking; disable thinking to use it",
        )
    template = override or props.chat_template
    if not template:
        raise LlamaServerError(
            GenerationError.CHAT_TEMPLATE_ERROR,
            "the server's model has no chat template and no chat template override is set",
        )
    try:
        text = render_chat(
            template,
            params.conversation_history,
            add_generation_prompt=params.add_generation_prompt,
            enable_thinking=params.enable_thinking,
            tools=params.tools,
            bos_token=props.bos_token,
            eos_token=props.eos_token,
        )
    except ChatTemplateError as e:
        raise LlamaServerError(GenerationError.CHAT_TEMPLATE_ERROR, str(e)) from e
    # llama-server tokenizes the prompt with the model's own BOS rule; a template
    # that writes the BOS text too would double it.
    if props.bos_token and text.startswith(props.bos_token):
        text = text[len(props.bos_token) :]
    return text


def error_of_response(status: int, text: str) -> LlamaServerError:
    """A non-200 answer of ``/completion`` or ``/embedding`` as a payload error."""
    message = text.strip()[:500]
    kind = ""
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            message = str(error.get("message", message))
            kind = str(error.get("type", ""))
    return error_of_server(status, kind, message)


def error_of_server(status: int, kind: str, message: str) -> LlamaServerError:
    if kind == "exceed_context_size_error":
        text = f"context full: the prompt does not fit the server's context: {message}"
        return LlamaServerError(GenerationError.SAMPLER_ERROR, text, ErrorKind.PROMPT_EXCEEDS_CONTEXT)
    lowered = message.lower()
    if "schema" in lowered:  # a JSON schema that cannot become a grammar
        return LlamaServerError(GenerationError.GRAMMAR_SYNTAX_ERROR, message)
    if "grammar" in lowered:  # a GBNF grammar llama.cpp refuses: Paddler 4.1's name
        return LlamaServerError(GenerationError.GRAMMAR_INITIALIZATION_FAILED, message)
    if status == 400 or kind == "invalid_request_error":
        return LlamaServerError(GenerationError.SAMPLER_ERROR, f"invalid request: {message}", ErrorKind.INVALID_REQUEST)
    return LlamaServerError(GenerationError.SAMPLER_ERROR, f"llama-server answered HTTP {status}: {message}")


@dataclass
class StreamTranslator:
    """Turns the chunks of one ``/completion`` stream into Paddler payloads."""

    prepared: PreparedRequest
    classifier: OutputClassifier | None = None
    counts: dict[str, int] = field(default_factory=dict)
    predicted: int = 0
    """``tokens_predicted`` of the last chunk: the server's own count."""
    final: dict[str, Any] | None = None
    error_kind: ErrorKind | None = None
    """Set by :meth:`finish` when the terminal payload is an error the balancer must read."""

    def __post_init__(self) -> None:
        if self.prepared.tools is not None:
            self.classifier = OutputClassifier(
                tools=bool(self.prepared.tools), start_in_reasoning=self.prepared.starts_in_reasoning
            )

    def feed(self, chunk: Mapping[str, Any]) -> list[Payload]:
        """Payloads for one chunk; raises LlamaServerError for an error chunk."""
        error = chunk.get("error")
        if error is not None:
            if isinstance(error, dict):
                code = int(error.get("code", 500))
                raise error_of_server(code, str(error.get("type", "")), str(error.get("message")))
            raise LlamaServerError(GenerationError.SAMPLER_ERROR, f"llama-server: {error}")
        text = str(chunk.get("content") or "")
        predicted = chunk.get("tokens_predicted")
        new_tokens = 0
        if isinstance(predicted, int) and predicted > self.predicted:
            new_tokens = predicted - self.predicted
            self.predicted = predicted
        out = self._classify(text, new_tokens)
        if chunk.get("stop"):
            self.final = dict(chunk)
        return out

    def _classify(self, text: str, tokens: int) -> list[Payload]:
        if self.classifier is None:
            self._count("ContentToken", tokens)
            return [token_payload(text)] if text else []
        pieces = self.classifier.feed(text) if text else []
        self._count(pieces[0][0] if pieces else self.classifier.kind, tokens)
        return [token_payload(piece, kind) for kind, piece in pieces]

    def _count(self, kind: str, tokens: int) -> None:
        if tokens:
            self.counts[kind] = self.counts.get(kind, 0) + tokens

    def finish(self) -> list[Payload]:
        """The held-back text, parsed tool calls and the terminal payload."""
        final = self.final or {}
        out: list[Payload] = []
        classifier = self.classifier
        if classifier is not None:
            out += [token_payload(piece, kind) for kind, piece in classifier.finish()]
            if classifier.saw_tool_call:
                out.append(parse_tool_calls(classifier.tool_call_text, self.prepared.tools or []).payload)
        evaluated = int(final.get("tokens_evaluated") or 0)
        cached = int(final.get("tokens_cached") or 0)
        usage = usage_dict(
            prompt_tokens=evaluated,
            cached_prompt_tokens=min(cached, evaluated),
            content_tokens=self.counts.get("ContentToken", 0),
            reasoning_tokens=self.counts.get("ReasoningToken", 0),
            tool_call_tokens=self.counts.get("ToolCallToken", 0),
        )
        stopped_by_context = (
            final.get("stop_type") == "limit" and self.predicted < self.prepared.max_tokens and bool(final)
        )
        if stopped_by_context:
            self.error_kind = ErrorKind.CONTEXT_FULL
            out.append(
                generated_error_payload(
                    GenerationError.SAMPLER_ERROR,
                    f"context full: the server's slot context was used up after {self.predicted} generated tokens",
                )
            )
        else:
            out.append(done_payload(usage))
        return out


def embedding_vectors(body: Any, count: int) -> list[list[float]]:
    """The pooled vector of each document of a ``POST /embedding`` answer, in order."""
    items = body if isinstance(body, list) else [body]
    if len(items) != count:
        raise EmbeddingError(f"llama-server returned {len(items)} embeddings for {count} documents")
    ordered = sorted(items, key=lambda item: int(item.get("index", 0)) if isinstance(item, dict) else 0)
    vectors: list[list[float]] = []
    for item in ordered:
        value = item.get("embedding") if isinstance(item, dict) else None
        if isinstance(value, list) and value and isinstance(value[0], list):
            if len(value) != 1:
                raise EmbeddingError(
                    "llama-server returned one vector per token (pooling none); start it with --pooling mean or last",
                )
            value = value[0]
        if not isinstance(value, list):
            raise EmbeddingError("llama-server returned no embedding vector")
        vectors.append([float(v) for v in value])
    return vectors


def sse_data(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one SSE ``data:`` line; None for other lines and ``[DONE]``."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):
        return None  # blank separators, ":" pings
    data = text[5:].strip()
    if data == "[DONE]":
        return None
    try:
        decoded = json.loads(data)
    except json.JSONDecodeError as e:
        raise LlamaServerError(
            GenerationError.SAMPLER_ERROR, f"llama-server sent a line that is not JSON: {data[:200]}"
        ) from e
    return decoded if isinstance(decoded, dict) else None


async def sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    """JSON objects of an SSE stream's ``data:`` lines, whatever their length (aiohttp's
    own line reader refuses lines over 64 KiB)."""
    pending = b""
    async for block in content.iter_any():
        pending += block
        *lines, pending = pending.split(b"\n")
        for line in lines:
            event = sse_data(line)
            if event is not None:
                yield event
    event = sse_data(pending)
    if event is not None:
        yield event


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
            self._emit(rid, generated_error_payload(e.kind, e.message), True, e.error_kind)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("llama-server stream broke request_id=%s error=%r", rid, e)
            self._wake.set()
            text = f"llama-server at {self.url} failed during the request: {_describe(e)}"
            self._emit(rid, generated_error_payload(GenerationError.SAMPLER_ERROR, text), True)

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
            for doc, vector in zip(documents, vectors, strict=True):
                payload: EmbeddingPayload = {
                    "Embedding": {
                        "Embedding": {
                            "embedding": normalize_embedding(vector, method),
                            "normalization_method": method.model_dump(),
                            "pooling_type": self._defaults.pooling_type.value,
                            "source_document_id": doc.id,
                        }
                    }
                }
                self._emit(rid, payload, False)
            self._emit(rid, {"Embedding": "Done"}, True)
        except (EmbeddingError, LlamaServerError) as e:
            self._emit(rid, {"Embedding": {"Error": e.message}}, True)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._wake.set()
            self._emit(rid, {"Embedding": {"Error": f"llama-server at {self.url} failed: {_describe(e)}"}}, True)

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
