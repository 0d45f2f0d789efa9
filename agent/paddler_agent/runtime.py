"""The agent process: serves every balancer replica, applies desired state, runs the engine.

One link (a WebSocket to ``/api/v1/agent_socket/{agent_id}``, reconnecting with its
own backoff) per balancer replica: :mod:`paddler_agent.links`. The status goes to
every link; a request is answered on the link it came in on; and the agent is the
arbiter of its slots (:func:`~paddler_agent.admission.admission`): what no slot can
take is refused at once, whatever a replica believed. A desired state is applied only
when it is newer than the one held (:func:`~paddler_core.desired_state.judge_state_offer`),
so a replica restarted empty never makes the agent unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from paddler_agent.admission import admission
from paddler_agent.engine import Engine, StatusBoard
from paddler_agent.health import DECODE_STALL_TIMEOUT_S, HealthConfig, HealthView, serve_health
from paddler_agent.links import (
    CONNECT_TIMEOUT_S,
    BalancerLink,
    Credentials,
    LinkSet,
)
from paddler_agent.model_files import ModelAccess, ModelSourceError
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import BalancerDesiredState, StateOffer, judge_state_offer, state_revision
from paddler_core.generated_output import RequestFamily, request_failed
from paddler_core.inference import ErrorKind, ResponsePayload
from paddler_core.model_access import ModelUrlPolicy
from paddler_core.protocol import (
    MAX_AGENT_SLOTS,
    PROTOCOL_VERSION,
    AgentIssue,
    AgentStatus,
    EmbedMessage,
    GenerateConversation,
    GenerateRawPrompt,
    RefusalReason,
    RefusedMessage,
    RegisterMessage,
    ReplyMessage,
    ResponseMessage,
    SetDesiredStateMessage,
    StateApplicationStatus,
    StatusMessage,
    parse_generate_message,
)

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 50.0
"""On stop (SIGTERM), how long in-flight requests may take to finish by default (``--drain-timeout``;
the operator renders the ModelDeployment's ``rollout.drainTimeoutSeconds``)."""


@dataclass(frozen=True)
class AgentSettings:
    management_addrs: tuple[str, ...]
    """The balancer replicas' management addresses, host:port each. A name that resolves
    to several addresses (a headless Service) stands for every one of them."""
    slots: int
    name: str | None = None
    model_group: str = "default"
    engine: str = "llama"
    """``llama``, ``simulated`` or ``llama-server``."""
    resolve_interval: float = 5.0
    """Seconds between two lookups of the names in ``management_addrs`` (IP literals are not looked up)."""
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

    drain_timeout: float = DRAIN_TIMEOUT_S
    """Seconds a stopping agent (SIGTERM) waits for its in-flight requests before it closes its links."""
    health_addr: str | None = None
    """host:port of the health doors (``/ready``, ``/live``, ``/started``); None: not served."""
    decode_stall_timeout: float = DECODE_STALL_TIMEOUT_S
    """Seconds without a decode-loop heartbeat (model loaded) after which ``/live`` answers 503."""

    @property
    def model_access(self) -> ModelAccess:
        return ModelAccess(self.model_url_policy, self.model_local_roots)


class AgentRuntime:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.agent_id = settings.agent_id or uuid.uuid4().hex
        self.agent_secret = secrets.token_urlsafe(32)
        """Claims ``agent_id`` at every balancer replica: nobody else can register under it."""
        self.board = StatusBoard()
        self.engine = self._make_engine()
        self._links: LinkSet | None = None
        """One link per balancer replica (while running); statuses go to each."""
        self._status_version = 0
        self._active: dict[str, BalancerLink] = {}
        """Requests accepted and not ended, over all links -> the link each came in on."""
        self._recent_prefixes: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._desired: BalancerDesiredState | None = None
        """The desired state held (applying or applied)."""
        self._desired_version: int | None = None
        self._desired_revision: str | None = None
        self._apply_task: asyncio.Task[None] | None = None
        self._stopping = False
        """Stop requested: report no slots to every replica, refuse new requests, drain."""
        self._drained = asyncio.Event()
        """Set when the last request in flight ends."""
        self._first_application_ended = False
        """Latched once applying a desired state has ended (served, or refused with an issue)."""

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
        link = self._active.get(request_id)
        if link is None:
            return  # stopped, lost with its link, or unknown: say nothing more about it
        if final:
            self._request_ended(request_id)
        message: ResponseMessage = {"type": "response", "request_id": request_id, "response": payload, "final": final}
        if error_kind is not None:
            message["error_kind"] = error_kind
        link.send(message)

    def status_changed(self) -> None:
        for link in self._links or ():
            link.status_changed()

    # ---- LinkHost ------------------------------------------------------------------------

    def register_message(self) -> str:
        register = RegisterMessage(
            protocol_version=PROTOCOL_VERSION,
            name=self.settings.name,
            model_group=self.settings.model_group,
            status=self._next_status(),
        )
        return register.model_dump_json()

    def status_message(self) -> dict[str, Any]:
        return StatusMessage(status=self._next_status()).model_dump(mode="json")

    def link_lost(self, link: BalancerLink) -> int:
        """That replica dropped our requests with its socket: stop them (only them)."""
        lost = [request_id for request_id, owner in self._active.items() if owner is link]
        for request_id in lost:
            self._request_ended(request_id)
            self.engine.stop(request_id)
        return len(lost)

    def handle(self, link: BalancerLink, message: Any) -> None:
        """One message from ``link``; whatever it holds, it fails alone (its request gets
        an error payload) and never takes the link down."""
        if not isinstance(message, dict):
            log.error("invalid message from balancer: not an object balancer=%s", link.address)
            return
        try:
            self._handle_unguarded(link, message)
        except Exception as err:
            log.exception("message from balancer failed type=%s balancer=%s", message.get("type"), link.address)
            self._fail_request(link, message, f"the agent could not handle this request: {type(err).__name__}: {err}")

    # ---- running -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve every replica until ``stop``; then drain and close every link."""
        credentials = Credentials(self.agent_id, self.agent_secret, self.settings.management_token)
        closing = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            links = self._links = LinkSet(
                self, session, credentials, self.settings.management_addrs, self.settings.resolve_interval
            )
            maintainer = asyncio.create_task(links.maintain(closing), name="balancer-links")
            try:
                await stop.wait()
                await self._drain()
            finally:
                closing.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintainer
                await links.close()
        await self._cancel_apply()
        await self.engine.close()

    async def _drain(self) -> None:
        """Stopping (e.g. a pod replaced by a rolling update): report no slots to every
        replica, refuse new requests, let the in-flight ones finish (up to ``settings.drain_timeout``)."""
        self._stopping = True
        self.status_changed()
        if not self._active:
            return
        log.info("stopping: draining in-flight requests count=%d", len(self._active))
        self._drained.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.drain_timeout):
                await self._drained.wait()
        if self._active:
            log.warning("stopping with requests still in flight count=%d", len(self._active))

    # ---- health (paddler_agent.health) ------------------------------------------------------

    def health_view(self) -> HealthView:
        applying = self._apply_task is not None and not self._apply_task.done()
        return HealthView(
            stopping=self._stopping,
            linked_balancers=sum(link.registered for link in self._links or ()),
            holds_desired_state=self._desired is not None,
            applying=applying,
            state_application_status=self.board.state_application_status,
            slots_total=self.board.slots_total,
            first_application_ended=self._first_application_ended,
            decode_heartbeat=self.engine.decode_heartbeat(),
        )

    async def backend_problem(self) -> str | None:
        return await self.engine.backend_problem()

    def _request_ended(self, request_id: str) -> None:
        if self._active.pop(request_id, None) is None:
            return
        self.status_changed()
        if not self._active:
            self._drained.set()

    def _accept(self, link: BalancerLink, request_id: str) -> bool:
        """The arbiter: True when ``request_id`` may run; otherwise it is refused on ``link``."""
        reason = admission(stopping=self._stopping, running=len(self._active), slots_total=self.board.slots_total)
        if reason is None and request_id in self._active:
            log.warning("request id already in flight request_id=%s balancer=%s", request_id, link.address)
            reason = RefusalReason.NO_FREE_SLOT
        if reason is not None:
            log.info("request refused request_id=%s reason=%s balancer=%s", request_id, reason, link.address)
            link.send(RefusedMessage(request_id=request_id, reason=reason).model_dump(mode="json"))
            return False
        self._active[request_id] = link
        self.status_changed()
        return True

    def _fail_request(
        self, link: BalancerLink, message: dict[str, Any], text: str, error_kind: ErrorKind | None = None
    ) -> None:
        request_id = message.get("request_id")
        if message.get("type") not in ("generate", "embed") or not isinstance(request_id, str):
            return
        if request_id in self._active:  # the same id in flight (from another replica): not this one
            link.send(RefusedMessage(request_id=request_id, reason=RefusalReason.NO_FREE_SLOT).model_dump(mode="json"))
            return
        self._active[request_id] = link
        if message["type"] == "embed":  # the balancer reads an error kind of generations only
            self.emit(request_id, request_failed(RequestFamily.EMBEDDING, text), True)
        else:
            self.emit(request_id, request_failed(RequestFamily.GENERATION, text), True, error_kind)

    def _handle_unguarded(self, link: BalancerLink, message: dict[str, Any]) -> None:
        kind = message.get("type")
        try:
            if kind == "generate":
                generate = parse_generate_message(message)
                if self._accept(link, generate.request_id):
                    self._remember_prefix(generate)
                    self.engine.generate(generate)
            elif kind == "embed":
                embed = EmbedMessage.model_validate(message)
                if self._accept(link, embed.request_id):
                    self.engine.embed(embed)
            elif kind == "stop":
                request_id = str(message["request_id"])
                if self._active.get(request_id) is link:
                    self._request_ended(request_id)
                    self.engine.stop(request_id)
            elif kind == "set_desired_state":
                self._offered_state(link, message)
            elif kind == "query":
                self._answer_query(link, str(message["request_id"]), str(message.get("what")))
            else:
                log.warning("unknown message from balancer type=%s balancer=%s", kind, link.address)
        except ValidationError as err:
            log.error("invalid message from balancer type=%s balancer=%s error=%s", kind, link.address, err)
            self._fail_request(link, message, f"invalid request: {err}", ErrorKind.INVALID_REQUEST)

    # ---- desired state ---------------------------------------------------------------------

    def _offered_state(self, link: BalancerLink, message: dict[str, Any]) -> None:
        """A replica's ``set_desired_state``: applied only when newer than the one held."""
        try:
            desired = SetDesiredStateMessage.model_validate(message)
        except ValidationError as err:
            revision = message.get("revision")
            if isinstance(revision, str):
                self.board.applied_state_revision = revision  # refused: a rolling swap stops on it
            self._refuse_invalid_state(err)
            return
        revision = desired.revision or state_revision(desired.state)
        offer = judge_state_offer(self._desired, self._desired_version, desired.state, desired.version)
        if offer is StateOffer.IGNORE_OLDER:
            log.info(
                "desired state ignored version=%s held_version=%s balancer=%s",
                desired.version,
                self._desired_version,
                link.address,
            )
            return
        if offer is StateOffer.ADOPT_VERSION:
            if desired.version is not None:
                self._desired_version = desired.version
            self._adopt_revision(revision)
        else:
            self._desired_version = desired.version
            self._desired_revision = revision
            self._start_apply(desired.state, revision)
        self.status_changed()

    def _adopt_revision(self, revision: str) -> None:
        """The same state under a newer version: reload nothing; echo its revision once applied."""
        if revision == self._desired_revision:
            return
        self._desired_revision = revision
        if self._apply_task is None or self._apply_task.done():
            self.board.applied_state_revision = revision

    def _refuse_invalid_state(self, err: ValidationError) -> None:
        """A desired state out of bounds (an older balancer let it through): an issue."""
        log.error("desired state refused error=%s", err)
        issue = AgentIssue(
            variant=AgentIssueVariant.INVALID_DESIRED_STATE, params={"message": f"The desired state is invalid: {err}"}
        )
        self.board.issues = [i for i in self.board.issues if i.variant != issue.variant] + [issue]
        self.board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        self._first_application_ended = True
        self.status_changed()

    def _answer_query(self, link: BalancerLink, request_id: str, what: str) -> None:
        body: Any = None
        if what == "model_metadata":
            metadata = self.engine.model_metadata()
            body = {"metadata": metadata} if metadata is not None else None
        elif what == "chat_template_override":
            state = self._desired
            if state is not None and state.use_chat_template_override and state.chat_template_override:
                body = state.chat_template_override.model_dump()
        elif what == "desired_state" and self._desired is not None:
            body = {"state": self._desired.to_json_dict(), "version": self._desired_version}
        link.send(ReplyMessage(request_id=request_id, body=body).model_dump())

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
        self.board.issues = [i for i in self.board.issues if i.variant != AgentIssueVariant.INVALID_DESIRED_STATE]
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
                self.board.applied_state_revision = self._desired_revision or revision  # a rolling swap stops on it
                self._refuse_state(err)
                self._first_application_ended = True
                return
            self._clear_refusal()
            log.info("applying desired state model=%s version=%s", state.model.describe(), self._desired_version)
            await self.engine.apply_desired_state(state)
            # The status now tells how this revision went (a newer version of the same
            # state adopted meanwhile: its revision).
            self.board.applied_state_revision = self._desired_revision or revision
            self._first_application_ended = True
            self.status_changed()

        self._apply_task = asyncio.create_task(apply(), name="apply-desired-state")

    def _refuse_state(self, err: ModelSourceError) -> None:
        """A model source this agent's limits refuse: keep serving what it serves and say why."""
        log.warning("desired state refused issue=%s message=%s", err.variant, err.message)
        board = self.board
        board.issues = [i for i in board.issues if i.variant != AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED] + [
            err.to_issue()
        ]
        board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        self.status_changed()

    def _clear_refusal(self) -> None:
        if any(i.variant == AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED for i in self.board.issues):
            self.board.issues = [
                i for i in self.board.issues if i.variant != AgentIssueVariant.MODEL_SOURCE_NOT_ALLOWED
            ]
            self.status_changed()

    async def _cancel_apply(self) -> None:
        if self._apply_task is not None:
            self._apply_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._apply_task

    def _next_status(self) -> AgentStatus:
        """A snapshot of the board for one link; ``version`` is one counter for all links."""
        self._status_version += 1
        status = self.board.snapshot(self._status_version)
        # Engines count their busy slots; the runtime counts what it accepted (a request
        # waiting for a slot inside the engine still holds one): report the larger.
        status.slots_processing = min(MAX_AGENT_SLOTS, max(status.slots_processing, len(self._active)))
        status.desired_state_revision = self._desired_revision
        status.desired_state_version = self._desired_version
        if self._stopping:
            status.slots_total = 0
        return status


async def run_agent(settings: AgentSettings, stop: asyncio.Event) -> None:
    runtime = AgentRuntime(settings)
    log.info(
        "agent starting agent_id=%s engine=%s slots=%d model_group=%s balancers=%s",
        runtime.agent_id,
        settings.engine,
        settings.slots,
        settings.model_group,
        ",".join(settings.management_addrs),
    )
    health = HealthConfig(runtime, stall_timeout=settings.decode_stall_timeout)
    async with serve_health(settings.health_addr, health):
        await runtime.run(stop)
