"""Small aiohttp helpers: JSON errors, body parsing, CORS."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": status, "kind": kind, "message": message}}, status=status)


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; raises HTTPBadRequest with a message otherwise."""
    try:
        return await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise web.HTTPBadRequest(
            text=json.dumps(
                {"error": {"code": 400, "kind": "invalid_json", "message": f"body is not valid JSON: {err}"}}
            ),
            content_type="application/json",
        ) from None


CORS_ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Content-Type, Authorization"
MAX_BODY_BYTES = 64 * 1024 * 1024


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


def api_app(*middlewares: Any, cors: CorsPolicy | None = None) -> web.Application:
    """An API application with CORS (checked before credentials: a preflight carries
    none) and our body-size limit."""
    app = web.Application(middlewares=[cors_preflight, *middlewares], client_max_size=MAX_BODY_BYTES)
    app[CORS_KEY] = cors or CorsPolicy()
    app.on_response_prepare.append(add_cors_headers)
    return app
