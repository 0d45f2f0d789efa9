"""The agent's health doors for Kubernetes: ``/ready``, ``/live`` and ``/started`` (``--health-addr``).

An agent pod takes no traffic through a Service (the agent dials its balancers), so its
probes do not steer requests: they tell Kubernetes the truth about the pod, which the
Deployment (``minReadySeconds``, ``maxUnavailable``), the PodDisruptionBudget and the
kubelet act on.

* ``/ready``: 200 only while the agent can serve: linked to at least one balancer, its
  desired state applied (model loaded), slots > 0, not stopping, and, for an engine that
  forwards to a server (llama-server), that server answers its ``/health`` now. A rolling
  update then replaces the next agents only once the new ones serve, and a node drain
  waits for them. 503 at once after SIGTERM.
* ``/live``: 200 while the event loop answers (this handler runs on it) and the engine's
  decode loop is not stuck: the llama engine's decode thread stamps a heartbeat every turn,
  also while idle; a heartbeat older than ``decode_stall_timeout`` while a model is loaded
  is 503, and the kubelet restarts the container.
* ``/started``: the startup probe, see :func:`startup`.

Each 503 carries a short JSON reason (:class:`HealthProblem`). The decisions are pure
functions of a :class:`HealthView`, tested with tables; the app only gathers the view.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from aiohttp import web

from paddler_core.addresses import split_host_port
from paddler_core.protocol import StateApplicationStatus

log = logging.getLogger(__name__)

DECODE_STALL_TIMEOUT_S = 30.0
"""Seconds without a decode-loop heartbeat (while a model is loaded) after which ``/live`` fails.
One decode step (a prompt chunk of ``n_batch`` tokens, an image, an embedding batch) takes far less."""


class HealthProblem(StrEnum):
    """Why a probe answers 503 (the ``reason`` of its JSON body)."""

    STOPPING = "stopping"
    """SIGTERM received: the agent drains its in-flight requests and takes no new ones."""
    NOT_LINKED = "not-linked"
    """No balancer replica has registered this agent (yet, or any more)."""
    NO_DESIRED_STATE = "no-desired-state"
    """No balancer has told this agent what to serve."""
    APPLYING = "applying"
    """The desired state is being applied: downloading, loading or swapping the model."""
    NOT_APPLIED = "state-not-applied"
    """Applying the desired state ended without serving it (see the agent's issues)."""
    NO_SLOTS = "no-slots"
    """The engine serves no slot now (e.g. llama-server went away)."""
    BACKEND_UNAVAILABLE = "backend-unavailable"
    """The server the engine forwards to (llama-server) does not answer its ``/health``."""
    DECODE_LOOP_STALLED = "decode-loop-stalled"
    """The decode loop of the loaded model has not turned for longer than the stall timeout."""
    FIRST_LOAD_PENDING = "first-load-pending"
    """The agent has not finished applying its first desired state."""


@dataclass(frozen=True)
class HealthView:
    """What the probes decide on, read from the agent runtime at the moment of asking."""

    stopping: bool
    linked_balancers: int
    holds_desired_state: bool
    applying: bool
    state_application_status: StateApplicationStatus
    slots_total: int
    first_application_ended: bool
    """Latched: the agent has finished applying a desired state once (served it or reported an issue)."""
    decode_heartbeat: float | None
    """``time.monotonic()`` of the decode loop's last turn; None where no decode loop runs."""


def readiness(view: HealthView) -> HealthProblem | None:
    """Why the agent cannot serve now, or None (the backend check comes on top, see the app)."""
    if view.stopping:
        return HealthProblem.STOPPING
    if view.linked_balancers == 0:
        return HealthProblem.NOT_LINKED
    if not view.holds_desired_state:
        return HealthProblem.NO_DESIRED_STATE
    if view.applying:
        return HealthProblem.APPLYING
    if view.state_application_status != StateApplicationStatus.APPLIED:
        return HealthProblem.NOT_APPLIED
    if view.slots_total <= 0:
        return HealthProblem.NO_SLOTS
    return None


def liveness(view: HealthView, now: float, stall_timeout: float) -> HealthProblem | None:
    """Why the agent should be restarted, or None. ``now`` is ``time.monotonic()``.

    Nothing outside the process counts (an unreachable balancer or a failed model load is
    not cured by a restart); only a decode loop that stopped turning while a model is
    loaded (a hung or dead native thread) does."""
    heartbeat = view.decode_heartbeat
    if heartbeat is not None and now - heartbeat > stall_timeout:
        return HealthProblem.DECODE_LOOP_STALLED
    return None


def startup(view: HealthView, now: float, stall_timeout: float) -> HealthProblem | None:
    """The startup probe: 503 until the agent has finished applying its first desired state
    (the model downloaded and loaded, or the attempt ended with an issue), then as ``/live``.

    Why this gate: the kubelet runs no liveness probe before the startup probe passes, so
    the first download and load get the whole startup window (``startupTimeoutSeconds``)
    and a load that hangs is restarted after it. A model that cannot be loaded ends the
    application with an issue, which passes this probe: the pod stays up and says why
    (readiness stays off) instead of crash-looping on a file that will not get better.
    An agent that reaches no balancer for the whole window is restarted too; it holds
    nothing, so that costs nothing but the restart."""
    if not view.first_application_ended:
        return HealthProblem.FIRST_LOAD_PENDING
    return liveness(view, now, stall_timeout)


class HealthSource(Protocol):
    """What the health app reads (the agent runtime)."""

    def health_view(self) -> HealthView:
        """A snapshot of the runtime's state (on the event loop, no I/O)."""

    async def backend_problem(self) -> str | None:
        """Why the server the engine forwards to cannot serve, asked now; None when it can or there is none."""


@dataclass(frozen=True)
class HealthConfig:
    source: HealthSource
    stall_timeout: float = DECODE_STALL_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic


HEALTH_KEY: web.AppKey[HealthConfig] = web.AppKey("health", HealthConfig)


def _answer(problem: HealthProblem | None, detail: str = "") -> web.Response:
    if problem is None:
        return web.json_response({"status": "ok"})
    body = {"status": "unavailable", "reason": str(problem)}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=503)


