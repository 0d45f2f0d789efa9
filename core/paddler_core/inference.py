"""Client-facing inference requests and response messages (Paddler 4.x shapes).

Requests are what ``paddler-client`` posts (NDJSON endpoints) or sends over the
inference WebSocket. Responses are built as plain dicts on the hot path: one
per generated token, so they skip pydantic on purpose.

Response envelope, one per NDJSON line / WebSocket frame::

    {"Response": {"request_id": ID, "response": PAYLOAD, "generated_by": AGENT_ID}}
    {"Error": {"request_id": ID, "error": {"code": 504, "description": "..."}}}

PAYLOAD is ``{"GeneratedToken": {"ContentToken": "text"}}``,
``{"GeneratedToken": {"Done": {"usage": {...}}}}``, ``{"Embedding": {...}}``,
``"Timeout"`` or ``"TooManyBufferedRequests"``.
"""

from __future__ import annotations

import base64
import binascii
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from paddler_core.desired_state import EmbeddingNormalizationMethod
from paddler_core.tool_schema import tool_schema_problem

MAX_TOKENS_LIMIT = (1 << 31) - 1
"""Largest ``max_tokens`` accepted (generation also ends when the context is full)."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class GbnfGrammar(_Params):
    type: Literal["gbnf"] = "gbnf"
    grammar: Annotated[str, Field(min_length=1)]
    root: str = "root"


class JsonSchemaGrammar(_Params):
    type: Literal["json_schema"] = "json_schema"
    schema_value: Annotated[str, Field(alias="schema", min_length=1)]
    """The JSON schema, serialised as a string (Paddler's shape)."""


GrammarConstraint = Annotated[GbnfGrammar | JsonSchemaGrammar, Field(discriminator="type")]


class TextContentPart(_Params):
    type: Literal["text"] = "text"
    text: str


_DATA_URI = re.compile(r"^data:(?P<mime>image/[A-Za-z0-9.+-]+);base64,(?P<payload>.*)$", re.DOTALL)


def image_url_problem(url: str) -> str | None:
    """Why an image URL cannot be used, or None. Images travel inline as
    ``data:image/<type>;base64,<data>``; remote URLs are not fetched."""
    if url.startswith(("http://", "https://")):
        return "remote image URLs are not fetched; send the image inline as a data:image/...;base64, URI"
    match = _DATA_URI.match(url)
    if match is None:
        return "malformed image data URI; expected data:image/<type>;base64,<data>"
    try:
        base64.b64decode(match.group("payload"), validate=True)
    except (binascii.Error, ValueError):
        return "the image data URI is not valid base64"
    return None


IMAGES_CHECKED = {"images_checked": True}
"""Validation context of a model built from parts whose image URLs were already checked
(the OpenAI layer maps its validated request to native params): the base64 of an image,
up to the body limit, is then not decoded a second time."""


def _usable_image_url(url: str, info: ValidationInfo) -> str:
    if isinstance(info.context, dict) and info.context.get("images_checked"):
        return url
    problem = image_url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    return url


DataImageUrl = Annotated[str, AfterValidator(_usable_image_url)]
"""An image URL this project can use: an inline ``data:image/...;base64,`` URI."""


class ImageUrl(_Params):
    url: DataImageUrl


class ImageUrlContentPart(_Params):
    type: Literal["image_url"] = "image_url"
    image_url: ImageUrl


ContentPart = Annotated[TextContentPart | ImageUrlContentPart, Field(discriminator="type")]


class ConversationMessage(BaseModel):
    """One chat message. Extra keys (``tool_calls``, ``tool_call_id``, ``name``)
    are kept and handed to the chat template, as real templates read them."""

    model_config = ConfigDict(extra="allow")

    role: Annotated[str, Field(min_length=1)]
    content: str | list[ContentPart] | None = ""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextContentPart))


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    parameters: dict[str, Any] | None = None
    """Checked apart from parsing (:meth:`ContinueFromConversationHistoryParams.tool_schema_problem`):
    Paddler answers a schema that is no JSON Schema in the stream, not with a 400."""


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: ToolFunction


class ContinueFromRawPromptParams(_Params):
    raw_prompt: str
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
    grammar: GrammarConstraint | None = None


