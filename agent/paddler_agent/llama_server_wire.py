"""What the agent and a ``llama-server`` say to each other, as pure functions (no I/O):
the server's ``/props`` and ``/slots``, a request translated into ``POST /completion``,
its SSE stream translated back into Paddler's payloads, errors and embeddings.
:mod:`paddler_agent.llama_server` does the HTTP.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from paddler_agent.chat_template import ChatTemplateError, render_chat
from paddler_agent.llama.errors import RequestError
from paddler_agent.tool_calls import OutputClassifier, parse_tool_calls, prompt_opens_reasoning
from paddler_core.desired_state import (
    InferenceParameters,
    ModelSource,
)
from paddler_core.generated_output import TokenCounts, TokenKind, done, generated_token, generation_error
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    ErrorKind,
    GbnfGrammar,
    GenerationError,
    GenerationParams,
    JsonSchemaGrammar,
    ResponsePayload,
    Tool,
)
from paddler_core.protocol import GenerateMessage

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
    counts: TokenCounts = field(default_factory=TokenCounts)
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
            self.counts.add(TokenKind.CONTENT, tokens)
            return [generated_token(text)] if text else []
        pieces = self.classifier.feed(text) if text else []
        self.counts.add(pieces[0][0] if pieces else self.classifier.kind, tokens)
        return [generated_token(piece, kind) for kind, piece in pieces]

    def finish(self) -> list[Payload]:
        """The held-back text, parsed tool calls and the terminal payload."""
        final = self.final or {}
        out: list[Payload] = []
        classifier = self.classifier
        if classifier is not None:
            out += [generated_token(piece, kind) for kind, piece in classifier.finish()]
            if classifier.saw_tool_call:
                out.append(parse_tool_calls(classifier.tool_call_text, self.prepared.tools or []).payload)
        evaluated = int(final.get("tokens_evaluated") or 0)
        cached = int(final.get("tokens_cached") or 0)
        usage = self.counts.usage(prompt_tokens=evaluated, cached_prompt_tokens=min(cached, evaluated))
        stopped_by_context = (
            final.get("stop_type") == "limit" and self.predicted < self.prepared.max_tokens and bool(final)
        )
        if stopped_by_context:
            self.error_kind = ErrorKind.CONTEXT_FULL
            out.append(
                generation_error(
                    GenerationError.SAMPLER_ERROR,
                    f"context full: the server's slot context was used up after {self.predicted} generated tokens",
                )
            )
        else:
            out.append(done(usage))
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