async def _ready(request: web.Request) -> web.Response:
    config = request.app[HEALTH_KEY]
    problem = readiness(config.source.health_view())
    if problem is not None:
        return _answer(problem)
    detail = await config.source.backend_problem()
    if detail is not None:
        return _answer(HealthProblem.BACKEND_UNAVAILABLE, detail)
    return _answer(None)


async def _live(request: web.Request) -> web.Response:
    config = request.app[HEALTH_KEY]
    return _answer(liveness(config.source.health_view(), config.clock(), config.stall_timeout))


async def _started(request: web.Request) -> web.Response:
    config = request.app[HEALTH_KEY]
    return _answer(startup(config.source.health_view(), config.clock(), config.stall_timeout))


def health_app(config: HealthConfig) -> web.Application:
    """``GET /ready``, ``/live`` and ``/started`` over ``config.source``."""
    app = web.Application()
    app[HEALTH_KEY] = config
    app.router.add_get("/ready", _ready)
    app.router.add_get("/live", _live)
    app.router.add_get("/started", _started)
    return app


@contextlib.asynccontextmanager
async def serve_health(addr: str | None, config: HealthConfig) -> AsyncIterator[None]:
    """Serve the health doors on ``addr`` (host:port; port 0 picks one) for the block's lifetime;
    nothing when ``addr`` is None."""
    if addr is None:
        yield
        return
    host, port = split_host_port(addr)
    runner = web.AppRunner(health_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
        actual = _bound_port(runner, port)
        # One stable line per listener: tests and scripts read the real port from it.
        print(f"paddler listening service=health url=http://{host}:{actual}", flush=True)
        log.info("listening service=health host=%s port=%s", host, actual)
        yield
    finally:
        await runner.cleanup()


def _bound_port(runner: web.AppRunner, default: int) -> int:
    for sockname in runner.addresses:
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            return int(sockname[1])
    return default
