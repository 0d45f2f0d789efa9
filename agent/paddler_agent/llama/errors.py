"""The error a request can meet inside the engine."""

from __future__ import annotations

from paddler_core.inference import ErrorKind, GenerationError


class RequestError(Exception):
    """A request that cannot run; ``kind`` is the Paddler GeneratedToken error variant."""

    def __init__(self, kind: GenerationError, message: str, error_kind: ErrorKind | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error_kind = error_kind
        """What the error means to the balancer, when it needs to know (not shown to clients)."""


def prompt_bytes(text: str) -> bytes:
    """``text`` as UTF-8 for llama.cpp; a lone UTF-16 surrogate (valid JSON, not UTF-8) is
    the client's invalid request, whether or not the prompt holds images."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            GenerationError.SAMPLER_ERROR,
            f"invalid request: the text holds a lone UTF-16 surrogate at character {e.start}",
            ErrorKind.INVALID_REQUEST,
        ) from None
