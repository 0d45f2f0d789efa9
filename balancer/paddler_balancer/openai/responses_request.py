"""OpenAI Responses API (``POST /v1/responses``): the request model and its mapping
to a chat completion request (so it runs through the chat machinery: tools, grammars,
sampling, buffering). Pure (no I/O).

Decisions:

* Nothing is stored: ``previous_response_id``, ``conversation``, ``item_reference``
  and ``background`` are refused with 400 (send the whole conversation in ``input``).
* Only function tools; other tool types (``web_search``, ``file_search``...) are 400.
* ``max_output_tokens`` reached: ``status: "incomplete"`` with
  ``incomplete_details.reason = "max_output_tokens"`` (streamed as
  ``response.incomplete``), as OpenAI does.
* A forced tool call (``tool_choice`` ``required`` or a named function) is generated
  under a JSON-schema grammar and parsed at the end, so its ``function_call`` item
  (with one arguments delta) comes when the generation ends.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, StrictInt, Tag, field_validator

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.request_models import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FormatTyped,
    FunctionCall,
    FunctionDefinition,
    FunctionTyped,
    ImagePart,
    ImageUrlSpec,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    OpenAIModel,
    ResponseFormat,
    SchemaFormat,
    Temperature,
    TextPart,
    TokenLimit,
    ToolCall,
    ToolDefinition,
    TopP,
)
from paddler_core.inference import DataImageUrl

# ---- requests -------------------------------------------------------------------------------


class InputText(OpenAIModel):
    type: Literal["input_text"]
    text: str


class OutputText(OpenAIModel):
    """Assistant text handed back as history."""

    type: Literal["output_text"]
    text: str


class Refusal(OpenAIModel):
    type: Literal["refusal"]
    refusal: str


class InputImage(OpenAIModel):
    type: Literal["input_image"]
    image_url: DataImageUrl | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto"] | None = None


InputPart = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(OpenAIModel):
    """A reasoning item handed back as history: accepted and left out of the prompt
    (chat templates drop earlier reasoning too)."""

    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(FunctionDefinition, FunctionTyped):
    """A function tool: chat's function definition with its ``type`` beside it (the
    fields in that order: ``type``, ``name``, ``description``...)."""

    def chat_tool(self) -> ToolDefinition:
        # A FunctionDefinition already (validated): pydantic keeps the instance.
        return ToolDefinition(type="function", function=self)


class FunctionToolChoice(NamedFunction, FunctionTyped):
    """A named function to call: chat's ``{"type", "function": {"name"}}``, flat."""

    def chat_choice(self) -> NamedToolChoice:
        return NamedToolChoice(type="function", function=self)


class TextFormat(SchemaFormat, FormatTyped):
    """Chat's ``response_format`` with its JSON schema's fields beside ``type``."""

    def response_format(self) -> ResponseFormat | None:
        """As chat's ``response_format`` (None for text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        if self.schema_value is None:
            raise OpenAIError(400, 'text.format "json_schema" needs a schema', param="text.format.schema")
        schema = JsonSchemaFormat.model_validate(self.model_dump(by_alias=True, exclude={"type"}))
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


_NOT_STORED = "this server stores no responses: send the whole conversation in input"


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: TokenLimit = None
    temperature: Temperature = None
    top_p: TopP = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    stream: StrictBool = False
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    top_logprobs: Annotated[StrictInt | None, Field(le=0)] = None

    @field_validator("previous_response_id", "conversation")
    @classmethod
    def _not_stored(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(f"not supported: {_NOT_STORED}")
        return value

    @field_validator("background")
    @classmethod
    def _foreground(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(f"background responses are not supported: {_NOT_STORED}")
        return value

    @property
    def format(self) -> TextFormat | None:
        return self.text.format if self.text is not None else None


# ---- mapping to a chat completion -----------------------------------------------------------


def _parts(content: str | list[InputPart], where: str) -> str | list[ContentPart]:
    if isinstance(content, str):
        return content
    parts: list[ContentPart] = []
    for index, part in enumerate(content):
        if isinstance(part, InputText | OutputText):
            parts.append(TextPart(type="text", text=part.text))
        elif isinstance(part, Refusal):
            parts.append(TextPart(type="text", text=part.refusal))
        elif part.image_url:
            # Checked when the request was validated (InputImage.image_url): not decoded again.
            parts.append(ImagePart(type="image_url", image_url=ImageUrlSpec.model_construct(url=part.image_url)))
        else:
            raise OpenAIError(
                400,
                f"input_image needs image_url (a data URI); file_id is not supported: {_NOT_STORED}",
                code="invalid_request",
                param=f"{where}.content.{index}",
            )
    return parts


def chat_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """``instructions`` and ``input`` as chat messages: consecutive ``function_call``
    items become one assistant message with ``tool_calls``; a
    ``function_call_output`` becomes a ``tool`` message."""
    messages: list[ChatMessage] = []
    if req.instructions:
        messages.append(ChatMessage(role="system", content=req.instructions))
    items = [MessageItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for index, item in enumerate(items):
        where = f"input.{index}"
        if isinstance(item, MessageItem):
            messages.append(ChatMessage(role=item.role, content=_parts(item.content, where)))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and last.tool_calls is not None:
                last.tool_calls.append(call)
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output if isinstance(item.output, str) else _parts(item.output, where)
            messages.append(ChatMessage(role="tool", content=output, tool_call_id=item.call_id))
    if not messages:
        raise OpenAIError(400, "input has no message to answer", code="invalid_request", param="input")
    return messages


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that generates this response."""
    choice = req.tool_choice.chat_choice() if isinstance(req.tool_choice, FunctionToolChoice) else req.tool_choice
    tools = [t.chat_tool() for t in req.tools or []]
    return ChatCompletionRequest(
        model=req.model,
        messages=chat_messages(req),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=tools or None,
        tool_choice=choice,
        response_format=req.format.response_format() if req.format is not None else None,
    )
