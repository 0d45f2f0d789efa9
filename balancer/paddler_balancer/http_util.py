"""Small aiohttp helpers: JSON errors, body parsing, CORS, and the credential check on
the balancer's doors (one middleware per listener)."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from paddler_balancer.openai.errors import OpenAIError
from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": status, "kind": kind, "message": message}}, status=status)


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


class BodyError(Exception):
    """A request body we refuse, with its status (400, 413, 415) and a message for people.

    ``api_app``'s middleware answers it as a JSON error; the OpenAI API catches it
    first to answer in OpenAI's envelope."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


MAX_BODY_BYTES = 16 * 1024 * 1024
"""Largest request body of the inference APIs (prompts, conversations, embedding
batches); larger ones get 413 before they are read."""
MAX_MANAGEMENT_BODY_BYTES = 8 * 1024 * 1024
"""Largest management body (a desired state with its chat template)."""
BODY_LIMIT_KEY: web.AppKey[int] = web.AppKey("body_limit", int)
_UTF8 = ("utf-8", "utf8")


def _too_large(limit: int, size: str) -> BodyError:
    return BodyError(413, f"the request body ({size}) is larger than the limit of {limit} bytes", "body_too_large")


def check_json_content_type(request: web.Request) -> None:
    """A JSON body must say so (or say nothing): ``text/plain`` or a form is refused with
    415 instead of being parsed as JSON by accident; a charset other than UTF-8 with 400."""
    if "Content-Type" in request.headers:
        mime = request.content_type
        if mime != "application/json" and not mime.endswith("+json"):
            raise BodyError(
                415, f"Content-Type must be application/json, not {mime or 'empty'}", "unsupported_media_type"
            )
    charset = request.charset
    if charset is not None and charset.strip().lower() not in _UTF8:
        raise BodyError(400, f"charset {charset[:40]!r} is not supported; JSON bodies are UTF-8", "invalid_charset")


async def read_body(request: web.Request) -> bytearray:
    """The body, refused with 413 by its declared length before reading, or as soon as a
    body without one (chunked) passes the app's limit."""
    limit = request.app.get(BODY_LIMIT_KEY, MAX_BODY_BYTES)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit, f"{declared} bytes")
    body = bytearray()
    async for chunk in request.content.iter_any():
        if len(body) + len(chunk) > limit:
            # Free it now: the exception's traceback keeps this frame (and so the buffer)
            # alive until the cyclic GC runs, which large bytes alone never trigger.
            body.clear()
            raise _too_large(limit, f"over {limit} bytes, sent without a length")
        body += chunk
    return body


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; raises BodyError (400/413/415) with a message otherwise."""
    check_json_content_type(request)
    raw = await read_body(request)
    try:
        return parse_untrusted_json(raw)
    except UntrustedJsonError as err:
        raise BodyError(400, str(err), "invalid_json") from None


@web.middleware
async def body_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """413 for a declared length over the limit before the handler runs (nothing is
    read), and BodyError raised by a handler as a JSON error."""
    limit = request.app.get(BODY_LIMIT_KEY, MAX_BODY_BYTES)
    declared = request.content_length
    try:
        if declared is not None and declared > limit:
            raise _too_large(limit, f"{declared} bytes")
        return await handler(request)
    except BodyError as err:
        if request.path.startswith("/v1/"):  # the OpenAI API answers in OpenAI's envelope
            error = {"message": err.message, "type": "invalid_request_error", "param": None, "code": err.kind}
            return web.json_response({"error": error}, status=err.status)
        return json_error(err.status, err.message, err.kind)


CORS_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Content-Type, Authorization"


@dataclass(frozen=True)
class CorsPolicy:
    """Which browser origins may call an API (``--*-cors-allowed-host``, repeatable).

    An allowed origin gets its own origin echoed back (never ``*``, unless ``*`` itself
    is listed); others get no CORS headers, and their preflights a 403. The admin
    panel's origin (the panel's port on the host the browser used) is always allowed.
    """

    allowed_origins: frozenset[str] = frozenset()
    admin_panel_ports: set[int] = field(default_factory=set)
    """The panel's bound port, added once it listens (it may be port 0 until then)."""

    def allows(self, origin: str, request_host: str | None) -> bool:
        if "*" in self.allowed_origins or origin.rstrip("/") in self.allowed_origins:
            return True
        if not self.admin_panel_ports or request_host is None:
            return False
        try:
            parsed = URL(origin)
        except ValueError:
            return False
        return (
            parsed.scheme in ("http", "https") and parsed.port in self.admin_panel_ports and parsed.host == request_host
        )


def normalize_origin(text: str) -> str:
    """``http://Host:3000/`` -> ``http://host:3000``; ``*`` stays ``*``. Raises ValueError."""
    if text.strip() == "*":
        return "*"
    url = URL(text.strip())
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/") or url.query_string:
        raise ValueError(f"invalid CORS origin {text!r}; expected scheme://host[:port], e.g. http://localhost:3000")
    return str(url.origin())


CORS_KEY = web.AppKey("cors_policy", CorsPolicy)


def _cors_origin(request: web.Request) -> str | None:
    """The request's Origin when the app's policy allows it."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    policy = request.app[CORS_KEY]
    return origin if policy.allows(origin, request.url.host) else None


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights: 204 for an allowed origin, 403 for any other."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if _cors_origin(request) is None:
            return json_error(403, "this origin may not call this API (see --*-cors-allowed-host)", "cors_refused")
        return web.Response(status=204)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response to an allowed origin gets the CORS headers,
    errors and streamed ones (SSE, NDJSON) included, because this runs when the headers
    are sent."""
    response.headers.add("Vary", "Origin")
    origin = _cors_origin(request)
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
    response.headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS


def api_app(*middlewares: Any, cors: CorsPolicy | None = None, body_limit: int = MAX_BODY_BYTES) -> web.Application:
    """An API application with CORS (checked before credentials: a preflight carries
    none) and our body-size limit."""
    app = web.Application(middlewares=[cors_preflight, body_errors, *middlewares], client_max_size=body_limit)
    app[CORS_KEY] = cors or CorsPolicy()
    app[BODY_LIMIT_KEY] = body_limit
    app.on_response_prepare.append(add_cors_headers)
    return app


def keep_large_buffers_out_of_the_heap() -> None:
    """Make glibc serve every allocation over 1 MiB with its own mmap, returned to the
    OS when freed. By default glibc raises that threshold after the first large free (up
    to 32 MiB), so the bodies of rejected or finished big requests stay in the heap and
    the process keeps their memory while idle. No-op where glibc is absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1024 * 1024)


# ---- credentials ----------------------------------------------------------------------------
#
# Credentials on the balancer's doors: one middleware per listener, one place to read.
#
# * Management port (``--management-token``): every route but ``/health`` (agent
#   sockets, desired state, agents, SSE streams, ``/metrics``).
# * Inference port (``--api-key``): every route but ``/health``, native and OpenAI.
#
# A credential is accepted as ``Authorization: Bearer <secret>`` or as the password
# of ``Authorization: Basic`` (what ``http://user:<secret>@host`` URLs make httpx and
# websockets send, so ``paddler-client`` works unmodified). Browsers cannot put headers
# on a WebSocket or an EventSource: those routes also read one documented query
# parameter (``api_key`` on the native inference routes, ``management_token`` on the
# two SSE streams). Comparisons are constant-time.

API_KEY_QUERY_PARAM = "api_key"
MANAGEMENT_TOKEN_QUERY_PARAM = "management_token"
OPEN_PATHS = frozenset({"/health", "/ready"})
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
