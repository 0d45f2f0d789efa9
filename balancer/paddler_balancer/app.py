"""App factories and the server lifecycle of ``paddler balancer``.

The composition root: nothing in the balancer imports this module. The key every handler
finds the :class:`Balancer` by (``BALANCER_KEY``) lives in ``keys``, which the handlers
import instead of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from paddler_balancer import inference_api, management_api
from paddler_balancer.admin_panel import admin_panel_app
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
from paddler_balancer.keys import BALANCER_KEY
from paddler_balancer.metrics import statsd_reporter
from paddler_balancer.openai import api as openai_api
from paddler_balancer.openai import responses_api
from paddler_balancer.service import Balancer, Readiness
from paddler_balancer.settings import BalancerSettings, parse_addr

log = logging.getLogger(__name__)

FINAL_WRITES_S = 1.0
"""After a drain: how long the inference listeners' last handlers get before they are
cancelled (the last bytes of a finished stream)."""
IDLE_GRACE_S = 2.0
"""After a draining replica's last request: how long clients get to send one more on a
kept-alive connection (answered, with ``Connection: close``) before idle connections are
closed; closing one while a request is on its way would fail that request."""
REPLICA_HEADER = "X-Paddler-Balancer"
"""On every management and inference response: the replica that answered."""


def _replica_header(name: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    async def add(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = name

    return add


def _close_when_draining(balancer: Balancer) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Inference responses of a draining replica end their connection (``Connection:
    close``): a client's next request opens a new one, which reaches another replica,
    instead of being sent on a kept-alive connection the replica is about to close."""

    async def close(_request: web.Request, response: web.StreamResponse) -> None:
        if balancer.readiness is Readiness.DRAINING and not isinstance(response, web.WebSocketResponse):
            response.force_close()
            response.headers["Connection"] = "close"

    return close


def _api_app(balancer: Balancer, *middlewares: Any, cors: CorsPolicy, body_limit: int | None = None) -> web.Application:
    """``api_app`` that knows its balancer and names the replica on every response."""
    app = (
        api_app(*middlewares, cors=cors)
        if body_limit is None
        else api_app(*middlewares, cors=cors, body_limit=body_limit)
    )
    app[BALANCER_KEY] = balancer
    app.on_response_prepare.append(_replica_header(balancer.settings.replica_name))
    return app


def _inference_middlewares(balancer: Balancer) -> list[Any]:
    api_key = balancer.settings.api_key
    return [inference_door(api_key).middleware()] if api_key else []


def _cors(origins: tuple[str, ...], panel_ports: set[int] | None) -> CorsPolicy:
    allowed = frozenset(normalize_origin(o) for o in origins)
    return CorsPolicy(allowed, panel_ports if panel_ports is not None else set())


def inference_app(balancer: Balancer, panel_ports: set[int] | None = None) -> web.Application:
    """Native and OpenAI-compatible inference APIs on one address. ``panel_ports``: the
    admin panel's port(s), whose origin CORS allows (filled in once the panel listens)."""
    settings = balancer.settings
    app = _api_app(
        balancer, *_inference_middlewares(balancer), cors=_cors(settings.inference_cors_allowed_hosts, panel_ports)
    )
    app.on_response_prepare.append(_close_when_draining(balancer))
    inference_api.add_routes(app)
    openai_api.add_routes(app)
    responses_api.add_routes(app)
    return app


def compat_openai_app(balancer: Balancer) -> web.Application:
    """The OpenAI-compatible API alone (``--compat-openai-addr``, Paddler compatibility)."""
    settings = balancer.settings
    app = _api_app(balancer, *_inference_middlewares(balancer), cors=_cors(settings.inference_cors_allowed_hosts, None))
    app.on_response_prepare.append(_close_when_draining(balancer))
    app.router.add_get("/health", inference_api.health)
    openai_api.add_routes(app)
    responses_api.add_routes(app)
    return app


