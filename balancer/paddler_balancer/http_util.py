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


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Allow the admin panel (another origin) to call the management and inference APIs."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        response: web.StreamResponse = web.Response(status=204)
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
    if isinstance(response, web.HTTPException) and response.status >= 400:
        raise response
    return response
