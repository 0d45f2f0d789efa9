"""What the benchmarks that drive real models share: the prompts, and one streamed
request to llama.cpp's own server or through the balancer's native NDJSON API.

Each stream returns a :class:`Streamed`: when the first token arrived
(``time.perf_counter()``), how many tokens were generated and how many prompt tokens
the server evaluated (llama-server only; 0 through the balancer).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

STORY_STARTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Write a long essay about the history of bread in Europe.",
    "Write a long story about two robots crossing a desert.",
    "Write a long letter to a friend describing a trip to the mountains.",
    "Write a long story about a detective in a rainy city.",
    "Write a long essay about why people enjoy gardening.",
    "Write a long story about a child who learns to sail.",
    "Write a long report about the life of honey bees.",
]
"""Open-ended requests: the model keeps generating up to the token budget."""


def chat_prompt(text: str) -> str:
    """``text`` as one user turn in SmolLM2's ChatML, ready for the assistant's answer."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def story_prompts(tag: str, n: int) -> list[str]:
    """``n`` different long-answer prompts; ``tag`` keeps runs from sharing a prompt cache."""
    return [chat_prompt(f"({tag}) {STORY_STARTS[i % len(STORY_STARTS)]}") for i in range(n)]


@dataclass(frozen=True)
class Streamed:
    started: float
    """``time.perf_counter()`` when the request was sent."""
    first_token: float | None
    """``time.perf_counter()`` when the first content token arrived; None if none did."""
    generated: int
    evaluated: int = 0
    """Prompt tokens the server evaluated (llama-server's timings; 0 through the balancer)."""

    @property
    def time_to_first_token(self) -> float:
        """Seconds from sending to the first token (NaN when no token came)."""
        return float("nan") if self.first_token is None else self.first_token - self.started


async def llama_server_stream(
    session: Any, url: str, prompt: str, tokens: int, sampling: dict[str, Any] | None = None
) -> Streamed:
    """One streamed ``POST /completion`` to llama-server (its SSE ``data:`` lines)."""
    body = {"prompt": prompt, "n_predict": tokens, "stream": True, "cache_prompt": True, **(sampling or {})}
    started = time.perf_counter()
    first: float | None = None
    generated = evaluated = 0
    async with session.post(url + "/completion", json=body) as response:
        response.raise_for_status()
        async for raw_line in response.content:
            line = raw_line.strip()
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("content"):
                first = time.perf_counter()
            if chunk.get("stop"):
                timings = chunk.get("timings", {})
                generated = int(timings.get("predicted_n", chunk.get("tokens_predicted", 0)))
                evaluated = int(timings.get("prompt_n", 0))
    return Streamed(started, first, generated, evaluated)


async def balancer_stream(session: Any, url: str, prompt: str, tokens: int) -> Streamed:
    """One ``POST /api/v1/continue_from_raw_prompt`` through the balancer (NDJSON); a
    stream that ends in an error raises."""
    body = {"raw_prompt": prompt, "max_tokens": tokens}
    started = time.perf_counter()
    first: float | None = None
    generated = 0
    async with session.post(url + "/api/v1/continue_from_raw_prompt", json=body) as response:
        response.raise_for_status()
        async for raw_line in response.content:
            if not raw_line.strip():
                continue
            line = json.loads(raw_line)
            if "Error" in line:
                raise RuntimeError(f"stream failed: {line}")
            token = line["Response"]["response"].get("GeneratedToken", {})
            if not isinstance(token, dict):
                continue
            if first is None and "ContentToken" in token:
                first = time.perf_counter()
            if "Done" in token:
                generated = int(token["Done"]["usage"]["content_tokens"])
            elif token and "ContentToken" not in token:
                raise RuntimeError(f"stream failed: {line}")
    return Streamed(started, first, generated)
