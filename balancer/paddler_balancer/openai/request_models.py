"""The request bodies of ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` (pydantic; unsupported fields are a 400, unknown ones ignored).

Chat and text completions share their body's base (:class:`SamplingRequest`); the
Responses API's tools, tool choice and text format (``responses_request``) are built
on the chat ones here, and so are its limits (:data:`TokenLimit`, :data:`Temperature`,
:data:`TopP`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator

from paddler_core.inference import (
    DataImageUrl,
)
from paddler_core.tool_schema import tool_schema_problem

# ---- requests -------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    # Unknown fields (``user``, ``metadata``, ``store``...) are accepted and ignored,
    # as OpenAI clients send them freely.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImageUrlSpec(OpenAIModel):
    url: DataImageUrl


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: ImageUrlSpec


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(OpenAIModel):
    name: str
    arguments: str = "{}"


class ToolCall(OpenAIModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


def checked_parameters(parameters: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    """A tool's ``parameters``: a JSON Schema document (paddler_core.tool_schema), so the
    400 names the field (``tools.0.function.parameters``) and the tool."""
    problem = None if parameters is None else tool_schema_problem(str(info.data.get("name", "")), parameters)
    if problem is not None:
        raise ValueError(problem)
    return parameters


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _valid_parameters = field_validator("parameters")(checked_parameters)


class FunctionTyped(OpenAIModel):
    """The ``type: "function"`` tag, first field of a tool, a tool choice, and of the
    Responses API's flat forms of both (``responses_request``)."""

    type: Literal["function"]


class ToolDefinition(FunctionTyped):
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(FunctionTyped):
    function: NamedFunction


class SchemaFormat(OpenAIModel):
    """A JSON-schema output format: chat's ``response_format.json_schema``, and the
    Responses API's ``text.format`` (whose ``schema`` is checked when it is mapped)."""

    name: str = "response"
    description: str | None = None
    schema_value: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class JsonSchemaFormat(SchemaFormat):
    schema_value: Annotated[dict[str, Any], Field(alias="schema")]


class FormatTyped(OpenAIModel):
    """The ``type`` of an output format, first field of chat's ``response_format`` and of
    the Responses API's ``text.format``."""

    type: Literal["text", "json_object", "json_schema"]


class ResponseFormat(FormatTyped):
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(OpenAIModel):
    include_usage: StrictBool = False


TokenLimit = Annotated[StrictInt | None, Field(ge=1)]
"""``max_tokens``, ``max_completion_tokens`` and the Responses API's ``max_output_tokens``."""
Temperature = Annotated[float | None, Field(ge=0.0, le=2.0)]
TopP = Annotated[float | None, Field(gt=0.0, le=1.0)]


class SamplingRequest(OpenAIModel):
    """The body that chat completions and (legacy) text completions share: the model,
    the token limit, sampling (``mapping.sampling_overrides``), ``n`` and streaming."""

    model: str | None = None
    max_tokens: TokenLimit = None
    temperature: Temperature = None
    top_p: TopP = None
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

    @property
    def token_limit(self) -> int | None:
        """The most tokens to generate, None for the endpoint's default."""
        return self.max_tokens


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: TokenLimit = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False
    suffix: Literal[""] | None = None
    best_of: Literal[1] | None = None
    logprobs: None = None

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(OpenAIModel):
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
