"""The balancer's state and the one path every inference request takes.

``Balancer.generation(...)`` is an async context manager: it leases a slot (maybe
after buffering), sends the request to the agent and yields a
:class:`Generation` to read payloads from. Leaving the block, for any reason,
tells the agent to stop (if the request had not finished) and releases the slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from paddler_balancer.agents import AgentController, AgentPool, totals
from paddler_balancer.dispatcher import Dispatcher, Lease
from paddler_balancer.metrics import AgentGauges, GroupGauges, Metrics
from paddler_balancer.rollout import Rollout, Rollouts
from paddler_balancer.routing import RouteRequest
from paddler_balancer.settings import BalancerSettings
from paddler_balancer.state_store import StateStore
from paddler_balancer.streams import InferenceFailure, ResponseStream, StreamFailure
from paddler_core.desired_state import BalancerDesiredState, MaxUnavailable, SamplingOverrides
from paddler_core.protocol import (
    MAX_MESSAGE_BYTES,
    QueryMessage,
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


@dataclass(eq=False)
class Generation:
    """One request in flight on one agent."""

    request_id: str
    lease: Lease
    stream: ResponseStream
    item_timeout: float
    started_at: float
    model_group: str
    tokens: int = 0
    first_token_at: float | None = None
    outcome: int = 200

    @property
    def agent_id(self) -> str:
        return self.lease.agent.id

    async def next_batch(self) -> list[tuple[Any, bool]]:
        try:
            batch = await self.stream.next_batch(self.item_timeout)
        except InferenceFailure as failure:
            self.outcome = failure.status
            raise
        for payload, _final in batch:
            if isinstance(payload, dict) and "GeneratedToken" in payload:
                gen = payload["GeneratedToken"]
                if "Done" not in gen:
                    self.tokens += 1
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
        return batch


@dataclass
class Balancer:
    settings: BalancerSettings
    pool: AgentPool = field(default_factory=AgentPool)
    store: StateStore = field(init=False)
    dispatcher: Dispatcher = field(init=False)
    metrics: Metrics = field(init=False)
    rollouts: Rollouts = field(init=False)
    _queries: dict[str, asyncio.Future[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = StateStore(self.settings.state_database)
        self.dispatcher = Dispatcher(
            self.pool,
            max_buffered=self.settings.max_buffered_requests,
            buffer_timeout=self.settings.buffered_request_timeout,
            candidate_limit=self.settings.routing_candidates,
            load_cap=self.settings.prefix_affinity_load_cap,
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
            rows.append(GroupGauges(group, len(agents), slots_total, in_flight, buffered[group]))
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
        """Store the group's state and roll it over its agents (see :mod:`.rollout`)."""
        before = self.store.get(group)
        self.store.put(group, state, owner)
        log.info("desired state set group=%s model=%s owner=%s", group, state.model.describe(), owner)
        rollout = self.rollouts.start(group, state, before, max_unavailable)
        self.pool.changed()
        return rollout

    def delete_desired_state(self, group: str) -> bool:
        if not self.store.delete(group):
            return False
        self.rollouts.forget(group)
        self.pool.changed()
        return True

    def send_initial_state(self, agent: AgentController) -> None:
        """A newly registered agent gets its group's state (the old one after a failed rollout)."""
        state = self.rollouts.state_for_new_agent(agent.model_group, self.store.get(agent.model_group))
        self.rollouts.send_state(agent, state)

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
        started = time.monotonic()
        request_id: str = message["request_id"]
        encoded = encode_message(message)
        try:
            size = utf8_size(encoded)
            if size > MAX_MESSAGE_BYTES:
                raise InferenceFailure(
                    413,
                    f"the request is too large to forward to an agent ({size} bytes; at most {MAX_MESSAGE_BYTES})",
                    "request_too_large",
                )
            lease = await self.dispatcher.acquire(RouteRequest(model_group, prefix_hashes))
        except InferenceFailure as failure:
            self.metrics.requests.labels(model_group, str(failure.status)).inc()
            raise
        stream = ResponseStream(request_id)
        agent = lease.agent
        agent.streams[request_id] = stream
        generation = Generation(request_id, lease, stream, self.settings.inference_item_timeout, started, model_group)
        try:
            agent.send(encoded)
            yield generation
        except BaseException:
            if generation.outcome == 200:
                generation.outcome = 499  # client went away or the handler failed
            raise
        finally:
            if not stream.finished and agent.connected:
                agent.send(StopMessage(request_id=request_id).model_dump())
            agent.streams.pop(request_id, None)
            if stream.failure is StreamFailure.ITEM_TIMEOUT:
                self.agent_silent(agent)
            lease.release()
            self._record(generation)

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
