"""OpenAI Responses API (``POST /v1/responses``): the request model, its mapping to a
chat completion request (so it runs through the chat machinery: tools, grammars,
sampling, buffering), and the response objects and stream events. Pure (no I/O).

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

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, StrictBool, StrictInt, Tag, field_validator

from paddler_balancer.openai_types import (
    Accumulated,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    ImagePart,
    ImageUrlSpec,
    JsonSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    OpenAIError,
    ResponseFormat,
    TextPart,
    Token,
    ToolCall,
    ToolCalls,
    ToolDefinition,
    _Model,
    finish_reason,
    forced_tool_calls,
    usage_block,
)
from paddler_core.inference import image_url_problem

# ---- requests -------------------------------------------------------------------------------


class InputText(_Model):
    type: Literal["input_text"]
    text: str


class OutputText(_Model):
    """Assistant text handed back as history."""

    type: Literal["output_text"]
    text: str


class Refusal(_Model):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Model):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["low", "high", "auto"] | None = None

    @field_validator("image_url")
    @classmethod
    def _usable(cls, url: str | None) -> str | None:
        problem = None if url is None else image_url_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url


InputPart = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1)]
    output: str | list[InputPart]
    id: str | None = None
    status: str | None = None


class ReasoningItem(_Model):
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


class FunctionTool(_Model):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str = "response"
    description: str | None = None
    schema_value: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class TextConfig(_Model):
    format: TextFormat | None = None


_NOT_STORED = "this server stores no responses: send the whole conversation in input"


class ResponsesRequest(_Model):
    model: str | None = None
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[StrictInt | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0.0, le=2.0)] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0)] = None
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
            parts.append(ImagePart(type="image_url", image_url=ImageUrlSpec(url=part.image_url)))
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


def _response_format(fmt: TextFormat | None) -> ResponseFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema_value is None:
        raise OpenAIError(400, 'text.format "json_schema" needs a schema', param="text.format.schema")
    schema = JsonSchemaFormat.model_validate(
        {"name": fmt.name, "description": fmt.description, "schema": fmt.schema_value, "strict": fmt.strict}
    )
    return ResponseFormat(type="json_schema", json_schema=schema)


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that generates this response."""
    choice: Literal["none", "auto", "required"] | NamedToolChoice | None
    if isinstance(req.tool_choice, FunctionToolChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(name=req.tool_choice.name))
    else:
        choice = req.tool_choice
    tools = [
        ToolDefinition(
            type="function",
            function=FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in req.tools or []
    ]
    return ChatCompletionRequest(
        model=req.model,
        messages=chat_messages(req),
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=tools or None,
        tool_choice=choice,
        response_format=_response_format(req.format),
    )


# ---- responses ------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def responses_usage(acc: Accumulated) -> dict[str, Any]:
    u = usage_block(acc.usage, acc.tokens)
    return {
        "input_tokens": u["prompt_tokens"],
        # Nothing is written to a cache kept for later requests (OpenAI's prompt caching).
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"], "cache_write_tokens": 0},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"]},
        "total_tokens": u["total_tokens"],
    }


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [output_text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [] if status == "in_progress" else [{"type": "reasoning_text", "text": text}]
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [], "content": content}


