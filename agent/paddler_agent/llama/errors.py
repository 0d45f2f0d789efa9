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
