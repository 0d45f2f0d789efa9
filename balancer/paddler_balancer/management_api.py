"""Management API (the management address): agents, buffer, desired state, metrics.

Paddler's routes (4.1: also ``/api/v1/balancer_applicable_state`` and the
``/stream`` SSE forms of it and of the desired state), plus per-model-group desired
state for pools that serve several models (the native
``/api/v1/balancer_desired_state`` is the default group).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, web
from pydantic import ValidationError

from paddler_balancer.agent_socket import OPEN_AGENT_SOCKETS, handle_agent_socket
from paddler_balancer.http_util import json_error, read_json, validation_message
from paddler_balancer.keys import BALANCER_KEY
from paddler_balancer.peers import PeerOutcome, peer_buffered, peer_session
from paddler_balancer.service import Balancer, Readiness
from paddler_core.desired_state import DEFAULT_MODEL_GROUP, BalancerDesiredState, MaxUnavailable
from paddler_core.management_wire import AgentsSnapshot
from paddler_core.model_access import ModelAccessDenied, ModelUrlPolicy
from paddler_core.owner import OWNER_HEADER

log = logging.getLogger(__name__)

SSE_KEEPALIVE_S = 15.0
SSE_WAKERS: web.AppKey[set[asyncio.Event]] = web.AppKey("sse_wakers", set)
SHUTTING_DOWN: web.AppKey[asyncio.Event] = web.AppKey("shutting_down", asyncio.Event)
PEER_SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("peer_session", aiohttp.ClientSession)
_GROUP_NAME = r"{group:[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?}"


def add_routes(app: web.Application) -> None:
    app[SSE_WAKERS] = set()
    app[OPEN_AGENT_SOCKETS] = set()
    app[SHUTTING_DOWN] = asyncio.Event()
    app.on_shutdown.append(_end_streams)
    if _balancer_of(app).settings.peer_management_addrs:
        app.cleanup_ctx.append(_peer_session_ctx)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/ready", ready)
    r.add_get("/api/v1/balancer", balancer_identity)
    r.add_get("/metrics", metrics)
    r.add_get("/api/v1/agent_socket/{agent_id}", agent_socket)
    r.add_get("/api/v1/agents", agents)
    r.add_get("/api/v1/agents/stream", agents_stream)
    r.add_get("/api/v1/buffered_requests", buffered_requests)
    r.add_get("/api/v1/buffered_requests/stream", buffered_requests_stream)
    r.add_get("/api/v1/balancer_desired_state", get_default_state)
    r.add_put("/api/v1/balancer_desired_state", put_default_state)
    r.add_get("/api/v1/balancer_desired_state/stream", default_state_stream)
    r.add_get("/api/v1/balancer_applicable_state", get_applicable_state)
    r.add_get("/api/v1/balancer_applicable_state/stream", applicable_state_stream)
    r.add_get("/api/v1/model_groups", model_groups)
    r.add_get(f"/api/v1/model_groups/{_GROUP_NAME}/desired_state", get_group_state)
    r.add_put(f"/api/v1/model_groups/{_GROUP_NAME}/desired_state", put_group_state)
    r.add_delete(f"/api/v1/model_groups/{_GROUP_NAME}/desired_state", delete_group_state)
    r.add_get(f"/api/v1/model_groups/{_GROUP_NAME}/rollout", get_group_rollout)
    r.add_get("/api/v1/agent/{agent_id}/model_metadata", model_metadata)
    r.add_get("/api/v1/agent/{agent_id}/chat_template_override", chat_template_override)


async def _end_streams(app: web.Application) -> None:
    """On shutdown, end every open event stream at once: they never end on their own,
    and the server would otherwise wait its shutdown timeout for them."""
    app[SHUTTING_DOWN].set()
    for waker in app[SSE_WAKERS]:
        waker.set()
    open_sockets = app[OPEN_AGENT_SOCKETS]
    sockets = list(open_sockets)
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"balancer shutting down") for ws in sockets),
        return_exceptions=True,
    )


def _balancer(request: web.Request) -> Balancer:
    return request.app[BALANCER_KEY]


def _balancer_of(app: web.Application) -> Balancer:
    return app[BALANCER_KEY]


async def _peer_session_ctx(app: web.Application) -> AsyncIterator[None]:
    session = peer_session(_balancer_of(app).settings.management_token)
    app[PEER_SESSION] = session
    yield
    await session.close()


async def health(_request: web.Request) -> web.Response:
    """Liveness: 200 while the process runs, draining included."""
    return web.Response(text="OK")


async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 while this replica takes requests; 503 before it does and while it
    drains (load balancers and Kubernetes endpoints stop sending it requests)."""
    readiness = _balancer(request).readiness
    return web.Response(status=200 if readiness is Readiness.SERVING else 503, text=readiness.value)


