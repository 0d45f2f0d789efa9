"""Response bodies and stream chunks of chat completions, completions and embeddings."""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any

from pydantic import StrictBool

from paddler_balancer.openai.events import Accumulated, Token, new_call_id, openai_tool_call
from paddler_balancer.openai.request_models import ToolDefinition


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


def settle_forced_call(acc: Accumulated, forced: list[ToolDefinition]) -> list[dict[str, Any]] | None:
    """At the end of a run whose tool call the grammar forced: the call parsed from its
    text, recorded in ``acc`` ([] when the text is no complete call: the caller sends it
    as content). None when no call was forced, or the model already made one."""
    if not forced or acc.tool_calls:
        return None
    calls = forced_tool_calls(acc.text, forced)
    acc.tool_calls.extend(calls)
    return calls


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


def completion_choice(key: str, value: Any, finish: str | None) -> dict[str, Any]:
    """The choice of either endpoint, whole or streamed: its ``message``, ``delta`` or
    ``text``, no logprobs, the finish reason."""
    return {key: value, "logprobs": None, "finish_reason": finish}


def _completion(
    object_name: str, response_id: str, model: str, created: int, choice: dict[str, Any], acc: Accumulated
) -> dict[str, Any]:
    """The non-streamed body of either endpoint, with its one choice."""
    return {
        "id": response_id,
        "object": object_name,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, **choice}],
        "usage": usage_block(acc.usage, acc.tokens),
    }


def chat_completion(
    response_id: str, model: str, created: int, acc: Accumulated, max_tokens: int | None
) -> dict[str, Any]:
    choice = completion_choice("message", chat_message(acc), finish_reason(acc, max_tokens))
    return _completion("chat.completion", response_id, model, created, choice, acc)


def text_completion(
    response_id: str, model: str, created: int, acc: Accumulated, max_tokens: int | None
) -> dict[str, Any]:
    choice = completion_choice("text", acc.text, finish_reason(acc, max_tokens))
    return _completion("text_completion", response_id, model, created, choice, acc)


CHAT_CHUNK = "chat.completion.chunk"
"""The ``object`` of a streamed chat completion chunk."""
TEXT_CHUNK = "text_completion"
"""The ``object`` of a streamed text completion chunk (the body's own)."""


def completion_chunk(
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
    choice = None if delta is None else completion_choice("delta", delta, finish)
    return completion_chunk(CHAT_CHUNK, response_id, model, created, choice, usage, include_usage)


def chat_delta(event: Token) -> dict[str, Any] | None:
    """The streamed delta of one token; tool-call tokens are not shown as text."""
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "reasoning":
        return {"reasoning_content": event.text}
    return None


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
    choice = None if text is None else completion_choice("text", text, finish)
    return completion_chunk(TEXT_CHUNK, response_id, model, created, choice, usage, include_usage)


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