class ContinueFromConversationHistoryParams(_Params):
    conversation_history: Annotated[list[ConversationMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
    add_generation_prompt: bool = True
    enable_thinking: bool = False
    grammar: GrammarConstraint | None = None
    tools: list[Tool] = Field(default_factory=list)
    parse_tool_calls: bool = True
    """Paddler 4.1: false leaves tool-call text as ``ToolCallToken`` tokens, unparsed
    (no ``ToolCallParsed``)."""

    def tool_schema_problem(self) -> str | None:
        """Why the first tool whose ``parameters`` is not a valid JSON Schema cannot be
        used (the message names the tool; paddler_core.tool_schema), or None. Paddler 4.1
        streams it as ``ToolSchemaInvalid``."""
        for tool in self.tools:
            parameters = tool.function.parameters
            problem = None if parameters is None else tool_schema_problem(tool.function.name, parameters)
            if problem is not None:
                return problem
        return None


class EmbeddingInputDocument(_Params):
    id: str
    content: str


class GenerateEmbeddingBatchParams(_Params):
    input_batch: Annotated[list[EmbeddingInputDocument], Field(min_length=1)]
    normalization_method: EmbeddingNormalizationMethod = Field(default_factory=EmbeddingNormalizationMethod)


class RequestKind(StrEnum):
    RAW_PROMPT = "ContinueFromRawPrompt"
    CONVERSATION = "ContinueFromConversationHistory"
    EMBEDDING = "GenerateEmbeddingBatch"


GenerationParams = ContinueFromRawPromptParams | ContinueFromConversationHistoryParams


def parse_generation_request(variant: str, body: Any) -> GenerationParams:
    """Validate one ``{"<Variant>": {...}}`` request body; raises ValueError."""
    if variant == RequestKind.RAW_PROMPT:
        return ContinueFromRawPromptParams.model_validate(body)
    if variant == RequestKind.CONVERSATION:
        return ContinueFromConversationHistoryParams.model_validate(body)
    raise ValueError(
        f"unknown request variant {variant!r}; expected ContinueFromRawPrompt or ContinueFromConversationHistory"
    )


# ---- response payloads (hot path: plain dicts, typed by TypedDicts) ------------------------

TOKEN_KINDS = ("ContentToken", "ReasoningToken", "ToolCallToken", "UndeterminableToken")

TIMEOUT: str = "Timeout"
TOO_MANY_BUFFERED_REQUESTS: str = "TooManyBufferedRequests"


class GenerationError(StrEnum):
    """Paddler's terminal generation errors: the variant in ``{"GeneratedToken": {VARIANT:
    message}}``. The values are Paddler's names, so the wire is unchanged; the agent raises
    and emits these, the balancer maps them to HTTP statuses (openai/events.py)."""

    SAMPLER_ERROR = "SamplerError"
    CHAT_TEMPLATE_ERROR = "ChatTemplateError"
    GRAMMAR_SYNTAX_ERROR = "GrammarSyntaxError"
    GRAMMAR_INITIALIZATION_FAILED = "GrammarInitializationFailed"
    GRAMMAR_REJECTED_MODEL_OUTPUT = "GrammarRejectedModelOutput"
    GRAMMAR_INCOMPATIBLE_WITH_THINKING = "GrammarIncompatibleWithThinking"
    TOOL_CALL_VALIDATOR_BUILD_FAILED = "ToolCallValidatorBuildFailed"
    TOOL_SCHEMA_INVALID = "ToolSchemaInvalid"
    IMAGE_DECODING_FAILED = "ImageDecodingFailed"
    IMAGE_EXCEEDS_BATCH_SIZE = "ImageExceedsBatchSize"
    MEDIA_EXCEEDS_MICRO_BATCH = "MediaExceedsMicroBatch"
    MULTIMODAL_NOT_SUPPORTED = "MultimodalNotSupported"
    MULTIMODAL_INGESTION_FAILED = "MultimodalIngestionFailed"
    MULTIMODAL_TOKENIZATION_FAILED = "MultimodalTokenizationFailed"


class ErrorKind(StrEnum):
    """What a failed generation means to the balancer, told by the agent beside the
    payload (``error_kind`` of its ``response`` message; never forwarded to clients,
    whose payload stays Paddler's ``{"GeneratedToken": {"SamplerError": "..."}}``)."""

    PROMPT_EXCEEDS_CONTEXT = "prompt_exceeds_context"
    """The prompt does not fit the context: a request problem (OpenAI: 400
    ``context_length_exceeded``)."""
    CONTEXT_FULL = "context_full"
    """Generation used up the context (OpenAI: ``finish_reason: "length"``)."""
    INVALID_REQUEST = "invalid_request"
    """The agent refused the request's parameters (OpenAI: 400 ``invalid_request``)."""


class Usage(TypedDict):
    """Paddler's token usage of one generation."""

    prompt_tokens: int
    cached_prompt_tokens: int
    input_image_tokens: int
    input_audio_tokens: int
    content_tokens: int
    reasoning_tokens: int
    tool_call_tokens: int
    undeterminable_tokens: int


class DoneBody(TypedDict):
    usage: Usage
    timings: NotRequired[dict[str, Any]]
    """The simulated engine's per-request timings (tests read them; not Paddler's)."""


class GeneratedTokenPayload(TypedDict):
    """``{"GeneratedToken": {KIND: value}}``: one token (KIND in TOKEN_KINDS, a string),
    ``Done`` (a :class:`DoneBody`), parsed tool calls, or a terminal error (a string)."""

    GeneratedToken: dict[str, str | DoneBody | list[dict[str, Any]] | dict[str, Any]]


class EmbeddingPayload(TypedDict):
    """``{"Embedding": "Done"}``, ``{"Embedding": {"Embedding": {...}}}`` or an error."""

    Embedding: str | dict[str, Any]


ResponsePayload = GeneratedTokenPayload | EmbeddingPayload | str
"""What a client receives for one step of a request (``"Timeout"`` and
``"TooManyBufferedRequests"`` are the string ones)."""


class ResponseBody(TypedDict):
    request_id: str
    response: ResponsePayload
    generated_by: NotRequired[str]


class ResponseEnvelope(TypedDict):
    Response: ResponseBody


class ErrorDetail(TypedDict):
    code: int
    description: str


class ErrorBody(TypedDict):
    request_id: str
    error: ErrorDetail


class ErrorEnvelope(TypedDict):
    Error: ErrorBody


Envelope = ResponseEnvelope | ErrorEnvelope
"""One NDJSON line / inference WebSocket frame."""


def token_payload(text: str, kind: str = "ContentToken") -> GeneratedTokenPayload:
    return {"GeneratedToken": {kind: text}}


def usage_dict(
    *,
    prompt_tokens: int = 0,
    cached_prompt_tokens: int = 0,
    content_tokens: int = 0,
    reasoning_tokens: int = 0,
    tool_call_tokens: int = 0,
    undeterminable_tokens: int = 0,
    input_image_tokens: int = 0,
) -> Usage:
    """Paddler's usage; ``prompt_tokens`` counts the images' tokens too, and
    ``input_image_tokens`` says how many of them are."""
    return {
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": cached_prompt_tokens,
        "input_image_tokens": input_image_tokens,
        "input_audio_tokens": 0,
        "content_tokens": content_tokens,
        "reasoning_tokens": reasoning_tokens,
        "tool_call_tokens": tool_call_tokens,
        "undeterminable_tokens": undeterminable_tokens,
    }


def done_payload(usage: Usage) -> GeneratedTokenPayload:
    return {"GeneratedToken": {"Done": {"usage": usage}}}


def generated_error_payload(kind: GenerationError, message: str) -> GeneratedTokenPayload:
    """A terminal generation error, e.g. ``ChatTemplateError`` or ``SamplerError``."""
    return {"GeneratedToken": {kind: message}}


def response_envelope(request_id: str, payload: ResponsePayload, generated_by: str | None = None) -> ResponseEnvelope:
    body: ResponseBody = {"request_id": request_id, "response": payload}
    if generated_by is not None:
        body["generated_by"] = generated_by
    return {"Response": body}


def error_envelope(request_id: str, code: int, description: str) -> ErrorEnvelope:
    return {"Error": {"request_id": request_id, "error": {"code": code, "description": description}}}


def response_payload_problem(payload: Any) -> str | None:
    """Why ``payload`` (from an agent) is not a Paddler response payload; None if it is.

    The balancer checks every payload before a client sees it, so a broken or hostile
    agent fails its own requests with 502 instead of crashing a handler."""
    if isinstance(payload, str):
        return None if payload in (TIMEOUT, TOO_MANY_BUFFERED_REQUESTS) else f"unknown payload {payload[:40]!r}"
    if not isinstance(payload, dict) or len(payload) != 1:
        return "a payload must be an object with one key"
    ((key, value),) = payload.items()
    if key == "GeneratedToken":
        if not isinstance(value, dict) or len(value) != 1:
            return "GeneratedToken must be an object with one key"
        ((kind, inner),) = value.items()
        if kind in TOKEN_KINDS and not isinstance(inner, str):
            return f"{kind} must be a string"
        if kind == "Done" and not (isinstance(inner, dict) and isinstance(inner.get("usage", {}), dict)):
            return "Done must be an object with a usage object"
        return None
    if key == "Embedding":
        if isinstance(value, str):
            return None
        if not isinstance(value, dict) or len(value) != 1:
            return "Embedding must be a string or an object with one key"
        embedding = value.get("Embedding")
        if "Embedding" in value and not (
            isinstance(embedding, dict)
            and isinstance(embedding.get("source_document_id"), str)
            and isinstance(embedding.get("embedding"), list)
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding["embedding"])
        ):
            return "Embedding.Embedding must hold a source_document_id and a list of numbers"
        return None
    return f"unknown payload kind {key[:40]!r}"
