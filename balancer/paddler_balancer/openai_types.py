"""OpenAI-compatible API: request models, the mapping to Paddler requests, and
response builders. Pure (no I/O): everything here is tested with tables.

Decisions (see docs in ``openai_api``):

* ``model`` is a model group name; a group's model display names (the desired
  state's model description, its file name and file stem, its Hugging Face repo
  id) are accepted too. While the pool serves one group, any name (or none) is
  served by it (clients hard-code names; Paddler ignores the field); with several,
  an unknown name is a 404 listing them.
* Unsupported features fail loudly with 400 (``n > 1``, logprobs, ``echo``,
  token-id prompts) instead of being silently ignored.
* ``tool_choice`` ``"required"`` or a named function forces the call with a JSON
  schema grammar; the balancer parses the JSON output into ``tool_calls``.
  ``"auto"`` hands the tools to the agent's chat template; the agent reports
  parsed calls as ``ToolCallParsed``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from paddler_core.desired_state import BalancerDesiredState, SamplingOverrides
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    ConversationMessage,
    EmbeddingInputDocument,
    GbnfGrammar,
    GenerateEmbeddingBatchParams,
    GrammarConstraint,
    JsonSchemaGrammar,
    Tool,
    image_url_problem,
)
from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json

# ---- errors ---------------------------------------------------------------------------------

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    502: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """A request outcome with its HTTP status, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(err: ValidationError) -> OpenAIError:
    """400 naming the first offending field (``messages.0.role``) and listing all problems."""
    problems = err.errors(include_url=False)
    parts = []
    for problem in problems:
        loc = ".".join(str(p) for p in problem["loc"]) or "body"
        parts.append(f"{loc}: {problem['msg']}")
    first = ".".join(str(p) for p in problems[0]["loc"]) if problems else None
    return OpenAIError(400, "invalid request: " + "; ".join(parts), code="invalid_request", param=first or None)


def parse_body(raw: bytes | bytearray) -> dict[str, Any]:
    """The JSON object of a request body; raises a 400 OpenAIError otherwise (not JSON,
    not UTF-8, non-finite or huge numbers, deep nesting, lone surrogates)."""
    try:
        body = parse_untrusted_json(raw)
    except UntrustedJsonError as err:
        raise OpenAIError(400, str(err), code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
    return body


# ---- requests -------------------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown fields (``user``, ``metadata``, ``store``...) are accepted and ignored,
    # as OpenAI clients send them freely.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageUrlSpec(_Model):
    url: str

    @field_validator("url")
    @classmethod
    def _usable(cls, url: str) -> str:
        problem = image_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageUrlSpec


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str = "{}"


class ToolCall(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Model):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_value: Annotated[dict[str, Any], Field(alias="schema")]
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Model):
    include_usage: StrictBool = False


class _SamplingRequest(_Model):
    model: str | None = None
    max_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2.0, le=2.0)] = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None
    logprobs: None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Model):
    model: str | None = None
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=2048)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---- model groups ---------------------------------------------------------------------------


def model_aliases(state: BalancerDesiredState) -> set[str]:
    """Display names a group's model answers to besides the group name: its
    description, file name, file stem and Hugging Face repo id."""
    source = state.model
    if source.is_none:
        return set()
    described = source.describe()
    names = {described}
    path = source.huggingface.filename if source.huggingface is not None else described
    name = PurePosixPath(path.rstrip("/")).name
    if name:
        names.add(name)
        names.add(name.removesuffix(".gguf"))
    if source.huggingface is not None:
        names.add(source.huggingface.repo_id)
    return names


def served_groups(stored: dict[str, BalancerDesiredState], with_agents: set[str], default: str) -> list[str]:
    """Groups that /v1/models lists: every group with desired state or agents; the
    default group also when it is the only one (a fresh balancer)."""
    groups = set(stored) | with_agents
    return sorted(groups) if groups else [default]


