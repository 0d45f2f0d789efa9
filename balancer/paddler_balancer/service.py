"""The balancer's state and the one path every inference request takes.

``Balancer.generation(...)`` is an async context manager: it leases a slot (maybe
after buffering), sends the request to the agent and yields a
:class:`Generation` to read payloads from. Leaving the block, for any reason,
tells the agent to stop (if the request had not finished) and releases the slot.

An agent may refuse a request before running it (``refused``: another balancer
replica took its last slot). The refusal arrives before any payload, so
:meth:`Generation.next_batch` places the request again (another agent, or the buffer
with its first deadline) and the client, which has received nothing yet, never sees
it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paddler_balancer.agents import AgentController, AgentPool, totals
from paddler_balancer.dispatcher import Dispatcher, Lease
from paddler_balancer.metrics import AgentGauges, GroupGauges, Metrics
from paddler_balancer.rollout import Rollout, Rollouts
from paddler_balancer.routing import RouteRequest, RoutingConfig
from paddler_balancer.settings import BalancerSettings
from paddler_balancer.state_store import StateStore
from paddler_balancer.streams import InferenceFailure, ResponseStream, StreamFailure
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, SamplingOverrides, next_state_version
from paddler_core.protocol import (
    MAX_MESSAGE_BYTES,
    QueryMessage,
    RefusalReason,
    StopMessage,
    embed_message,
    encode_message,
    generate_message,
    utf8_size,
)

log = logging.getLogger(__name__)

QUERY_TIMEOUT_S = 10.0
UNRESPONSIVE_MAX_S = 300.0
"""Longest cool-down of an agent that answers nothing (seconds)."""


class Readiness(StrEnum):
    """Whether this replica takes new requests (``GET /ready``)."""

    STARTING = "Starting"
    SERVING = "Serving"
    DRAINING = "Draining"
    """Stopping: readiness off, in-flight and buffered requests finishing."""


@dataclass(frozen=True)
class Placement:
    """What placing a request on an agent needs, again after a refusal."""

    request_id: str
    encoded: str
    """The ``generate``/``embed`` message, encoded once."""
    route: RouteRequest
    deadline: float
    """End of its wait in the buffer (``time.monotonic()``): arrival + buffer timeout."""


@dataclass(eq=False)
class Generation:
    """One request in flight on one agent (another one if the first refused it)."""

    placement: Placement
    lease: Lease
    stream: ResponseStream
    item_timeout: float
    started_at: float
    model_group: str
    reroute: Callable[[Generation], Awaitable[None]]
    """Places the request again after a refusal (``Balancer._reroute``)."""
    tokens: int = 0
    first_token_at: float | None = None
    outcome: int = 200
    delivered: bool = False
    """A batch has gone to the client: a refusal now can no longer be hidden."""

    @property
    def request_id(self) -> str:
        return self.placement.request_id

    @property
    def agent_id(self) -> str:
        return self.lease.agent.id

    async def next_batch(self) -> list[tuple[Any, bool]]:
        try:
            batch = await self._receive()
        except InferenceFailure as failure:
            self.outcome = failure.status
            raise
        self.delivered = True
        for payload, _final in batch:
            if isinstance(payload, dict) and "GeneratedToken" in payload:
                gen = payload["GeneratedToken"]
                if "Done" not in gen:
                    self.tokens += 1
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
        return batch

    async def _receive(self) -> list[tuple[Any, bool]]:
        """The next batch, from whichever agent runs the request: a refusal before the
        first batch places it again (raises 503/504 when no slot frees in time)."""
        while True:
            try:
                return await self.stream.next_batch(self.item_timeout)
            except InferenceFailure:
                if self.stream.failure is not StreamFailure.REFUSED or self.delivered:
                    raise
            await self.reroute(self)


@dataclass
class Balancer:
    settings: BalancerSettings
    pool: AgentPool = field(default_factory=AgentPool)
    store: StateStore = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    metrics: Metrics = field(init=False)
    rollouts: Rollouts = field(init=False)
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16], init=False)
    """Random per process: tells replicas apart (and a replica itself among its peers)."""
    readiness: Readiness = field(default=Readiness.STARTING, init=False)
    active_requests: int = field(default=0, init=False)
    """Inference requests in :meth:`_in_flight`: buffered, streaming, or routed again."""
    _queries: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    _adoptions: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _adoption_tried: dict[str, int] = field(default_factory=dict)
    """Per group: the highest agent-reported version already queried (no retry storm)."""

    def __post_init__(self) -> None:
        self.store = StateStore(self.settings.state_database)
        self.dispatcher = Dispatcher(
            self.pool,
            max_buffered=self.settings.max_buffered_requests,
            buffer_timeout=self.settings.buffered_request_timeout,
            candidate_limit=self.settings.routing_candidates,
            routing_config=RoutingConfig(
                policy=self.settings.routing,
                load_cap=self.settings.prefix_affinity_load_cap,
                load_factor=self.settings.prefix_load_factor,
            ),
        )
        self.metrics = Metrics(self.gauges, self.agent_gauges)
        self.rollouts = Rollouts(self.pool, MaxUnavailable.parse(self.settings.max_unavailable))

    # ---- state -------------------------------------------------------------------------

    def gauges(self) -> list[GroupGauges]:
        groups = set(self.store.names()) | {a.model_group for a in self.pool.agents.values()}
        buffered = self.dispatcher.buffered_by_group()
        rows = []
        for group in sorted(groups):
            agents = self.pool.in_group(group)
            slots_total, in_flight = totals(agents)
            rows.append(
                GroupGauges(
                    group,
                    len(agents),
                    slots_total,
                    in_flight,
                    buffered[group],
                    prompt_tokens_reused=sum(a.status.prompt_tokens_reused for a in agents),
                    prompt_tokens_evaluated=sum(a.status.prompt_tokens_evaluated for a in agents),
                )
            )
        return rows

    def agent_gauges(self) -> list[AgentGauges]:
        return [
            AgentGauges(
                model_group=agent.model_group,
                agent_id=agent.id,
                agent_name=agent.name or "",
                kv_cache_tokens_used=agent.status.kv_cache_tokens_used,
                kv_cache_tokens_total=agent.status.kv_cache_tokens_total,
            )
            for agent in sorted(self.pool.agents.values(), key=lambda a: a.order)
        ]

    def set_desired_state(
        self,
        group: str,
        state: BalancerDesiredState,
        owner: str | None = None,
        max_unavailable: MaxUnavailable | None = None,
    ) -> Rollout:
        """Store the group's state and roll it over its agents (see :mod:`.rollout`). The
        same content keeps its version (the operator PUTs it again every reconcile); a
        new one gets a newer version than the stored one."""
        before = self.store.entry(group)
        version = before.version if state == before.state else next_state_version(before.version, _now_ms())
        self.store.put(group, state, owner, version)
        log.info(
            "desired state set group=%s model=%s owner=%s version=%d", group, state.model.describe(), owner, version
        )
        rollout = self.rollouts.start(group, self.store.entry(group), before, max_unavailable)
        self.pool.changed()
        return rollout

    def delete_desired_state(self, group: str) -> bool:
        if not self.store.delete(group):
            return False
        self.rollouts.forget(group)
        self.pool.changed()
        return True

    def send_initial_state(self, agent: AgentController) -> None:
        """A newly registered agent gets its group's state (the old one after a failed
        rollout); not when it already holds a newer version (this replica adopts that)."""
        target = self.rollouts.state_for_new_agent(agent.model_group, self.store.entry(agent.model_group))
        held = agent.status.desired_state_version
        if held is not None and held > target.version:
            return
        self.rollouts.send_state(agent, target.state, target.version)

    def status_received(self, agent: AgentController) -> None:
        """An agent registered or pushed its status. If it holds a newer version of its
        group's state than this replica stores (another replica set it while this one
        was away, or this one restarted with an older or empty state), ask it for that
        state and adopt it, so every replica shows and rolls the pool's truth."""
        reported = agent.status.desired_state_version
        group = agent.model_group
        if reported is None or reported <= self.store.version(group):
            return
        if group in self._adoptions or reported <= self._adoption_tried.get(group, -1):
            return
        self._adoption_tried[group] = reported
        task = asyncio.create_task(self._adopt(group, agent.id), name=f"adopt-state-{group}")
        self._adoptions[group] = task
        task.add_done_callback(lambda _t: self._adoptions.pop(group, None))

    async def _adopt(self, group: str, agent_id: str) -> None:
        try:
            body = await self.query_agent(agent_id, "desired_state")
            state = BalancerDesiredState.model_validate(body["state"])
            version = int(body["version"])
        except (KeyError, TimeoutError, TypeError, ValueError) as err:  # ValidationError is a ValueError
            log.warning("desired state not adopted group=%s agent_id=%s error=%s", group, agent_id, str(err)[:200])
            return
        before = self.store.entry(group)
        if version <= before.version:
            return
        self.store.put(group, state, before.owner, version)
        log.info(
            "desired state adopted group=%s model=%s version=%d from_agent=%s",
            group, state.model.describe(), version, agent_id,
        )  # fmt: skip
        self.rollouts.start(group, self.store.entry(group), before)
        self.pool.changed()

    async def close(self) -> None:
        """Cancel background work (state adoptions in flight)."""
        tasks = list(self._adoptions.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- agents --------------------------------------------------------------------------

    def agent_lost(self, agent: AgentController) -> None:
        """The agent's socket closed: forget it and fail its requests at once."""
        self.pool.remove(agent)
        for stream in list(agent.streams.values()):
            stream.fail(StreamFailure.AGENT_LOST)
        log.info("agent removed agent_id=%s in_flight=%d", agent.id, len(agent.streams))

    async def query_agent(self, agent_id: str, what: str) -> Any:
        agent = self.pool.agents.get(agent_id)
        if agent is None:
            raise KeyError(agent_id)
        query_id = uuid.uuid4().hex
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queries[query_id] = future
        try:
            agent.send(QueryMessage(request_id=query_id, what=what).model_dump())
            async with asyncio.timeout(QUERY_TIMEOUT_S):
                return await future
        finally:
            self._queries.pop(query_id, None)

    def request_refused(self, agent: AgentController, request_id: str, reason: RefusalReason) -> None:
        """The agent will not run ``request_id``: count it full until its next status,
        and fail the stream with REFUSED (its reader places the request again)."""
        self.pool.refused(agent)
        self.metrics.refusals.labels(agent.model_group, reason.value).inc()
        stream = agent.streams.get(request_id)
        log.info("request refused agent_id=%s request_id=%s reason=%s", agent.id, request_id, reason.value)
        if stream is not None:
            stream.fail(StreamFailure.REFUSED)
        self.pool.changed()

    def reply_received(self, request_id: str, body: Any) -> None:
        future = self._queries.get(request_id)
        if future is not None and not future.done():
            future.set_result(body)

    # ---- inference -----------------------------------------------------------------------

    @asynccontextmanager
    async def generation(
        self,
        *,
        model_group: str,
        variant: str,
        params: dict[str, Any],
        overrides: SamplingOverrides | None = None,
        prefix_hashes: tuple[str, ...] = (),
        request_id: str | None = None,
    ) -> AsyncIterator[Generation]:
        message = generate_message(request_id or uuid.uuid4().hex, variant, params, overrides)
        async with self._in_flight(model_group, message, prefix_hashes) as generation:
            yield generation

    @asynccontextmanager
    async def embedding(
        self, *, model_group: str, params: dict[str, Any], request_id: str
    ) -> AsyncIterator[Generation]:
        message = embed_message(request_id, params)
        async with self._in_flight(model_group, message, ()) as generation:
            yield generation

    @asynccontextmanager
    async def _in_flight(
        self, model_group: str, message: dict[str, Any], prefix_hashes: tuple[str, ...]
    ) -> AsyncIterator[Generation]:
        self.active_requests += 1
        try:
            async with self._placed(model_group, message, prefix_hashes) as generation:
                yield generation
        finally:
            self.active_requests -= 1

    @asynccontextmanager
    async def _placed(
        self, model_group: str, message: dict[str, Any], prefix_hashes: tuple[str, ...]
    ) -> AsyncIterator[Generation]:
        started = time.monotonic()
        encoded = encode_message(message)
        placement = Placement(
            message["request_id"], encoded, RouteRequest(model_group, prefix_hashes), self.dispatcher.deadline()
        )
        try:
            size = utf8_size(encoded)
            if size > MAX_MESSAGE_BYTES:
                raise InferenceFailure(
                    413,
                    f"the request is too large to forward to an agent ({size} bytes; at most {MAX_MESSAGE_BYTES})",
                    "request_too_large",
                )
            lease, stream = await self._place(placement)
        except InferenceFailure as failure:
            self.metrics.requests.labels(model_group, str(failure.status)).inc()
            raise
        generation = Generation(
            placement, lease, stream, self.settings.inference_item_timeout, started, model_group, self._reroute
        )
        try:
            yield generation
        except BaseException:
            if generation.outcome == 200:
                generation.outcome = 499  # client went away or the handler failed
            raise
        finally:
            self._leave(generation)
            self._record(generation)

    async def _place(self, placement: Placement) -> tuple[Lease, ResponseStream]:
        """Lease a slot (maybe after buffering until the placement's deadline) and send
        the request to its agent."""
        lease = await self.dispatcher.acquire(placement.route, placement.deadline)
        stream = ResponseStream(placement.request_id)
        lease.agent.streams[placement.request_id] = stream
        lease.agent.send(placement.encoded)
        return lease, stream

    def _leave(self, generation: Generation) -> None:
        """The request is done with its agent: stop it there if it had not finished (a
        refused one never ran), forget its stream and release the slot. Idempotent."""
        agent, stream = generation.lease.agent, generation.stream
        ran = stream.failure is not StreamFailure.REFUSED
        if ran and not stream.finished and agent.connected and agent.streams.get(stream.request_id) is stream:
            agent.send(StopMessage(request_id=stream.request_id).model_dump())
        if agent.streams.get(stream.request_id) is stream:
            del agent.streams[stream.request_id]
        if stream.failure is StreamFailure.ITEM_TIMEOUT:
            self.agent_silent(agent)
        generation.lease.release()

    async def _reroute(self, generation: Generation) -> None:
        """The agent refused the request before any payload: release it there and place
        the request again, within its first buffer deadline."""
        refused_by = generation.agent_id
        self._leave(generation)
        generation.lease, generation.stream = await self._place(generation.placement)
        log.info(
            "request routed again request_id=%s refused_by=%s agent_id=%s",
            generation.request_id, refused_by, generation.agent_id,
        )  # fmt: skip

    # ---- unresponsive agents ---------------------------------------------------------------

    def agent_silent(self, agent: AgentController) -> None:
        """A request on ``agent`` hit the item timeout. If the agent sent nothing at all
        for that long (for any request), it takes no new requests for a cool-down
        (item timeout x 2^(strikes-1), at most UNRESPONSIVE_MAX_S), then one request at
        a time until it answers: an agent that claims slots and answers nothing cannot
        keep drawing the traffic of honest agents."""
        now = time.monotonic()
        timeout = self.settings.inference_item_timeout
        if not agent.connected or agent.unresponsive or now - agent.last_response_at < timeout:
            return
        agent.strikes += 1
        cooldown = min(UNRESPONSIVE_MAX_S, timeout * 2 ** min(agent.strikes - 1, 16))
        agent.unresponsive = True
        agent.probation = True
        self.pool.refresh(agent)
        self.pool.changed()
        log.warning(
            "agent unresponsive agent_id=%s silent_s=%.1f strikes=%d cooldown_s=%.1f",
            agent.id,
            now - agent.last_response_at,
            agent.strikes,
            cooldown,
        )
        asyncio.get_running_loop().call_later(cooldown, self._cooldown_over, agent)

    def _cooldown_over(self, agent: AgentController) -> None:
        agent.unresponsive = False
        if agent.connected:
            self.pool.refresh(agent)
            self.pool.changed()

    def agent_answered(self, agent: AgentController) -> None:
        """The agent sent a response payload: it is responsive (again)."""
        agent.last_response_at = time.monotonic()
        if agent.probation and not agent.unresponsive:
            agent.probation = False
            agent.strikes = 0
            log.info("agent responsive again agent_id=%s", agent.id)
            self.pool.refresh(agent)
            self.pool.changed()

    def _record(self, generation: Generation) -> None:
        group = generation.model_group
        m = self.metrics
        m.requests.labels(group, str(generation.outcome)).inc()
        m.request_duration.labels(group).observe(time.monotonic() - generation.started_at)
        if generation.first_token_at is not None:
            m.time_to_first_token.labels(group).observe(generation.first_token_at - generation.started_at)
        if generation.tokens:
            m.generated_tokens.labels(group).inc(generation.tokens)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
