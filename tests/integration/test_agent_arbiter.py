"""One agent (the real runtime, simulated engine) linked to two fake balancer replicas
over real WebSockets: the agent is the arbiter of its slots, answers each replica on
its own link, and applies only a desired state newer than the one it holds.

The replicas are fakes so the tests can speak the parts of the wire the balancer does
not send yet (``version``) and read what the agent sends (``refused``)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from paddler_agent.runtime import AgentRuntime, AgentSettings
from paddler_core.desired_state import BalancerDesiredState, ModelSource
from tests.harness import wait_until

MODEL = "/models/one.gguf"


@dataclass(eq=False)
class FakeReplica:
    """A balancer replica that accepts one agent and records everything it sends."""

    host: str = "127.0.0.1"
    port: int = 0
    runner: web.AppRunner | None = None
    address: str = ""
    host_headers: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when an agent's socket closes."""
    received: list[dict[str, Any]] = field(default_factory=list)
    socket: web.WebSocketResponse | None = None
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/agent_socket/{agent_id}", self._agent_socket)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.address = f"{self.host}:{self.port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _agent_socket(self, request: web.Request) -> web.WebSocketResponse:
        self.host_headers.append(request.host)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        register = await ws.receive_json(timeout=5)
        await self._record(register)
        await ws.send_str(json.dumps({"type": "registered", "agent_id": request.match_info["agent_id"]}))
        self.socket = ws
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                decoded = json.loads(msg.data)
                for message in decoded if isinstance(decoded, list) else [decoded]:
                    await self._record(message)
        self.closed.set()
        return ws

    async def _record(self, message: dict[str, Any]) -> None:
        async with self.arrived:
            self.received.append(message)
            self.arrived.notify_all()

    async def send(self, message: dict[str, Any]) -> None:
        assert self.socket is not None
        await self.socket.send_str(json.dumps(message))

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10.0, since: int = 0
    ) -> dict[str, Any]:
        """The first message from the ``since``-th received on (or to come) that ``predicate`` accepts."""
        async with asyncio.timeout(timeout), self.arrived:
            while True:
                for message in self.received[since:]:
                    if predicate(message):
                        return message
                await self.arrived.wait()
        raise AssertionError(what)  # unreachable: the timeout raises

    async def latest_status(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, since: int = 0
    ) -> dict[str, Any]:
        """Wait for a status snapshot (the ``since``-th message on) that ``predicate`` accepts."""
        message = await self.wait_for(lambda m: m.get("type") == "status" and predicate(m["status"]), what, since=since)
        status: dict[str, Any] = message["status"]
        return status

    async def query(self, request_id: str, what: str) -> Any:
        await self.send({"type": "query", "request_id": request_id, "what": what})
        reply = await self.wait_for(lambda m: m.get("type") == "reply" and m.get("request_id") == request_id, what)
        return reply["body"]

    def about(self, request_id: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m.get("request_id") == request_id]


@dataclass
class LinkedAgent:
    runtime: AgentRuntime
    stop: asyncio.Event
    task: asyncio.Task[None]


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[FakeReplica, FakeReplica]]:
    a, b = FakeReplica(), FakeReplica()
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.fixture
async def start_agent(
    replicas: tuple[FakeReplica, FakeReplica],
) -> AsyncIterator[Callable[..., LinkedAgent]]:
    started: list[LinkedAgent] = []

    def start(slots: int = 1, tokens_per_second: float = 20.0, max_tokens: int = 100) -> LinkedAgent:
        settings = AgentSettings(
            management_addrs=tuple(r.address for r in replicas),
            slots=slots,
            name="arbiter",
            engine="simulated",
            simulated_tokens_per_second=tokens_per_second,
            simulated_max_tokens=max_tokens,
        )
        runtime = AgentRuntime(settings)
        stop = asyncio.Event()
        agent = LinkedAgent(runtime, stop, asyncio.create_task(runtime.run(stop), name="agent-under-test"))
        started.append(agent)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.stop.set()
        for agent in started:
            async with asyncio.timeout(20):
                await agent.task


