"""Credentials on the balancer's doors: one middleware per listener, one place to read.

* Management port (``--management-token``): every route but ``/health`` (agent
  sockets, desired state, agents, SSE streams, ``/metrics``).
* Inference port (``--api-key``): every route but ``/health``, native and OpenAI.

A credential is accepted as ``Authorization: Bearer <secret>`` or as the password
of ``Authorization: Basic`` (what ``http://user:<secret>@host`` URLs make httpx and
websockets send, so ``paddler-client`` works unmodified). Browsers cannot put headers
on a WebSocket or an EventSource: those routes also read one documented query
parameter (``api_key`` on the native inference routes, ``management_token`` on the
two SSE streams). Comparisons are constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from paddler_balancer.http_util import Handler, json_error
from paddler_balancer.openai_types import OpenAIError

log = logging.getLogger(__name__)

API_KEY_QUERY_PARAM = "api_key"
MANAGEMENT_TOKEN_QUERY_PARAM = "management_token"
OPEN_PATHS = frozenset({"/health"})
"""Probes reach these without a credential."""
NATIVE_INFERENCE_PREFIX = "/api/v1/"
MANAGEMENT_STREAMS = frozenset({"/api/v1/agents/stream", "/api/v1/buffered_requests/stream"})


def presented_credential(request: web.Request, query_param: str | None) -> str | None:
    """The secret a request carries: Bearer, Basic password, or ``query_param``."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2] or None
    if query_param is not None:
        return request.query.get(query_param) or None
    return None


def matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Door:
    """What one listener asks of a request."""

    secret: str
    what: str
    """Human name of the credential, for messages and logs (``API key``)."""
    query_param: str
    query_allowed: Callable[[str], bool]
    """Paths (``request.path``) on which ``query_param`` is read."""
    reject: Callable[[web.Request, str], web.StreamResponse]

    def allows(self, request: web.Request) -> bool:
        if request.path in OPEN_PATHS or request.method == "OPTIONS":
            return True
        param = self.query_param if self.query_allowed(request.path) else None
        return matches(presented_credential(request, param), self.secret)

    def middleware(self) -> Any:
        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.allows(request):
                return await handler(request)
            log.info("request rejected reason=unauthorized door=%s path=%s", self.what, request.path)
            message = f"incorrect or missing {self.what} (Authorization: Bearer <{self.what}>)"
            return self.reject(request, message)

        return check


def _inference_reject(request: web.Request, message: str) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        err = OpenAIError(401, message[0].upper() + message[1:], code="invalid_api_key")
        return web.json_response(err.body(), status=401)
    return json_error(401, message, "unauthorized")


def _management_reject(_request: web.Request, message: str) -> web.StreamResponse:
    return json_error(401, message, "unauthorized")


def inference_door(api_key: str) -> Door:
    """``--api-key``: native routes also take ``?api_key=`` (browser WebSockets, clients
    that cannot send headers); the OpenAI routes only take headers."""
    return Door(
        secret=api_key,
        what="API key",
        query_param=API_KEY_QUERY_PARAM,
        query_allowed=lambda path: path.startswith(NATIVE_INFERENCE_PREFIX),
        reject=_inference_reject,
    )


def management_door(token: str) -> Door:
    """``--management-token``: the SSE streams also take ``?management_token=`` (EventSource)."""
    return Door(
        secret=token,
        what="management token",
        query_param=MANAGEMENT_TOKEN_QUERY_PARAM,
        query_allowed=lambda path: path in MANAGEMENT_STREAMS,
        reject=_management_reject,
    )