def resolve_model(requested: str | None, served: list[str], states: dict[str, BalancerDesiredState]) -> str:
    """The model group that serves ``requested``; raises OpenAIError 400/404."""
    if not requested:
        if len(served) == 1:
            return served[0]
        raise OpenAIError(
            400,
            f"model is required: this pool serves several models ({', '.join(served)})",
            code="model_required",
            param="model",
        )
    if requested in served:
        return requested
    matches = [g for g in served if requested in model_aliases(states.get(g, BalancerDesiredState()))]
    if len(matches) == 1:
        return matches[0]
    if not matches and len(served) == 1:
        return served[0]  # one group serves any name, as Paddler ignores the field
    if len(matches) > 1:
        raise OpenAIError(
            400,
            f"model {requested!r} is ambiguous: groups {', '.join(matches)} serve it; use a group name",
            code="model_ambiguous",
            param="model",
        )
    raise OpenAIError(
        404,
        f"The model {requested!r} does not exist; this pool serves: {', '.join(served)}",
        code="model_not_found",
        param="model",
    )


def models_list(served: list[str], states: dict[str, BalancerDesiredState], created: int) -> dict[str, Any]:
    data = []
    for group in served:
        state = states.get(group, BalancerDesiredState())
        data.append(
            {
                "id": group,
                "object": "model",
                "created": created,
                "owned_by": "paddler",
                "root": None if state.model.is_none else state.model.describe(),
            }
        )
    return {"object": "list", "data": data}


# ---- request mapping ------------------------------------------------------------------------

# JSON value grammar (llama.cpp's json.gbnf with an object root and at most one space
# between tokens, so small models cannot loop on whitespace).
JSON_OBJECT_GBNF = r"""root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9] [0-9]{0,15} )? ws
ws ::= " "?
"""


def sampling_overrides(req: _SamplingRequest) -> SamplingOverrides | None:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    fields: dict[str, Any] = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": stop or None,
        "penalty_presence": req.presence_penalty,
        "penalty_frequency": req.frequency_penalty,
    }
    present = {k: v for k, v in fields.items() if v is not None}
    return SamplingOverrides(**present) if present else None


def _message_text(content: str | list[ContentPart] | None) -> str | list[dict[str, Any]] | None:
    """Text-only content becomes one string (what chat templates expect); image parts
    keep the list shape for multimodal agents."""
    if content is None or isinstance(content, str):
        return content
    if all(isinstance(p, TextPart) for p in content):
        return "".join(p.text for p in content if isinstance(p, TextPart))
    return [p.model_dump() for p in content]


