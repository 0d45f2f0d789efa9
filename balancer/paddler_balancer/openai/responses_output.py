"""OpenAI Responses API: the response object, its output items and the streamed
event sequence. Pure (no I/O)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from paddler_balancer.openai.errors import OpenAIError
from paddler_balancer.openai.events import Accumulated, Token, ToolCalls
from paddler_balancer.openai.output import finish_reason, settle_forced_call, usage_block
from paddler_balancer.openai.request_models import ToolDefinition
from paddler_balancer.openai.responses_request import FunctionToolChoice, ResponsesRequest

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
        calls = settle_forced_call(self.acc, self.forced)
        if calls is not None:
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