def management_app(balancer: Balancer, panel_ports: set[int] | None = None) -> web.Application:
    settings = balancer.settings
    token = settings.management_token
    middlewares = [management_door(token).middleware()] if token else []
    app = _api_app(
        balancer,
        *middlewares,
        cors=_cors(settings.management_cors_allowed_hosts, panel_ports),
        body_limit=MAX_MANAGEMENT_BODY_BYTES,
    )
    app[CLAIMS_KEY] = AgentClaims()
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
    """Run until ``stop`` is set (SIGTERM, SIGINT), then stop gracefully: readiness off
    (``GET /ready`` answers 503), keep accepting for ``drain_delay`` seconds, stop
    accepting inference, let in-flight and buffered requests finish for at most
    ``drain_timeout`` seconds (agents stay connected meanwhile), then close the rest."""
    _log_doors(settings)
    keep_large_buffers_out_of_the_heap()
    balancer = Balancer(settings)
    panel_ports: set[int] = set()
    # Its streams (SSE of an open admin panel, agent sockets) never end on their own: without a
    # short timeout they hold a SIGTERM for 60 s. It stops last, after inference has drained.
    management = await _start(
        management_app(balancer, panel_ports), settings.management_addr, "management", shutdown_timeout=1.0
    )
    runners = [management]
    try:
        inference = [
            await _start(
                inference_app(balancer, panel_ports),
                settings.inference_addr,
                "inference",
                shutdown_timeout=FINAL_WRITES_S,
            )
        ]
        runners += inference
        if settings.compat_openai_addr:
            compat = await _start(
                compat_openai_app(balancer), settings.compat_openai_addr, "compat_openai", FINAL_WRITES_S
            )
            inference.append(compat)
            runners.append(compat)
        if settings.web_admin_panel_addr:
            runners.append(await _start_panel(settings, management, inference[0], panel_ports))
        balancer.readiness = Readiness.SERVING
        log.info("ready replica=%s instance_id=%s", settings.replica_name, balancer.instance_id)
        await (stop or asyncio.Event()).wait()
        await _drain(balancer, inference)
        runners = [runner for runner in runners if runner not in inference]
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        await balancer.close()


async def _start_panel(
    settings: BalancerSettings, management: web.AppRunner, inference: web.AppRunner, panel_ports: set[int]
) -> web.AppRunner:
    assert settings.web_admin_panel_addr is not None
    # The panel's pages call the APIs: hand it the bound addresses (port 0 resolved).
    bound = dataclasses.replace(
        settings,
        management_addr=_bound_addr(management, settings.management_addr),
        inference_addr=_bound_addr(inference, settings.inference_addr),
    )
    panel = await _start(admin_panel_app(bound), settings.web_admin_panel_addr, "web_admin_panel")
    panel_ports.add(parse_addr(_bound_addr(panel, settings.web_admin_panel_addr))[1])
    return panel


def _load(balancer: Balancer) -> tuple[int, int]:
    """(streaming, buffered) inference requests."""
    buffered = balancer.dispatcher.buffered
    return max(0, balancer.active_requests - buffered), buffered


async def _drain(balancer: Balancer, inference: list[web.AppRunner]) -> None:
    """Readiness off, then stop accepting inference and wait (at most the drain timeout)
    for its requests, buffered ones included, and for its kept-alive connections."""
    settings = balancer.settings
    balancer.readiness = Readiness.DRAINING
    in_flight, buffered = _load(balancer)
    log.info(
        "draining phase=readiness_off delay_s=%g in_flight=%d buffered=%d", settings.drain_delay, in_flight, buffered
    )
    if settings.drain_delay > 0:
        await asyncio.sleep(settings.drain_delay)
    began = time.monotonic()
    in_flight, buffered = _load(balancer)
    log.info(
        "draining phase=stop_accepting in_flight=%d buffered=%d timeout_s=%g",
        in_flight,
        buffered,
        settings.drain_timeout,
    )
    for runner in inference:
        for site in list(runner.sites):
            await site.stop()
    await _until_drained(balancer, inference, began + settings.drain_timeout)
    in_flight, buffered = _load(balancer)
    await asyncio.gather(*(runner.cleanup() for runner in inference))
    log.info("drained after=%.2fs in_flight=%d buffered=%d", time.monotonic() - began, in_flight, buffered)


async def _until_drained(balancer: Balancer, inference: list[web.AppRunner], deadline: float) -> None:
    """Until no inference request is left and no client connection is open, or, once the
    requests are done, IDLE_GRACE_S for connections that stay open idle; at most until
    ``deadline``."""
    idle_since: float | None = None
    while (now := time.monotonic()) < deadline:
        if balancer.active_requests > 0:
            idle_since = None
        else:
            connections = sum(len(r.server.connections) for r in inference if r.server is not None)
            idle_since = idle_since or now
            if connections == 0 or now - idle_since >= IDLE_GRACE_S:
                return
        await asyncio.sleep(0.05)
