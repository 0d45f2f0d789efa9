"""The web admin panel: plain HTML/CSS/JS served from package data, no build step.

The pages run in the browser and call the balancer's management and inference
APIs directly (both allow the panel's origin by CORS). When the balancer requires a
management token or an API key, the pages ask for it and keep it in the tab's
sessionStorage; the panel's own server never holds or hands out credentials. ``GET /config.json`` tells them where
those APIs are, plus what the model page needs to render its form: every
inference parameter with its type, bounds, default and a short explanation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from paddler_balancer.settings import BalancerSettings, parse_addr
from paddler_core.desired_state import DEFAULT_MODEL_GROUP, BalancerDesiredState, InferenceParameters

STATIC_DIR = Path(__file__).resolve().parent / "static"
PAGES = ("/", "/model", "/prompt")
"""Paths that serve the panel's single HTML page; its script picks the view by path."""

_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "*"}

SAMPLING, PENALTIES, ENGINE, EMBEDDINGS = "Sampling", "Repetition penalties", "Engine", "Embeddings and images"

PARAMETERS: dict[str, tuple[str, str, str]] = {
    # name: (section, label, one-sentence explanation)
    "temperature": (
        SAMPLING,
        "Temperature",
        "Randomness of sampling: 0 always picks the likeliest token, higher is more varied.",
    ),
    "top_k": (SAMPLING, "Top K", "Sample only from the K likeliest tokens; 0 turns it off."),
    "top_p": (SAMPLING, "Top P", "Sample only from the likeliest tokens whose odds add up to this share."),
    "min_p": (SAMPLING, "Min P", "Drop tokens less likely than this share of the likeliest token; 0 turns it off."),
    "penalty_repeat": (PENALTIES, "Repeat penalty", "Divide the odds of recently used tokens by this; 1 turns it off."),
    "penalty_presence": (
        PENALTIES,
        "Presence penalty",
        "Penalise tokens that appeared at all, nudging the model to new topics.",
    ),
    "penalty_frequency": (PENALTIES, "Frequency penalty", "Penalise tokens by how often they already appeared."),
    "penalty_last_n": (
        PENALTIES,
        "Penalty window",
        "Recent tokens the penalties look at; -1 is the whole context, 0 turns them off.",
    ),
    "context_size": (ENGINE, "Context size", "Tokens each slot holds: prompt plus reply. Long chats need more."),
    "n_batch": (ENGINE, "Batch size", "Prompt tokens decoded per engine step; larger is faster, uses more memory."),
    "n_gpu_layers": (ENGINE, "GPU layers", "Model layers offloaded to a GPU; 0 runs on the CPU only."),
    "k_cache_dtype": (ENGINE, "K cache type", "Number format of the attention key cache; smaller saves memory."),
    "v_cache_dtype": (ENGINE, "V cache type", "Number format of the attention value cache; smaller saves memory."),
    "enable_embeddings": (EMBEDDINGS, "Enable embeddings", "Load the model so it also answers embedding requests."),
    "embedding_batch_size": (EMBEDDINGS, "Embedding batch size", "Documents embedded together in one engine call."),
    "pooling_type": (EMBEDDINGS, "Pooling", "How the vectors of a document's tokens become one embedding."),
    "image_resize_to_fit": (
        EMBEDDINGS,
        "Image size limit",
        "Images wider or taller than this many pixels are scaled down first.",
    ),
}
"""Section, label and explanation of each inference parameter, in the order the model page shows them."""


def parameter_fields() -> list[dict[str, Any]]:
    """Every inference parameter with its type, bounds and default, in declaration order."""
    schema = InferenceParameters.model_json_schema()
    defs: dict[str, Any] = schema.get("$defs", {})
    properties: dict[str, Any] = schema["properties"]
    order = [n for n in PARAMETERS if n in properties] + [n for n in properties if n not in PARAMETERS]
    fields: list[dict[str, Any]] = []
    for name in order:
        prop = properties[name]
        section, label, help_text = PARAMETERS.get(name, (ENGINE, name.replace("_", " ").capitalize(), ""))
        ref = prop.get("$ref") or next((p.get("$ref") for p in prop.get("allOf", []) if "$ref" in p), None)
        field: dict[str, Any] = {
            "name": name,
            "label": label,
            "section": section,
            "default": prop.get("default"),
            "help": help_text,
        }
        if ref is not None:
            field["type"] = "enum"
            field["choices"] = defs[ref.rsplit("/", 1)[-1]]["enum"]
        else:
            field["type"] = prop["type"]
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if key in prop:
                    field[key] = prop[key]
        fields.append(field)
    return fields


def public_url(addr: str, request_host: str, scheme: str = "http") -> str:
    """A URL the browser can reach for a bound ``host:port``.

    A wildcard host (``0.0.0.0``, ``::``) is not an address a browser can dial;
    use the host name the browser used to reach the panel instead.
    """
    host, port = parse_addr(addr)
    if host in _WILDCARD_HOSTS:
        host = request_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def panel_config(settings: BalancerSettings, request_host: str) -> dict[str, Any]:
    management = public_url(settings.management_addr, request_host)
    inference = public_url(settings.inference_addr, request_host)
    return {
        "management_url": management,
        "inference_url": inference,
        "inference_socket_url": public_url(settings.inference_addr, request_host, "ws") + "/api/v1/inference_socket",
        "agent_command": f"paddler agent --management-addr {management.removeprefix('http://')} --slots 4"
        + (' --management-token "$PADDLER_MANAGEMENT_TOKEN"' if settings.management_token else ""),
        "replica_name": settings.replica_name,
        "default_model_group": DEFAULT_MODEL_GROUP,
        "default_desired_state": BalancerDesiredState().to_json_dict(),
        "inference_parameters": parameter_fields(),
        "max_buffered_requests": settings.max_buffered_requests,
        # Whether the pages must ask for credentials (never the credentials themselves).
        "management_token_required": settings.management_token is not None,
        "api_key_required": settings.api_key is not None,
    }


_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' http: https: ws: wss:; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _request_hostname(request: web.Request) -> str:
    host = request.url.host or "127.0.0.1"
    return host.strip("[]")


def admin_panel_app(settings: BalancerSettings) -> web.Application:
    """The panel's aiohttp app; ``settings`` carries the bound API addresses."""
    index = (STATIC_DIR / "index.html").read_bytes()

    async def page(_request: web.Request) -> web.Response:
        return web.Response(
            body=index,
            content_type="text/html",
            charset="utf-8",
            headers={**_SECURITY_HEADERS, "Cache-Control": "no-cache"},
        )

    async def config(request: web.Request) -> web.Response:
        body = panel_config(settings, _request_hostname(request))
        return web.Response(
            text=json.dumps(body),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    for path in PAGES:
        app.router.add_get(path, page)
    app.router.add_get("/config.json", config)
    app.router.add_get("/health", health)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    return app
