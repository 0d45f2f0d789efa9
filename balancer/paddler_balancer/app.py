"""App factories and the server lifecycle of ``paddler balancer``.

The composition root: ``BALANCER_KEY`` (how every handler finds the :class:`Balancer`) is
defined here, and the API modules, which read it, are imported by the factories that
mount them (so importing an API module never needs this module's factories first).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from paddler_balancer.agent_claims import CLAIMS_KEY, AgentClaims
from paddler_balancer.http_util import (
    MAX_MANAGEMENT_BODY_BYTES,
    CorsPolicy,
    api_app,
    inference_door,
    keep_large_buffers_out_of_the_heap,
    management_door,
    normalize_origin,
)
from paddler_balancer.metrics import statsd_reporter
from paddler_balancer.service import Balancer
from paddler_balancer.settings import BalancerSettings, parse_addr

log = logging.getLogger(__name__)

BALANCER_KEY: web.AppKey[Balancer] = web.AppKey("balancer", Balancer)


def _inference_middlewares(balancer: Balancer) -> list[Any]:
    api_key = balancer.settings.api_key
    return [inference_door(api_key).middleware()] if api_key else []


def _cors(origins: tuple[str, ...], panel_ports: set[int] | None) -> CorsPolicy:
    allowed = frozenset(normalize_origin(o) for o in origins)
    return CorsPolicy(allowed, panel_ports if panel_ports is not None else set())


def inference_app(balancer: Balancer, panel_ports: set[int] | None = None) -> web.Application:
    """Native and OpenAI-compatible inference APIs on one address. ``panel_ports``: the
    admin panel's port(s), whose origin CORS allows (filled in once the panel listens)."""
    from paddler_balancer import inference_api
    from paddler_balancer.openai import api as openai_api
    from paddler_balancer.openai import responses_api

    settings = balancer.settings
    app = api_app(*_inference_middlewares(balancer), cors=_cors(settings.inference_cors_allowed_hosts, panel_ports))
    app[BALANCER_KEY] = balancer
    inference_api.add_routes(app)
    openai_api.add_routes(app)
    responses_api.add_routes(app)
    return app


def compat_openai_app(balancer: Balancer) -> web.Application:
    """The OpenAI-compatible API alone (``--compat-openai-addr``, Paddler compatibility)."""
    from paddler_balancer import inference_api
    from paddler_balancer.openai import api as openai_api
    from paddler_balancer.openai import responses_api

    settings = balancer.settings
    app = api_app(*_inference_middlewares(balancer), cors=_cors(settings.inference_cors_allowed_hosts, None))
    app[BALANCER_KEY] = balancer
    app.router.add_get("/health", inference_api.health)
    openai_api.add_routes(app)
    responses_api.add_routes(app)
    return app


def management_app(balancer: Balancer, panel_ports: set[int] | None = None) -> web.Application:
    from paddler_balancer import management_api

    settings = balancer.settings
    token = settings.management_token
    middlewares = [management_door(token).middleware()] if token else []
    app = api_app(
        *middlewares,
        cors=_cors(settings.management_cors_allowed_hosts, panel_ports),
        body_limit=MAX_MANAGEMENT_BODY_BYTES,
    )
    app[CLAIMS_KEY] = AgentClaims()
    app[BALANCER_KEY] = balancer
    management_api.add_routes(app)
    if balancer.settings.statsd_addr:
        app.cleanup_ctx.append(_statsd_ctx)
    return app


async def _statsd_ctx(app: web.Application) -> AsyncIterator[None]:
    balancer = app[BALANCER_KEY]
    settings = balancer.settings
    assert settings.statsd_addr is not None
    task = asyncio.create_task(
        statsd_reporter(
            balancer.metrics,
            parse_addr(settings.statsd_addr),
            settings.statsd_prefix,
            settings.statsd_reporting_interval,
        )
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _start(app: web.Application, addr: str, name: str, shutdown_timeout: float = 60.0) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler at once,
    # which leaves the buffer and frees the slot (see Balancer.generation).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    host, port = parse_addr(addr)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    actual = _bound_port(runner, port)
    # One stable line per listener: tests and scripts read the real port from it.
    print(f"paddler listening service={name} url=http://{host}:{actual}", flush=True)
    log.info("listening service=%s host=%s port=%s", name, host, actual)
    return runner


def _bound_port(runner: web.AppRunner, default: int) -> int:
    """The port the runner actually listens on (port 0 resolved)."""
    for sockname in runner.addresses:
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return int(sockname[1])
    return default


def _bound_addr(runner: web.AppRunner, addr: str) -> str:
    """``addr`` with the port the runner actually listens on."""
    host, port = parse_addr(addr)
    port = _bound_port(runner, port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _log_doors(settings: BalancerSettings) -> None:
    """Say at startup which doors are open: a keyless management port lets anyone who can
    reach it repoint the pool's model or register agents."""
    if settings.management_token:
        log.info("management port requires a token (--management-token)")
    else:
        log.warning(
            "management port is OPEN: no --management-token (env PADDLER_MANAGEMENT_TOKEN); anyone who "
            "reaches %s can change the desired state and register agents",
            settings.management_addr,
        )
    if not settings.api_key:
        log.info("inference API is open: no --api-key (env PADDLER_API_KEY)")
    log.info("model URLs allowed: %s", settings.model_url_policy.describe())


async def serve(settings: BalancerSettings, stop: asyncio.Event | None = None) -> None:
    _log_doors(settings)
    keep_large_buffers_out_of_the_heap()
    balancer = Balancer(settings)
    panel_ports: set[int] = set()
    runners = [
        # Its streams (SSE of an open admin panel, agent sockets) never end on their own: without a
        # short timeout they hold a SIGTERM for 60 s. It stops last, after inference has drained.
        await _start(
            management_app(balancer, panel_ports), settings.management_addr, "management", shutdown_timeout=1.0
        ),
        await _start(inference_app(balancer, panel_ports), settings.inference_addr, "inference"),
    ]
    if settings.compat_openai_addr:
        runners.append(await _start(compat_openai_app(balancer), settings.compat_openai_addr, "compat_openai"))
    if settings.web_admin_panel_addr:
        from paddler_balancer.admin_panel import admin_panel_app

        # The panel's pages call the APIs: hand it the bound addresses (port 0 resolved).
        bound = dataclasses.replace(
            settings,
            management_addr=_bound_addr(runners[0], settings.management_addr),
            inference_addr=_bound_addr(runners[1], settings.inference_addr),
        )
        panel = await _start(admin_panel_app(bound), settings.web_admin_panel_addr, "web_admin_panel")
        runners.append(panel)
        panel_ports.add(parse_addr(_bound_addr(panel, settings.web_admin_panel_addr))[1])
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