async def balancer_identity(request: web.Request) -> web.Response:
    """Which replica answers: its name (``--replica-name``), a random per-process id, and
    whether it takes requests."""
    balancer = _balancer(request)
    return web.json_response(
        {
            "replica_name": balancer.settings.replica_name,
            "instance_id": balancer.instance_id,
            "readiness": balancer.readiness.value,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    body = _balancer(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def agent_socket(request: web.Request) -> web.StreamResponse:
    return await handle_agent_socket(request, _balancer(request))


def _agents_body(balancer: Balancer) -> dict[str, Any]:
    ordered = sorted(balancer.pool.agents.values(), key=lambda a: a.order)
    return AgentsSnapshot(agents=[a.snapshot() for a in ordered]).model_dump(mode="json")


def _buffered_body(balancer: Balancer) -> dict[str, Any]:
    return {"buffered_requests_current": balancer.dispatcher.buffered}


async def agents(request: web.Request) -> web.Response:
    return web.json_response(_agents_body(_balancer(request)))


async def buffered_requests(request: web.Request) -> web.Response:
    """All buffered requests, or (``?model_group=m``) those of one group: KEDA's
    metrics-api trigger of a ModelDeployment reads its own group's count.

    ``?scope=pool`` adds every peer replica's own count (``--peer-management-addr``; KEDA
    reaches one replica but scales on the pool's), and, with ``model_group``, the group's
    busy slots (``slots_processing``: every agent reports the requests of all replicas, so
    one replica's view is the pool's; KEDA's second trigger, so that a group serving
    without a queue is not scaled in); ``?scope=replica`` is this replica's count with its
    ``instance_id`` (how a replica recognises itself among its peers).
    Without ``scope``: Paddler's body, this replica's count."""
    balancer = _balancer(request)
    group = request.query.get("model_group")
    scope = request.query.get("scope")
    own = balancer.dispatcher.buffered if group is None else balancer.dispatcher.buffered_by_group()[group]
    if scope is None:
        return web.json_response({"buffered_requests_current": own})
    if scope == "replica":
        return web.json_response({"buffered_requests_current": own, "instance_id": balancer.instance_id})
    if scope != "pool":
        return json_error(400, f"invalid scope {scope!r}; use pool or replica", "invalid_scope")
    peers = balancer.settings.peer_management_addrs
    counts = await peer_buffered(request.app[PEER_SESSION], peers, group, balancer.instance_id) if peers else []
    counted = [c for c in counts if c.outcome is PeerOutcome.COUNTED]
    body = {
        "buffered_requests_current": own + sum(c.count for c in counted),
        "replicas": 1 + len(counted),
        "unreachable": sum(1 for c in counts if c.outcome is PeerOutcome.UNREACHABLE),
    }
    if group is not None:
        body["slots_processing"] = sum(a.busy_slots for a in balancer.pool.in_group(group))
    return web.json_response(body)


async def agents_stream(request: web.Request) -> web.StreamResponse:
    balancer = _balancer(request)
    changed = asyncio.Event()
    balancer.pool.on_change(changed.set)
    try:
        return await _sse(request, changed, lambda: _agents_body(balancer))
    finally:
        balancer.pool.remove_listener(changed.set)


async def buffered_requests_stream(request: web.Request) -> web.StreamResponse:
    balancer = _balancer(request)
    changed = balancer.dispatcher.watch()
    try:
        return await _sse(request, changed, lambda: _buffered_body(balancer))
    finally:
        balancer.dispatcher.unwatch(changed)


async def _sse(request: web.Request, changed: asyncio.Event, body: Callable[[], dict[str, Any]]) -> web.StreamResponse:
    """Server-sent events: the current body at once, then again on each change."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    stopping, wakers = request.app[SHUTTING_DOWN], request.app[SSE_WAKERS]
    wakers.add(changed)
    try:
        last = ""
        while not stopping.is_set():
            current = json.dumps(body())
            if current != last:
                await response.write(f"data: {current}\n\n".encode())
                last = current
            changed.clear()
            try:
                async with asyncio.timeout(SSE_KEEPALIVE_S):
                    await changed.wait()
            except TimeoutError:
                await response.write(b": keepalive\n\n")
            await asyncio.sleep(0.05)  # coalesce bursts of changes into one event
    finally:
        wakers.discard(changed)
    await response.write_eof()
    return response


def applicable_state(state: BalancerDesiredState) -> dict[str, Any]:
    """Paddler 4.1's ``AgentDesiredState``: what agents apply from a desired state (the
    chat template override only when ``use_chat_template_override`` is on)."""
    body = state.to_json_dict()
    use = body.pop("use_chat_template_override")
    if not use:
        body["chat_template_override"] = None
    return body


async def get_applicable_state(request: web.Request) -> web.Response:
    return web.json_response(applicable_state(_balancer(request).store.get(DEFAULT_MODEL_GROUP)))


async def _state_stream(request: web.Request, body: Callable[[], dict[str, Any]]) -> web.StreamResponse:
    balancer = _balancer(request)
    changed = asyncio.Event()
    balancer.pool.on_change(changed.set)  # set_desired_state announces every change
    try:
        return await _sse(request, changed, body)
    finally:
        balancer.pool.remove_listener(changed.set)


async def default_state_stream(request: web.Request) -> web.StreamResponse:
    store = _balancer(request).store
    return await _state_stream(request, lambda: store.get(DEFAULT_MODEL_GROUP).to_json_dict())


async def applicable_state_stream(request: web.Request) -> web.StreamResponse:
    store = _balancer(request).store
    return await _state_stream(request, lambda: applicable_state(store.get(DEFAULT_MODEL_GROUP)))


def _parse_state(body: Any, policy: ModelUrlPolicy) -> BalancerDesiredState | web.Response:
    try:
        state = BalancerDesiredState.model_validate(body)
    except ValidationError as err:
        return json_error(400, validation_message(err), "invalid_desired_state")
    if state.model.kind == "Url" and state.model.url is not None:
        try:
            policy.check_url(state.model.url.url)
        except ModelAccessDenied as err:
            return json_error(400, f"model.Url.url: {err}", "model_url_not_allowed")
    return state


async def get_default_state(request: web.Request) -> web.Response:
    return web.json_response(_balancer(request).store.get(DEFAULT_MODEL_GROUP).to_json_dict())


async def put_default_state(request: web.Request) -> web.Response:
    return await _put_state(request, DEFAULT_MODEL_GROUP)


async def get_group_state(request: web.Request) -> web.Response:
    group = request.match_info["group"]
    store = _balancer(request).store
    if group not in store.groups and group != DEFAULT_MODEL_GROUP:
        return json_error(404, f"model group {group!r} has no desired state", "unknown_model_group")
    return web.json_response(store.get(group).to_json_dict())


async def put_group_state(request: web.Request) -> web.Response:
    return await _put_state(request, request.match_info["group"])


async def delete_group_state(request: web.Request) -> web.Response:
    group = request.match_info["group"]
    if not _balancer(request).delete_desired_state(group):
        return json_error(404, f"model group {group!r} has no desired state", "unknown_model_group")
    return web.Response(status=204)


async def get_group_rollout(request: web.Request) -> web.Response:
    group = request.match_info["group"]
    rollout = _balancer(request).rollouts.by_group.get(group)
    if rollout is None:
        return json_error(404, f"model group {group!r} has had no desired state change", "no_rollout")
    return web.json_response(rollout.to_json())


async def _put_state(request: web.Request, group: str) -> web.Response:
    """204 at once: the state then rolls over the group's agents (``GET .../rollout``),
    at most ``?max_unavailable=`` (a count or a percentage) of them switching at a time."""
    max_unavailable: MaxUnavailable | None = None
    if "max_unavailable" in request.query:
        try:
            max_unavailable = MaxUnavailable.parse(request.query["max_unavailable"])
        except ValueError as err:
            return json_error(400, str(err), "invalid_max_unavailable")
    parsed = _parse_state(await read_json(request), _balancer(request).settings.model_url_policy)
    if isinstance(parsed, web.Response):
        return parsed
    _balancer(request).set_desired_state(group, parsed, request.headers.get(OWNER_HEADER), max_unavailable)
    return web.Response(status=204)


async def model_groups(request: web.Request) -> web.Response:
    balancer = _balancer(request)
    groups = []
    for name in balancer.store.names():
        entry = balancer.store.groups.get(name)
        members = balancer.pool.in_group(name)
        rollout = balancer.rollouts.by_group.get(name)
        groups.append(
            {
                "name": name,
                "owner": entry.owner if entry else None,
                "desired_state": balancer.store.get(name).to_json_dict(),
                "version": balancer.store.version(name),
                "agents": len(members),
                "slots_total": sum(a.status.slots_total for a in members),
                "slots_in_flight": sum(a.in_flight for a in members),
                "rollout": rollout.to_json() if rollout is not None else None,
            }
        )
    return web.json_response({"model_groups": groups})


async def _query(request: web.Request, what: str) -> web.Response:
    agent_id = request.match_info["agent_id"]
    try:
        body = await _balancer(request).query_agent(agent_id, what)
    except KeyError:
        return json_error(404, f"agent {agent_id!r} is not connected", "unknown_agent")
    except TimeoutError:
        return json_error(504, f"agent {agent_id!r} did not answer in time", "agent_timeout")
    return web.json_response(body)


async def model_metadata(request: web.Request) -> web.Response:
    return await _query(request, "model_metadata")


async def chat_template_override(request: web.Request) -> web.Response:
    return await _query(request, "chat_template_override")