def _arguments_value(arguments: str) -> Any:
    """Tool-call arguments as the object chat templates iterate over, when they are JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def conversation(messages: list[ChatMessage]) -> list[ConversationMessage]:
    out = []
    for m in messages:
        entry: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": _message_text(m.content) or "",
        }
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)},
                }
                for c in m.tool_calls
            ]
        out.append(ConversationMessage.model_validate(entry))
    return out


def _tool_call_schema(tool: ToolDefinition) -> dict[str, Any]:
    parameters = tool.function.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_tools(req: ChatCompletionRequest) -> list[ToolDefinition]:
    """The tools the model must choose from (``required`` or a named function); empty
    when the model is free to answer in text."""
    tools = req.tools or []
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise OpenAIError(
                400,
                f"tool_choice names function {choice.function.name!r}, which is not in tools",
                code="invalid_tool_choice",
                param="tool_choice",
            )
        return named
    if choice == "required":
        if not tools:
            raise OpenAIError(400, 'tool_choice "required" needs tools', code="invalid_tool_choice", param="tools")
        return tools
    return []


def chat_grammar(req: ChatCompletionRequest, forced: list[ToolDefinition]) -> GrammarConstraint | None:
    fmt = req.response_format
    wants_json = fmt is not None and fmt.type != "text"
    if forced:
        if wants_json:
            raise OpenAIError(
                400,
                "response_format cannot be combined with a forced tool_choice",
                code="invalid_request",
                param="response_format",
            )
        schemas = [_tool_call_schema(t) for t in forced]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return JsonSchemaGrammar(schema_value=json.dumps(schema))
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return GbnfGrammar(grammar=JSON_OBJECT_GBNF)
    if fmt.json_schema is None:
        raise OpenAIError(
            400, 'response_format "json_schema" needs a json_schema object', param="response_format.json_schema"
        )
    return JsonSchemaGrammar(schema_value=json.dumps(fmt.json_schema.schema_value))


def chat_params(req: ChatCompletionRequest, default_max_tokens: int) -> tuple[dict[str, Any], list[ToolDefinition]]:
    """Native ContinueFromConversationHistory params (as JSON) and the forced tools."""
    forced = forced_tools(req)
    grammar = chat_grammar(req, forced)
    # Forced calls keep the tools in the prompt (the template describes them) and add
    # the grammar; the agent may parse the call itself, else the balancer parses it.
    offered = [] if req.tool_choice == "none" else (req.tools or [])
    params = ContinueFromConversationHistoryParams(
        conversation_history=conversation(req.messages),
        max_tokens=req.token_limit or default_max_tokens,
        grammar=grammar,
        tools=[Tool.model_validate(t.model_dump(exclude_none=True)) for t in offered],
    )
    return params.model_dump(mode="json", by_alias=True, exclude_none=True), forced


def completion_params(req: CompletionRequest, default_max_tokens: int) -> dict[str, Any]:
    params = ContinueFromRawPromptParams(raw_prompt=req.prompt_text, max_tokens=req.max_tokens or default_max_tokens)
    return params.model_dump(mode="json", by_alias=True, exclude_none=True)


def embedding_params(req: EmbeddingRequest) -> GenerateEmbeddingBatchParams:
    docs = [EmbeddingInputDocument(id=str(i), content=text) for i, text in enumerate(req.inputs)]
    return GenerateEmbeddingBatchParams.model_validate({"input_batch": docs, "normalization_method": "L2"})


# ---- agent payloads -------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    text: str
    kind: Literal["content", "reasoning", "tool_call"]


@dataclass(frozen=True)
class ToolCalls:
    calls: list[dict[str, Any]]


@dataclass(frozen=True)
class Done:
    usage: dict[str, int]


@dataclass(frozen=True)
class AgentError:
    kind: str
    message: str


@dataclass(frozen=True)
class ToolCallFailed:
    """The model wrote a tool call the agent could not parse or validate."""

    kind: str
    message: str


Event = Token | ToolCalls | ToolCallFailed | Done | AgentError

_TOKEN_KINDS: dict[str, Literal["content", "reasoning", "tool_call"]] = {
    "ContentToken": "content",
    "UndeterminableToken": "content",
    "ReasoningToken": "reasoning",
    "ToolCallToken": "tool_call",
}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """One Paddler ``ToolCallParsed`` entry as an OpenAI ``tool_calls`` entry."""
    arguments = call.get("arguments")
    if isinstance(arguments, dict) and "ValidJson" in arguments:
        text = json.dumps(arguments["ValidJson"])
    elif isinstance(arguments, dict) and "InvalidJson" in arguments:
        text = str(arguments["InvalidJson"])
    else:
        text = json.dumps(arguments if arguments is not None else {})
    return {
        "index": index,
        "id": str(call.get("id") or new_call_id()),
        "type": "function",
        "function": {"name": str(call.get("name", "")), "arguments": text},
    }


def classify(payload: Any) -> Event:
    """One generation payload from an agent as an event; unknown shapes are errors."""
    gen = payload.get("GeneratedToken") if isinstance(payload, dict) else None
    if not isinstance(gen, dict) or len(gen) != 1:
        return AgentError("UnknownPayload", f"unexpected payload from the agent: {payload!r}")
    ((key, value),) = gen.items()
    if key in _TOKEN_KINDS:
        return Token(str(value), _TOKEN_KINDS[key])
    if key == "Done":
        usage = value.get("usage", {}) if isinstance(value, dict) else {}
        return Done({k: int(v) for k, v in usage.items() if isinstance(v, int)})
    if key == "ToolCallParsed" and isinstance(value, list):
        return ToolCalls([openai_tool_call(c, i) for i, c in enumerate(value) if isinstance(c, dict)])
    if key == "UnrecognizedToolCallFormat" and isinstance(value, dict):
        return Token(str(value.get("text", "")), "content")
    if key in ("ToolCallParseFailed", "ToolCallValidationFailed"):
        return ToolCallFailed(key, value if isinstance(value, str) else json.dumps(value))
    return AgentError(key, value if isinstance(value, str) else json.dumps(value))


_AGENT_ERROR_STATUS: dict[str, int] = {
    "ChatTemplateError": 400,
    "GrammarSyntaxError": 400,
    "GrammarInitializationFailed": 400,
    "GrammarIncompatibleWithThinking": 400,
    "ToolCallValidatorBuildFailed": 400,
    "ImageDecodingFailed": 400,
    "MultimodalNotSupported": 400,
    "ImageExceedsBatchSize": 400,
    "MediaExceedsMicroBatch": 400,
    "MultimodalTokenizationFailed": 400,
}


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def agent_error(error: AgentError) -> OpenAIError:
    """A terminal error payload from the agent as an HTTP outcome. Request problems
    (template, grammar, prompt too long) are 400; model/engine failures are 502."""
    status = _AGENT_ERROR_STATUS.get(error.kind, 502)
    code = _snake(error.kind)
    message = error.message
    prompt_too_long = message.startswith("context full: the prompt")
    if error.kind == "SamplerError" and (prompt_too_long or message.startswith("invalid request")):
        status = 400
        code = "context_length_exceeded" if prompt_too_long else "invalid_request"
    return OpenAIError(status, f"{error.kind}: {message}", code=code)


def is_length_stop(error: AgentError, tokens: int) -> bool:
    """The agent ran out of context after generating: OpenAI reports finish_reason "length"."""
    return error.kind == "SamplerError" and error.message.startswith("context full") and tokens > 0


def embedding_failure(payload: Any) -> OpenAIError | None:
    """None for an embedding or Done payload; the OpenAI error for anything else."""
    emb = payload.get("Embedding") if isinstance(payload, dict) else None
    if emb == "Done" or (isinstance(emb, dict) and "Embedding" in emb):
        return None
    if isinstance(emb, dict) and isinstance(emb.get("DocumentExceedsBatchSize"), dict):
        details = emb["DocumentExceedsBatchSize"]
        index = details.get("source_document_id")
        return OpenAIError(
            400,
            f"input {index} has {details.get('document_tokens')} tokens; "
            f"the model embeds at most {details.get('n_batch')} tokens per input (n_batch)",
            code="context_length_exceeded",
            param=f"input.{index}",
        )
    if emb == "EmbeddingRejectedDueToActiveTokenGeneration":
        return OpenAIError(503, "the agent is busy generating; retry", code="embedding_rejected")
    if isinstance(emb, dict) and "Error" in emb:
        return OpenAIError(400, f"embedding failed: {emb['Error']}", code="embedding_error")
    return OpenAIError(502, f"no embeddings produced: {payload!r}", code="no_embeddings")


# ---- responses ------------------------------------------------------------------------------


@dataclass
class Accumulated:
    """What one generation produced so far, built from events."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_text: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tokens: int = 0
    usage: dict[str, int] | None = None
    length_stop: bool = False

    def add(self, event: Event) -> Token | None:
        """Record ``event``; a failed tool call comes back as the content token that
        replaces it (its raw text, as llama-server falls back to content)."""
        if isinstance(event, Token):
            self.tokens += 1
            if event.kind == "content":
                self.content.append(event.text)
            elif event.kind == "reasoning":
                self.reasoning.append(event.text)
            else:
                self.tool_text.append(event.text)
        elif isinstance(event, ToolCalls):
            self.tool_calls.extend(event.calls)
        elif isinstance(event, ToolCallFailed):
            raw = "".join(self.tool_text)
            self.tool_text.clear()
            self.content.append(raw)
            return Token(raw, "content")
        elif isinstance(event, Done):
            self.usage = event.usage
        return None

    @property
    def text(self) -> str:
        return "".join(self.content)