def generate(request_id: str, max_tokens: int = 50) -> dict[str, Any]:
    return {
        "type": "generate",
        "request_id": request_id,
        "variant": "ContinueFromRawPrompt",
        "params": {"raw_prompt": f"prompt {request_id}", "max_tokens": max_tokens},
    }


def desired(model: str | None, version: int | None) -> dict[str, Any]:
    source = ModelSource.none() if model is None else ModelSource.local(model)
    state = BalancerDesiredState(model=source)
    return {"type": "set_desired_state", "state": state.to_json_dict(), "version": version}


async def registered_on_both(replicas: tuple[FakeReplica, FakeReplica]) -> None:
    for replica in replicas:
        await replica.wait_for(lambda m: m.get("type") == "register", "agent registered")
        await replica.latest_status(lambda s: s["slots_total"] > 0, "agent serves slots")


def is_final(request_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("type") == "response" and m.get("request_id") == request_id and m.get("final") is True


async def test_registers_on_every_replica_with_one_agent_id(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    agent = start_agent()

    await registered_on_both(replicas)

    assert agent.runtime.agent_id != ""
    assert [r.received[0]["status"]["slots_total"] for r in replicas] == [1, 1]


async def test_refuses_a_request_beyond_its_slots_on_the_replica_that_sent_it(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent(slots=1)
    await registered_on_both(replicas)

    await a.send(generate("first"))
    await a.wait_for(lambda m: m.get("request_id") == "first", "first request runs")
    await b.send(generate("second"))
    refused = await b.wait_for(lambda m: m.get("type") == "refused", "second request refused")

    assert refused == {"type": "refused", "request_id": "second", "reason": "NoFreeSlot"}
    metadata = (await b.query("q1", "model_metadata"))["metadata"]
    assert metadata["simulated.requests_beyond_slots"] == "0"
    assert a.about("second") == []


async def test_every_replica_sees_the_requests_of_the_others_in_slots_processing(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent(slots=2, tokens_per_second=20.0)
    await registered_on_both(replicas)

    await a.send(generate("busy", max_tokens=20))

    status = await b.latest_status(lambda s: s["slots_processing"] == 1, "replica B sees the request of A")
    assert status["slots_total"] == 2


async def test_a_lost_replica_stops_only_its_own_requests(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent(slots=2, tokens_per_second=50.0, max_tokens=1000)  # A's request runs 20 s unless stopped
    await registered_on_both(replicas)
    await a.send(generate("on-a", max_tokens=1000))
    await b.send(generate("on-b", max_tokens=20))
    await a.wait_for(lambda m: m.get("request_id") == "on-a", "request on A runs")

    await b.latest_status(lambda s: s["slots_processing"] == 2, "both requests run")
    assert a.socket is not None
    await a.socket.close()

    final = await b.wait_for(is_final("on-b"), "request on B finishes")
    assert "Done" in json.dumps(final["response"])
    await b.latest_status(
        lambda s: s["slots_processing"] == 0, "the request of A was stopped", since=b.received.index(final)
    )


async def test_ignores_an_older_desired_state_from_a_replica_restarted_empty(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent()
    await registered_on_both(replicas)
    await a.send(desired(MODEL, 1_700_000_000_000))
    await a.latest_status(lambda s: s["model_path"] == MODEL, "model applied")

    await b.send(desired(None, 0))
    body = await b.query("after-empty", "desired_state")
    handled = len(b.received)

    assert body["version"] == 1_700_000_000_000
    status = await b.latest_status(lambda s: True, "a status after the offer", since=handled)
    assert status["model_path"] == MODEL


async def test_adopts_a_newer_version_of_the_same_state_without_applying_it_again(
    replicas: tuple[FakeReplica, FakeReplica],
    start_agent: Callable[..., LinkedAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = replicas
    caplog.set_level(logging.INFO, logger="paddler_agent.runtime")
    start_agent()
    await registered_on_both(replicas)
    await a.send(desired(MODEL, 10))
    await a.latest_status(lambda s: s["model_path"] == MODEL, "model applied")

    await b.send(desired(MODEL, 20))

    status = await a.latest_status(lambda s: s["desired_state_version"] == 20, "version 20 adopted")
    assert status["model_path"] == MODEL
    applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("applying desired state")]
    assert applied == [f"applying desired state model={MODEL} version=10"]


async def test_applies_a_newer_state_from_any_replica(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent()
    await registered_on_both(replicas)
    await a.send(desired(MODEL, 10))
    await a.latest_status(lambda s: s["model_path"] == MODEL, "first model applied")

    await b.send(desired("/models/two.gguf", 11))

    status = await a.latest_status(lambda s: s["model_path"] == "/models/two.gguf", "newer model applied")
    assert status["desired_state_version"] == 11


async def test_answers_the_desired_state_query_with_the_state_and_version_it_holds(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    start_agent()
    await registered_on_both(replicas)
    assert await b.query("before", "desired_state") is None

    await a.send(desired(MODEL, 42))
    await a.latest_status(lambda s: s["model_path"] == MODEL, "model applied")
    body = await b.query("after", "desired_state")

    assert body == {"state": BalancerDesiredState(model=ModelSource.local(MODEL)).to_json_dict(), "version": 42}


async def test_stopping_reports_no_slots_to_every_replica_refuses_new_requests_and_finishes_the_running_one(
    replicas: tuple[FakeReplica, FakeReplica], start_agent: Callable[..., LinkedAgent]
) -> None:
    a, b = replicas
    agent = start_agent(slots=2, tokens_per_second=20.0)
    await registered_on_both(replicas)
    await a.send(generate("running", max_tokens=15))
    await a.wait_for(lambda m: m.get("request_id") == "running", "request runs")

    agent.stop.set()
    for replica in replicas:
        await replica.latest_status(lambda s: s["slots_total"] == 0, "no slots reported while stopping")
    await b.send(generate("late"))

    refused = await b.wait_for(lambda m: m.get("type") == "refused", "late request refused")
    assert refused["reason"] == "Stopping"
    await a.wait_for(is_final("running"), "running request finished")
    async with asyncio.timeout(10):
        await agent.task


async def test_a_name_gets_a_link_per_address_and_an_address_gone_from_dns_loses_its_link(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = FakeReplica()
    await first.start()
    second = FakeReplica(host="127.0.0.2", port=first.port)  # a headless Service: one port, one address per pod
    await second.start()
    dns: dict[str, list[str]] = {"pool": ["127.0.0.1"]}

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        if host not in dns:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in dns[host]]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    caplog.set_level(logging.WARNING, logger="paddler_agent.links")
    settings = AgentSettings(
        management_addrs=(f"pool:{first.port}",),
        slots=2,
        engine="simulated",
        resolve_interval=0.05,
        simulated_tokens_per_second=20.0,
    )
    stop = asyncio.Event()
    agent = asyncio.create_task(AgentRuntime(settings).run(stop), name="agent-under-test")
    try:
        await first.latest_status(lambda s: s["slots_total"] == 2, "linked to the first address")
        dns["pool"] = ["127.0.0.1", "127.0.0.2"]
        await second.latest_status(lambda s: s["slots_total"] == 2, "linked to the second address")
        await first.send(generate("on-first", max_tokens=100))
        await second.latest_status(lambda s: s["slots_processing"] == 1, "the request on the first runs")

        dns["pool"] = ["127.0.0.2"]
        async with asyncio.timeout(10):
            await first.closed.wait()
        mark = len(second.received)
        await second.latest_status(lambda s: s["slots_processing"] == 0, "the first's request stopped", since=mark)
        del dns["pool"]

        async def warned() -> bool:
            return any("does not resolve" in r.getMessage() for r in caplog.records)

        await wait_until(warned, what="a warning about the name")
        assert first.host_headers == [f"pool:{first.port}"]
        assert not second.closed.is_set()
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await agent
        await first.close()
        await second.close()
