"""The error a request can meet inside the engine."""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot run; ``kind`` is the Paddler GeneratedToken error variant."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