def function_call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A ``function_call`` output item from an OpenAI chat ``tool_calls`` entry."""
    function = call["function"]
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call["id"],
        "name": function["name"],
        "arguments": "" if status == "in_progress" else function["arguments"],
        "status": status,
    }


def output_items(acc: Accumulated, forced: bool) -> list[dict[str, Any]]:
    """The output of a finished, non-streamed response: reasoning, the message (unless
    its text was a forced call that parsed), then the function calls."""
    items = []
    if acc.reasoning:
        items.append(reasoning_item(new_id("rs"), "".join(acc.reasoning)))
    if acc.text and not (forced and acc.tool_calls):
        items.append(message_item(new_id("msg"), acc.text))
    items.extend(function_call_item(new_id("fc"), call) for call in acc.tool_calls)
    return items


@dataclass(frozen=True)
class ResponseHeader:
    """What every response object of one request repeats."""

    response_id: str
    model: str
    created_at: int
    request: ResponsesRequest

    def body(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        *,
        incomplete: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        req = self.request
        fmt = req.format
        tool_choice: Any = req.tool_choice.model_dump() if isinstance(req.tool_choice, FunctionToolChoice) else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": None if incomplete is None else {"reason": incomplete},
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls if req.parallel_tool_calls is not None else True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": tool_choice or req.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
        }

    def finished(self, acc: Accumulated, max_tokens: int, output: list[dict[str, Any]]) -> dict[str, Any]:
        """``completed``, or ``incomplete`` when the token limit cut the output."""
        cut = finish_reason(acc, max_tokens) == "length"
        status = "incomplete" if cut else "completed"
        return self.body(status, output, responses_usage(acc), incomplete="max_output_tokens" if cut else None)


# ---- streaming ------------------------------------------------------------------------------


@dataclass
class _OpenItem:
    kind: Literal["message", "reasoning"]
    item_id: str
    index: int
    text: list[str] = field(default_factory=list)


@dataclass
class ResponsesStream:
    """Builds the event sequence of a streamed response: ``response.created``,
    ``response.in_progress``, per output item ``response.output_item.added`` (then
    ``response.content_part.added`` / ``response.output_text.delta`` ... for a message,
    ``response.function_call_arguments.delta``/``.done`` for a call) and
    ``response.output_item.done``, and ``response.completed`` (or ``.incomplete``)
    with usage. Each event carries its ``sequence_number``."""

    header: ResponseHeader
    max_tokens: int
    forced: list[ToolDefinition]
    acc: Accumulated
    sequence: int = 0
    output: list[dict[str, Any]] = field(default_factory=list)
    current: _OpenItem | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def opening(self) -> list[dict[str, Any]]:
        in_progress = self.header.body("in_progress", [], None)
        return [
            self._event("response.created", response=in_progress),
            self._event("response.in_progress", response=in_progress),
        ]

    def _open(self, kind: Literal["message", "reasoning"]) -> list[dict[str, Any]]:
        if self.current is not None and self.current.kind == kind:
            return []
        events = self._close()
        item = _OpenItem(kind, new_id("msg" if kind == "message" else "rs"), len(self.output))
        self.current = item
        self.output.append({})  # its place; filled when it closes
        if kind == "message":
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=item.index,
                    item=message_item(item.item_id, "", "in_progress"),
                )
            )
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.item_id,
                    output_index=item.index,
                    content_index=0,
                    part=output_text_part(""),
                )
            )
        else:
            events.append(
                self._event(
                    "response.output_item.added",
                    output_index=item.index,
                    item=reasoning_item(item.item_id, "", "in_progress"),
                )
            )
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self.current = self.current, None
        if item is None:
            return []
        text = "".join(item.text)
        where = {"item_id": item.item_id, "output_index": item.index, "content_index": 0}
        if item.kind == "message":
            done = message_item(item.item_id, text)
            events = [
                self._event("response.output_text.done", **where, text=text, logprobs=[]),
                self._event("response.content_part.done", **where, part=output_text_part(text)),
            ]
        else:
            done = reasoning_item(item.item_id, text)
            events = [self._event("response.reasoning_text.done", **where, text=text)]
        self.output[item.index] = done
        events.append(self._event("response.output_item.done", output_index=item.index, item=done))
        return events

    def _text(self, kind: Literal["message", "reasoning"], delta: str) -> list[dict[str, Any]]:
        events = self._open(kind)
        assert self.current is not None
        self.current.text.append(delta)
        where = {"item_id": self.current.item_id, "output_index": self.current.index, "content_index": 0}
        if kind == "message":
            events.append(self._event("response.output_text.delta", **where, delta=delta, logprobs=[]))
        else:
            events.append(self._event("response.reasoning_text.delta", **where, delta=delta))
        return events

    def _calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events = self._close()
        for call in calls:
            item_id, index = new_id("fc"), len(self.output)
            done = function_call_item(item_id, call)
            self.output.append(done)
            where = {"item_id": item_id, "output_index": index}
            added = function_call_item(item_id, call, "in_progress")
            events += [
                self._event("response.output_item.added", output_index=index, item=added),
                self._event("response.function_call_arguments.delta", **where, delta=done["arguments"]),
                self._event(
                    "response.function_call_arguments.done", **where, name=done["name"], arguments=done["arguments"]
                ),
                self._event("response.output_item.done", output_index=index, item=done),
            ]
        return events

    def on_event(self, event: Token | ToolCalls) -> list[dict[str, Any]]:
        if isinstance(event, ToolCalls):
            return self._calls(event.calls)
        if event.kind == "content" and not self.forced:
            return self._text("message", event.text)
        if event.kind == "reasoning":
            return self._text("reasoning", event.text)
        return []  # tool-call text, and forced output (parsed at the end)

    def closing(self) -> list[dict[str, Any]]:
        events = []
        if self.forced and not self.acc.tool_calls:
            calls = forced_tool_calls(self.acc.text, self.forced)
            self.acc.tool_calls.extend(calls)
            events += self._calls(calls) if calls else self._text("message", self.acc.text)
        events += self._close()
        response = self.header.finished(self.acc, self.max_tokens, self.output)
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=response))
        return events

    def failed(self, error: OpenAIError) -> list[dict[str, Any]]:
        """OpenAI's ``error`` event (our code), then ``response.failed`` (whose error code
        is one of OpenAI's: ``server_error``, or ``invalid_prompt`` for a request problem)."""
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        failed = self.header.body(
            "failed",
            [item for item in self.output if item],
            responses_usage(self.acc),
            error={"code": code, "message": error.message},
        )
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=failed),
        ]

    def encode(self, chunk: dict[str, Any]) -> bytes:
        data = json.dumps(chunk, separators=(",", ":"))
        return f"event: {chunk['type']}\ndata: {data}\n\n".encode()

    @property
    def trailer(self) -> bytes:
        return b""  # OpenAI ends a Responses stream with its last event, no [DONE]