def usage_block(agent_usage: dict[str, int] | None, tokens_seen: int) -> dict[str, Any]:
    """OpenAI usage from the Done payload's usage (tokens seen when there was none)."""
    u = agent_usage or {}
    completion = sum(
        u.get(k, 0) for k in ("content_tokens", "reasoning_tokens", "tool_call_tokens", "undeterminable_tokens")
    )
    if agent_usage is None:
        completion = tokens_seen
    prompt = u.get("prompt_tokens", 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.get("cached_prompt_tokens", 0)},
        "completion_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
    }


def finish_reason(acc: Accumulated, max_tokens: int | None) -> str:
    if acc.tool_calls:
        return "tool_calls"
    if acc.length_stop:
        return "length"
    completion = usage_block(acc.usage, acc.tokens)["completion_tokens"]
    return "length" if max_tokens is not None and completion >= max_tokens else "stop"


def forced_tool_calls(text: str, forced: list[ToolDefinition]) -> list[dict[str, Any]]:
    """Parse the grammar-forced ``{"name": ..., "arguments": {...}}`` output; [] when it
    is not a complete call (e.g. cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    names = {t.function.name for t in forced}
    if not isinstance(value, dict) or value.get("name") not in names or "arguments" not in value:
        return []
    call = {"id": new_call_id(), "name": value["name"], "arguments": {"ValidJson": value["arguments"]}}
    return [openai_tool_call(call, 0)]


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def chat_message(acc: Accumulated) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None if acc.tool_calls else acc.text, "refusal": None}
    if acc.tool_calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in acc.tool_calls]
    if acc.reasoning:
        message["reasoning_content"] = "".join(acc.reasoning)
    return message


def chat_completion(
    response_id: str, model: str, created: int, acc: Accumulated, max_tokens: int | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": chat_message(acc),
                "logprobs": None,
                "finish_reason": finish_reason(acc, max_tokens),
            }
        ],
        "usage": usage_block(acc.usage, acc.tokens),
    }


def _stream_chunk(
    object_name: str,
    response_id: str,
    model: str,
    created: int,
    choice: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    include_usage: bool,
) -> dict[str, Any]:
    """A streamed chunk of either endpoint; ``choice=None`` is the usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": object_name,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [] if choice is None else [{"index": 0, **choice}],
    }
    if include_usage:
        chunk["usage"] = usage
    return chunk


