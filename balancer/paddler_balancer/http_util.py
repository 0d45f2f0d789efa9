"""Small aiohttp helpers: JSON errors, body parsing, CORS."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from paddler_core.untrusted_json import UntrustedJsonError, parse_untrusted_json

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
            parsed.scheme in ("http", "https")
            and parsed.port in self.admin_panel_ports
            and parsed.host == request_host
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


def api_app(
    *middlewares: Any, cors: CorsPolicy | None = None, body_limit: int = MAX_BODY_BYTES
) -> web.Application:
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
