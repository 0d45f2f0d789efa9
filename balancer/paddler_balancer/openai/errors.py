"""OpenAI's error envelope, and the request body parse that answers in it."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json

# ---- errors ---------------------------------------------------------------------------------

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    502: "server_error",
    503: "server_overloaded",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """A request outcome with its HTTP status, rendered in OpenAI's error envelope."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid_request(err: ValidationError) -> OpenAIError:
    """400 naming the first offending field (``messages.0.role``) and listing all problems."""
    problems = err.errors(include_url=False)
    parts = []
    for problem in problems:
        loc = ".".join(str(p) for p in problem["loc"]) or "body"
        parts.append(f"{loc}: {problem['msg']}")
    first = ".".join(str(p) for p in problems[0]["loc"]) if problems else None
    return OpenAIError(400, "invalid request: " + "; ".join(parts), code="invalid_request", param=first or None)


def parse_body(raw: bytes | bytearray) -> dict[str, Any]:
    """The JSON object of a request body; raises a 400 OpenAIError otherwise (not JSON,
    not UTF-8, non-finite or huge numbers, deep nesting, lone surrogates)."""
    try:
        body = parse_untrusted_json(raw)
    except UntrustedJsonError as err:
        raise OpenAIError(400, str(err), code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
    return body