def chat_chunk(
    response_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    include_usage: StrictBool = False,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` is the usage-only chunk (no choices)."""
    choice = None if delta is None else {"delta": delta, "logprobs": None, "finish_reason": finish}
    return _stream_chunk("chat.completion.chunk", response_id, model, created, choice, usage, include_usage)


def chat_delta(event: Token) -> dict[str, Any] | None:
    """The streamed delta of one token; tool-call tokens are not shown as text."""
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "reasoning":
        return {"reasoning_content": event.text}
    return None


def text_completion(
    response_id: str, model: str, created: int, acc: Accumulated, max_tokens: int | None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": acc.text, "logprobs": None, "finish_reason": finish_reason(acc, max_tokens)}],
        "usage": usage_block(acc.usage, acc.tokens),
    }


def text_chunk(
    response_id: str,
    model: str,
    created: int,
    text: str | None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    include_usage: StrictBool = False,
) -> dict[str, Any]:
    """One streamed ``text_completion``; ``text=None`` is the usage-only chunk."""
    choice = None if text is None else {"text": text, "logprobs": None, "finish_reason": finish}
    return _stream_chunk("text_completion", response_id, model, created, choice, usage, include_usage)


def encode_embedding(vector: list[float], encoding: str) -> list[float] | str:
    """Float list, or base64 of little-endian float32 (what OpenAI's SDKs decode)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def decode_embedding(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def embeddings_response(model: str, vectors: list[list[float]], encoding: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        # Agents do not report token counts for embeddings.
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
