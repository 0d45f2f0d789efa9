"""The agent process: dials the balancer, applies desired state, runs the engine.

One WebSocket to ``/api/v1/agent_socket/{agent_id}``; reconnects with backoff.
Outgoing messages collect in an outbox that one writer task flushes: everything
emitted in one event-loop turn (e.g. the tokens of one decode step) leaves as
one frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from paddler_agent.engine import Engine, StatusBoard
from paddler_agent.model_source import MODEL_SOURCE_NOT_ALLOWED, ModelAccess, ModelSourceError
from paddler_core.desired_state import BalancerDesiredState, state_revision
from paddler_core.inference import ErrorKind, GenerationError, ResponsePayload, generated_error_payload
from paddler_core.model_access import ModelUrlPolicy
from paddler_core.protocol import (
    AGENT_SOCKET_PATH,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    STATUS_INTERVAL_S,
    AgentIssue,
    EmbedMessage,
    GenerateConversation,
    GenerateRawPrompt,
    RegisterMessage,
    ReplyMessage,
    ResponseMessage,
    SetDesiredStateMessage,
    StateApplicationStatus,
    StatusMessage,
    batch_frames,
    encode_message,
    parse_generate_message,
)

AGENT_SECRET_HEADER = "X-Paddler-Agent-Secret"
"""Must match paddler_balancer.agent_claims (the agent does not import the balancer)."""

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.1
INVALID_DESIRED_STATE = "InvalidDesiredState"
"""Agent-issue variant of a desired state this agent refuses (out of bounds)."""
BACKOFF_MAX_S = 5.0
DRAIN_TIMEOUT_S = 50.0
"""On stop (SIGTERM), how long in-flight requests may take to finish (a pod's grace period is 60 s)."""


@dataclass(frozen=True)
class AgentSettings:
    management_addr: str
    """The balancer's management address, host:port."""
    slots: int
    name: str | None = None
    model_group: str = "default"
    engine: str = "llama"
    """``llama``, ``simulated`` or ``llama-server``."""
    model_cache_dir: str | None = None
    simulated_tokens_per_second: float = 100.0
    """Simulated engine: decode steps per second (one token per busy slot per step)."""
    simulated_max_tokens: int = 100
    simulated_load_time: float = 0.0
    """Simulated engine: seconds a model change takes to load."""
    agent_id: str | None = None
    management_token: str | None = None
    """Sent as ``Authorization: Bearer`` when the balancer requires one (``--management-token``)."""
    model_url_policy: ModelUrlPolicy = field(default_factory=ModelUrlPolicy)
    """Model URLs this agent downloads (checked again here: the balancer is not the only guard)."""
    model_local_roots: tuple[str, ...] = ()
    """Folders ``LocalToAgent`` paths must lie in; empty: any path."""

    llama_server_url: str = "http://127.0.0.1:8080"
    """``llama-server`` engine: the server's base URL. ``slots`` 0 means all of its slots."""
    llama_server_host_header: str | None = None
    llama_server_api_key: str | None = None

    @property
    def model_access(self) -> ModelAccess:
        return ModelAccess(self.model_url_policy, self.model_local_roots)


class AgentRuntime:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.agent_id = settings.agent_id or uuid.uuid4().hex
        self.agent_secret = secrets.token_urlsafe(32)
        """Claims ``agent_id`` at the balancer: nobody else can register under it."""
        self.board = StatusBoard()
        self.engine = self._make_engine()
        self._outbox: list[ResponseMessage | dict[str, Any]] = []
        self._outbox_ready = asyncio.Event()
        self._status_version = 0
        self._status_dirty = False
        self._active: set[str] = set()
        self._recent_prefixes: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._desired: BalancerDesiredState | None = None
        self._apply_task: asyncio.Task[None] | None = None
        self._stopping = False
        """Stop requested: report no slots, so the balancer sends nothing new, and drain."""
        self._drained = asyncio.Event()
        """Set when the last request in flight ends."""

    def _make_engine(self) -> Engine:
        s = self.settings
        if s.engine == "simulated":
            from paddler_agent.simulated import SimulatedEngine

            return SimulatedEngine(
                self,
                self.board,
                s.slots,
                tokens_per_second=s.simulated_tokens_per_second,
                max_tokens=s.simulated_max_tokens,
                load_time=s.simulated_load_time,
            )
        if s.engine == "llama-server":
            from paddler_agent.llama_server import LlamaServerEngine

            return LlamaServerEngine(
                self,
                self.board,
                s.slots or None,
                url=s.llama_server_url,
                host_header=s.llama_server_host_header,
                api_key=s.llama_server_api_key,
            )
        from paddler_agent.llama.engine import LlamaEngine

        cache = Path(s.model_cache_dir) if s.model_cache_dir else None
        return LlamaEngine(self, self.board, s.slots, model_cache_dir=cache, model_access=s.model_access)

    # ---- EngineHost --------------------------------------------------------------------

    def emit(self, request_id: str, payload: ResponsePayload, final: bool, error_kind: ErrorKind | None = None) -> None:
        if request_id not in self._active:
            return  # stopped or unknown: say nothing more about it
        if final:
            self._request_ended(request_id)
        message: ResponseMessage = {"type": "response", "request_id": request_id, "response": payload, "final": final}
        if error_kind is not None:
            message["error_kind"] = error_kind
        self._outbox.append(message)
        self._outbox_ready.set()

    def status_changed(self) -> None:
        self._status_dirty = True
        self._outbox_ready.set()

    # ---- connection ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        backoff = BACKOFF_INITIAL_S
        url = f"ws://{self.settings.management_addr}" + AGENT_SOCKET_PATH.format(agent_id=self.agent_id)
        headers = {AGENT_SECRET_HEADER: self.agent_secret}
        if self.settings.management_token:
            headers["Authorization"] = f"Bearer {self.settings.management_token}"
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.ws_connect(
                        url, heartbeat=5.0, max_msg_size=MAX_FRAME_BYTES, headers=headers
                    ) as ws:
                        backoff = BACKOFF_INITIAL_S
                        await self._serve_connection(ws, stop)
                except aiohttp.WSServerHandshakeError as err:
                    if err.status == 401:
                        log.error(
                            "balancer refused this agent's management token (HTTP 401): set --management-token "
                            "(env PADDLER_MANAGEMENT_TOKEN) to the balancer's; retry_in=%.1fs",
                            backoff,
                        )
                    else:
                        log.info("balancer unreachable url=%s error=%s retry_in=%.1fs", url, err, backoff)
                except (aiohttp.ClientError, OSError) as err:
                    log.info("balancer unreachable url=%s error=%s retry_in=%.1fs", url, err, backoff)
                except RejectedError as err:
                    log.error("balancer rejected this agent reason=%s", err)
                except (TimeoutError, ValueError) as err:
                    log.warning("handshake with balancer failed error=%s", err)
                self._connection_lost()
                if stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * (0.5 + random.random())):
                        await stop.wait()
                backoff = min(BACKOFF_MAX_S, backoff * 2)
        await self._cancel_apply()
        await self.engine.close()

    async def _serve_connection(self, ws: aiohttp.ClientWebSocketResponse, stop: asyncio.Event) -> None:
        register = RegisterMessage(
            protocol_version=PROTOCOL_VERSION,
            name=self.settings.name,
            model_group=self.settings.model_group,
            status=self._next_status(),
        )
        await ws.send_str(register.model_dump_json())
        decoded = await ws.receive_json(timeout=10.0)
        messages = decoded if isinstance(decoded, list) else [decoded]
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        if first.get("type") != "registered":
            raise RejectedError(str(first.get("reason", decoded)))
        log.info("registered agent_id=%s balancer=%s", self.agent_id, self.settings.management_addr)
        for message in messages[1:]:
            self._handle(message)
        tasks = [
            asyncio.create_task(self._write_loop(ws)),
            asyncio.create_task(self._status_ticker()),
            asyncio.create_task(stop.wait()),
        ]
        reader = asyncio.create_task(self._read_loop(ws))
        try:
            await asyncio.wait([reader, tasks[2]], return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set() and not reader.done():
                await self._drain(reader)
        finally:
            for task in [*tasks, reader]:
                task.cancel()
            for task in [*tasks, reader]:
                with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
                    await task
            await ws.close()

    async def _drain(self, reader: asyncio.Task[None]) -> None:
        """Stopping (e.g. a pod replaced by a rolling update): take no new requests, let the
        in-flight ones finish (up to DRAIN_TIMEOUT_S), then close."""
        self._stopping = True
        self.status_changed()
        if not self._active:
            return
        log.info("stopping: draining in-flight requests count=%d", len(self._active))
        self._drained.clear()
        drained = asyncio.create_task(self._drained.wait())
        try:
            await asyncio.wait([drained, reader], timeout=DRAIN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drained
        if self._active:
            log.warning("stopping with requests still in flight count=%d", len(self._active))

    def _request_ended(self, request_id: str) -> None:
        self._active.discard(request_id)
        if not self._active:
            self._drained.set()

    def _connection_lost(self) -> None:
        """The balancer dropped our requests with the socket: stop them all."""
        for request_id in list(self._active):
            self._active.discard(request_id)
            self.engine.stop(request_id)
        self._outbox.clear()

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                decoded = json.loads(msg.data)
            except (ValueError, RecursionError) as err:
                log.error("invalid frame from balancer error=%s", str(err)[:200])
                continue
            for message in decoded if isinstance(decoded, list) else (decoded,):
                self._handle(message)

    def _handle(self, message: Any) -> None:
        """One message; whatever it holds, it fails alone (its request gets an error
        payload) and never takes the connection down."""
        if not isinstance(message, dict):
            log.error("invalid message from balancer: not an object")
            return
        try:
            self._handle_unguarded(message)
        except Exception as err:
            log.exception("message from balancer failed type=%s", message.get("type"))
            self._fail_request(message, f"the agent could not handle this request: {type(err).__name__}: {err}")

    def _fail_request(self, message: dict[str, Any], text: str, error_kind: ErrorKind | None = None) -> None:
        request_id = message.get("request_id")
        if message.get("type") not in ("generate", "embed") or not isinstance(request_id, str):
            return
        self._active.add(request_id)
        if message["type"] == "embed":
            self.emit(request_id, {"Embedding": {"Error": text}}, True)
        else:
            self.emit(request_id, generated_error_payload(GenerationError.SAMPLER_ERROR, text), True, error_kind)

    def _handle_unguarded(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        try:
            if kind == "generate":
                generate = parse_generate_message(message)
                self._active.add(generate.request_id)
                self._remember_prefix(generate)
                self.engine.generate(generate)
            elif kind == "embed":
                embed = EmbedMessage.model_validate(message)
                self._active.add(embed.request_id)
                self.engine.embed(embed)
            elif kind == "stop":
                request_id = str(message["request_id"])
                if request_id in self._active:
                    self._request_ended(request_id)
                    self.engine.stop(request_id)
            elif kind == "set_desired_state":
                try:
                    desired = SetDesiredStateMessage.model_validate(message)
                except ValidationError as err:
                    revision = message.get("revision")
                    if isinstance(revision, str):
                        self.board.applied_state_revision = revision  # refused: a rolling swap stops on it
                    self._refuse_invalid_state(err)
                    return
                self._start_apply(desired.state, desired.revision or state_revision(desired.state))
            elif kind == "query":
                self._answer_query(str(message["request_id"]), str(message.get("what")))
            else:
                log.warning("unknown message from balancer type=%s", kind)
        except ValidationError as err:
            log.error("invalid message from balancer type=%s error=%s", kind, err)
            self._fail_request(message, f"invalid request: {err}", ErrorKind.INVALID_REQUEST)

    def _refuse_invalid_state(self, err: ValidationError) -> None:
        """A desired state out of bounds (an older balancer let it through): an issue."""
        log.error("desired state refused error=%s", err)
        issue = AgentIssue(variant=INVALID_DESIRED_STATE, params={"message": f"The desired state is invalid: {err}"})
        self.board.issues = [i for i in self.board.issues if i.variant != issue.variant] + [issue]
        self.board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        self.status_changed()

    def _answer_query(self, request_id: str, what: str) -> None:
        body: Any = None
        if what == "model_metadata":
            metadata = self.engine.model_metadata()
            body = {"metadata": metadata} if metadata is not None else None
        elif what == "chat_template_override":
            state = self._desired
            if state is not None and state.use_chat_template_override and state.chat_template_override:
                body = state.chat_template_override.model_dump()
        self._outbox.append(ReplyMessage(request_id=request_id, body=body).model_dump())
        self._outbox_ready.set()

    def _remember_prefix(self, generate: GenerateRawPrompt | GenerateConversation) -> None:
        """Publish the prefix keys of the last ``slots`` requests: what the slots'
        KV caches hold, so the balancer can route repeats here (for engines that do
        not publish what their slots really hold)."""
        if self.engine.publishes_prefix_hashes:
            return
        keys = generate.prefix_keys
        if not keys:
            return
        self._recent_prefixes[generate.request_id] = keys
        while len(self._recent_prefixes) > max(1, self.engine.slots):
            self._recent_prefixes.popitem(last=False)
        merged = sorted({k for ks in self._recent_prefixes.values() for k in ks})
        if merged != self.board.prefix_hashes:
            self.board.prefix_hashes = merged
            self.status_changed()

    def _start_apply(self, state: BalancerDesiredState, revision: str) -> None:
        if self._desired == state and self._apply_task is not None:
            return
        self._desired = state
        self.board.issues = [i for i in self.board.issues if i.variant != INVALID_DESIRED_STATE]
        self.board.uses_chat_template_override = bool(state.use_chat_template_override and state.chat_template_override)
        previous = self._apply_task

        async def apply() -> None:
            if previous is not None:
                previous.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await previous
            try:
                await asyncio.to_thread(self.settings.model_access.check_source, state.model)
            except ModelSourceError as err:
                self.board.applied_state_revision = revision  # refused: a rolling swap stops on it
                self._refuse_state(err)
                return
            self._clear_refusal()
            log.info("applying desired state model=%s", state.model.describe())
            await self.engine.apply_desired_state(state)
            self.board.applied_state_revision = revision  # the status now tells how this revision went
            self.status_changed()

        self._apply_task = asyncio.create_task(apply(), name="apply-desired-state")

    def _refuse_state(self, err: ModelSourceError) -> None:
        """A model source this agent's limits refuse: keep serving what it serves and say why."""
        log.warning("desired state refused issue=%s message=%s", err.variant, err.message)
        board = self.board
        board.issues = [i for i in board.issues if i.variant != MODEL_SOURCE_NOT_ALLOWED] + [err.to_issue()]
        board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        self.status_changed()

    def _clear_refusal(self) -> None:
        if any(i.variant == MODEL_SOURCE_NOT_ALLOWED for i in self.board.issues):
            self.board.issues = [i for i in self.board.issues if i.variant != MODEL_SOURCE_NOT_ALLOWED]
            self.status_changed()

    async def _cancel_apply(self) -> None:
        if self._apply_task is not None:
            self._apply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._apply_task

    def _next_status(self) -> Any:
        self._status_version += 1
        self._status_dirty = False
        status = self.board.snapshot(self._status_version)
        if self._stopping:
            status.slots_total = 0
        return status

    async def _status_ticker(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.status_changed()

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            messages, self._outbox = self._outbox, []
            if self._status_dirty:
                messages.append(StatusMessage(status=self._next_status()).model_dump(mode="json"))
            for frame in batch_frames([encode_message(m) for m in messages]):
                await ws.send_str(frame)


class RejectedError(Exception):
    pass


async def run_agent(settings: AgentSettings, stop: asyncio.Event) -> None:
    runtime = AgentRuntime(settings)
    log.info(
        "agent starting agent_id=%s engine=%s slots=%d model_group=%s",
        runtime.agent_id,
        settings.engine,
        settings.slots,
        settings.model_group,
    )
    await runtime.run(stop)
