"""``/api/v1/agent_socket/{agent_id}``: the WebSocket agents dial into.

Reader: register handshake, then status snapshots, streamed responses, refusals
(routed again by the service) and query replies. Writer: a queue drained by one task, so ``AgentController.send`` never
blocks the caller. When the socket closes the agent is removed at once and its
requests fail with 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from paddler_balancer.agent_claims import AGENT_SECRET_HEADER, CLAIMS_KEY
from paddler_balancer.agents import AgentController
from paddler_balancer.service import Balancer
from paddler_balancer.streams import StreamFailure
from paddler_core.inference import response_payload_problem
from paddler_core.protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    AgentStatus,
    RefusedMessage,
    RegisteredMessage,
    RegisterMessage,
    RejectedMessage,
    batch_frames,
    encode_message,
    received_payload,
)

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
OPEN_AGENT_SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("open_agent_sockets", set)
"""Closed by the management app on shutdown, so a SIGTERM does not wait on them."""


async def handle_agent_socket(request: web.Request, balancer: Balancer) -> web.WebSocketResponse:
    agent_id = request.match_info["agent_id"]
    ws = web.WebSocketResponse(heartbeat=5.0, max_msg_size=MAX_FRAME_BYTES)
    await ws.prepare(request)
    open_sockets = request.app.get(OPEN_AGENT_SOCKETS, set())
    open_sockets.add(ws)
    try:
        return await _serve_agent(request, balancer, agent_id, ws)
    finally:
        open_sockets.discard(ws)


async def _serve_agent(
    request: web.Request, balancer: Balancer, agent_id: str, ws: web.WebSocketResponse
) -> web.WebSocketResponse:
    register = await _read_register(ws, agent_id)
    if register is None:
        await ws.close()
        return ws
    claims = request.app.get(CLAIMS_KEY)
    if claims is not None:
        refused = claims.admit(agent_id, request.headers.get(AGENT_SECRET_HEADER), agent_id in balancer.pool.agents)
        if refused is not None:
            log.warning("agent rejected agent_id=%s reason=id-claimed peer=%s", agent_id, request.remote)
            await ws.send_str(RejectedMessage(reason=refused).model_dump_json())
            await ws.close()
            return ws

    outbox: asyncio.Queue[str] = asyncio.Queue()
    agent = AgentController(
        id=agent_id,
        name=register.name,
        model_group=register.model_group,
        send=lambda message: outbox.put_nowait(message if isinstance(message, str) else encode_message(message)),
        status=register.status,
    )
    agent.send(RegisteredMessage(agent_id=agent_id).model_dump())
    balancer.send_initial_state(agent)
    replaced = balancer.pool.add(agent)
    if replaced is not None:
        balancer.agent_lost(replaced)
    balancer.status_received(agent)
    log.info(
        "agent registered agent_id=%s name=%s model_group=%s slots_total=%d",
        agent_id,
        register.name,
        register.model_group,
        register.status.slots_total,
    )

    writer = asyncio.create_task(_write_loop(ws, outbox), name=f"agent-writer-{agent_id}")
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            _dispatch_frame(balancer, agent, msg.data)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
            await writer
        if balancer.pool.agents.get(agent_id) is agent:
            balancer.agent_lost(agent)
        else:
            agent.connected = False
        await ws.close()
    return ws


async def _read_register(ws: web.WebSocketResponse, agent_id: str) -> RegisterMessage | None:
    try:
        async with asyncio.timeout(REGISTER_TIMEOUT_S):
            msg = await ws.receive()
    except TimeoutError:
        log.warning("agent did not register in time agent_id=%s", agent_id)
        return None
    if msg.type != WSMsgType.TEXT:
        return None
    try:
        register = RegisterMessage.model_validate_json(msg.data)
    except ValidationError as err:
        await ws.send_str(RejectedMessage(reason=f"invalid register message: {err}").model_dump_json())
        log.warning("agent rejected agent_id=%s reason=invalid-register", agent_id)
        return None
    if register.protocol_version != PROTOCOL_VERSION:
        reason = (
            f"protocol version {register.protocol_version} is not supported; "
            f"this balancer speaks version {PROTOCOL_VERSION}"
        )
        await ws.send_str(RejectedMessage(reason=reason).model_dump_json())
        log.warning("agent rejected agent_id=%s reason=version-mismatch", agent_id)
        return None
    return register


async def _write_loop(ws: web.WebSocketResponse, outbox: asyncio.Queue[str]) -> None:
    while True:
        messages = [await outbox.get()]
        while not outbox.empty():
            messages.append(outbox.get_nowait())
        for frame in batch_frames(messages):
            await ws.send_str(frame)


def _dispatch_frame(balancer: Balancer, agent: AgentController, data: str) -> None:
    try:
        decoded = json.loads(data)
    except (ValueError, RecursionError) as err:  # not JSON, a huge integer, deep nesting
        log.warning("agent sent invalid JSON agent_id=%s error=%s", agent.id, str(err)[:200])
        return
    for message in decoded if isinstance(decoded, list) else (decoded,):
        try:
            _dispatch_message(balancer, agent, message)
        except Exception:  # a broken agent must not take its socket reader down
            log.exception("agent message not handled agent_id=%s", agent.id)


def _dispatch_message(balancer: Balancer, agent: AgentController, message: Any) -> None:
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "response":
        stream = agent.streams.get(str(message.get("request_id")))
        if stream is None:
            return
        payload = received_payload(message)
        problem = response_payload_problem(payload)
        if problem is not None:
            log.warning(
                "agent sent an invalid payload agent_id=%s request_id=%s problem=%s",
                agent.id,
                stream.request_id,
                problem,
            )
            stream.fail(StreamFailure.INVALID_PAYLOAD)
            return
        balancer.agent_answered(agent)
        stream.push(payload, message.get("final") is True)
    elif kind == "status":
        try:
            status = AgentStatus.model_validate(message["status"])
        except (ValidationError, KeyError) as err:
            log.warning("agent sent invalid status agent_id=%s error=%s", agent.id, err)
            return
        if balancer.pool.update_status(agent, status):
            balancer.status_received(agent)
    elif kind == "refused":
        try:
            refused = RefusedMessage.model_validate(message)
        except ValidationError as err:
            log.warning("agent sent invalid refusal agent_id=%s error=%s", agent.id, str(err)[:200])
            return
        balancer.request_refused(agent, refused.request_id, refused.reason)
    elif kind == "reply":
        balancer.reply_received(str(message.get("request_id")), message.get("body"))
    else:
        log.warning("agent sent unknown message agent_id=%s type=%s", agent.id, kind)
