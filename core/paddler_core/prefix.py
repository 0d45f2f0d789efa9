"""Prefix keys of a request, shared by balancer and agent for prefix-affinity routing.

Keys are cumulative hashes over the request's content (per conversation message,
or per fixed-size chunk of a raw prompt), so two requests that share a prefix
share the leading keys. The agent publishes the keys of what its slots hold; the
balancer prefers agents holding the longest run of a new request's keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

RAW_PROMPT_CHUNK_CHARS = 256
MAX_KEYS_PER_REQUEST = 16


def request_prefix_keys(variant: str, params: dict[str, Any]) -> tuple[str, ...]:
    parts: list[str] = []
    if variant == "ContinueFromRawPrompt":
        text = str(params.get("raw_prompt", ""))
        parts = [
            text[i : i + RAW_PROMPT_CHUNK_CHARS]
            for i in range(0, len(text) - RAW_PROMPT_CHUNK_CHARS + 1, RAW_PROMPT_CHUNK_CHARS)
        ]
    elif variant == "ContinueFromConversationHistory":
        for message in params.get("conversation_history", []):
            content = message.get("content")
            parts.append(f"{message.get('role')}\x1f{content}")
    keys: list[str] = []
    h = hashlib.blake2b(digest_size=8)
    for part in parts[:MAX_KEYS_PER_REQUEST]:
        h.update(part.encode("utf-8", "surrogatepass"))  # never raises on any str
        h.update(b"\x1e")
        keys.append(h.hexdigest())
    return tuple(keys)
