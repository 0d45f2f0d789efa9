"""Small aiohttp helpers: JSON errors, body parsing, CORS."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

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


CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
}
MAX_BODY_BYTES = 64 * 1024 * 1024


@web.middleware
async def cors_preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer CORS preflights (the admin panel calls the APIs from another origin)."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204)
    return await handler(request)


async def add_cors_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response gets the CORS headers, errors and streamed
    ones (SSE, NDJSON) included, because this runs when the headers are sent."""
    response.headers.update(CORS_HEADERS)


def api_app(*middlewares: Any) -> web.Application:
    """An API application with CORS and our body-size limit."""
    app = web.Application(middlewares=[cors_preflight, *middlewares], client_max_size=MAX_BODY_BYTES)
    app.on_response_prepare.append(add_cors_headers)
    return app
