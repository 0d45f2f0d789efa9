"""LlamaServerEngine alone against a small stand-in HTTP server that answers like
llama-server (``/health``, ``/props``, ``/slots``, a streamed ``/completion``), so the
engine's state machine can be driven through states the real server reaches only
slowly or by chance. The real server is in tests/llama_server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from paddler_agent.engine import StatusBoard
from paddler_agent.llama_server import LlamaServerEngine
from paddler_core.inference import ErrorKind, ResponsePayload
from paddler_core.protocol import GenerateMessage, parse_generate_message


@dataclass
class StandIn:
    healthy: bool = True
    slots_endpoint: bool = True
    tokens: int = 3
    token_delay: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/props", self.props)
        app.router.add_get("/slots", self.slots)
        app.router.add_post("/completion", self.completion)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        if self.healthy:
            return web.json_response({"status": "ok"})
        return web.json_response(
            {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, status=503
        )

    async def props(self, _request: web.Request) -> web.Response:
        return web.json_response({"total_slots": 3, "model_path": "/m/model.gguf", "chat_template": ""})

    async def slots(self, _request: web.Request) -> web.Response:
        if not self.slots_endpoint:
            return web.json_response({"error": {"code": 501, "message": "no slots"}}, status=501)
        return web.json_response([{"id": i, "is_processing": False} for i in range(3)])

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.streaming.set()
        try:
            for n in range(1, self.tokens + 1):
                chunk = {"content": f"t{n}", "stop": False, "tokens_predicted": n}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(self.token_delay)
            final = {
                "content": "",
                "stop": True,
                "tokens_predicted": self.tokens,
                "tokens_evaluated": 5,
                "stop_type": "limit",
            }
            await response.write(f"data: {json.dumps(final)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return response


class Host:
    def __init__(self) -> None:
        self.payloads: dict[str, list[Any]] = {}
        self.done: dict[str, asyncio.Event] = {}
        self.error_kinds: dict[str, ErrorKind | None] = {}

    def emit(self, request_id: str, payload: ResponsePayload, final: bool, error_kind: ErrorKind | None = None) -> None:
        self.payloads.setdefault(request_id, []).append(payload)
        self.error_kinds[request_id] = error_kind
        if final:
            self.done.setdefault(request_id, asyncio.Event()).set()

    def status_changed(self) -> None:
        pass

    async def wait(self, request_id: str) -> list[Any]:
        async with asyncio.timeout(10):
            await self.done.setdefault(request_id, asyncio.Event()).wait()
        return self.payloads[request_id]


@dataclass
class Rig:
    stand_in: StandIn
    engine: LlamaServerEngine
    host: Host
    board: StatusBoard
    runner: web.AppRunner
    url: str


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    stand_in = StandIn()
    runner = web.AppRunner(stand_in.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    host, board = Host(), StatusBoard()
    engine = LlamaServerEngine(host, board, None, url=url, poll_interval_s=0.02)
    try:
        yield Rig(stand_in, engine, host, board, runner, url)
    finally:
        await engine.close()
        await runner.cleanup()


async def until(condition: Any, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.01)


def raw(request_id: str, max_tokens: int = 3) -> GenerateMessage:
    return parse_generate_message(
        dict(
            request_id=request_id,
            variant="ContinueFromRawPrompt",
            params={"raw_prompt": "hi", "max_tokens": max_tokens},
        )
    )


async def test_slots_come_from_props_and_leave_while_the_server_is_not_ready(rig: Rig) -> None:
    await until(lambda: rig.board.slots_total == 3, "slots from /props")
    assert rig.board.model_path == "/m/model.gguf"
    assert rig.board.issues == []
    rig.stand_in.healthy = False
    await until(lambda: rig.board.slots_total == 0, "slots gone")
    assert [i.variant for i in rig.board.issues] == ["LlamaServerNotReady"]
    assert "Loading model" in rig.board.issues[0].message
    rig.stand_in.healthy = True
    await until(lambda: rig.board.slots_total == 3, "slots back")
    assert rig.board.issues == []


async def test_a_server_that_goes_away_is_unreachable(rig: Rig) -> None:
    await until(lambda: rig.board.slots_total == 3, "slots from /props")
    await rig.runner.cleanup()
    await until(lambda: rig.board.slots_total == 0, "slots gone")
    assert [i.variant for i in rig.board.issues] == ["LlamaServerUnreachable"]


async def test_stream_becomes_tokens_and_done_and_a_context_stop_becomes_an_error(rig: Rig) -> None:
    await until(lambda: rig.board.slots_total == 3, "slots from /props")
    rig.engine.generate(raw("r1", max_tokens=3))
    payloads = await rig.host.wait("r1")
    assert payloads[:3] == [{"GeneratedToken": {"ContentToken": f"t{n}"}} for n in (1, 2, 3)]
    assert payloads[3]["GeneratedToken"]["Done"]["usage"]["content_tokens"] == 3
    assert rig.stand_in.bodies[0]["n_predict"] == 3
    assert rig.stand_in.bodies[0]["stream"] is True

    rig.engine.generate(raw("r2", max_tokens=10))  # the stand-in stops at 3 with stop_type "limit"
    payloads = await rig.host.wait("r2")
    assert payloads[-1]["GeneratedToken"]["SamplerError"].startswith("context full")
    assert rig.host.error_kinds["r2"] is ErrorKind.CONTEXT_FULL


async def test_stop_closes_the_stream_to_the_server(rig: Rig) -> None:
    await until(lambda: rig.board.slots_total == 3, "slots from /props")
    rig.stand_in.tokens, rig.stand_in.token_delay = 1000, 0.01
    rig.engine.generate(raw("long", max_tokens=1000))
    await asyncio.wait_for(rig.stand_in.streaming.wait(), 5)
    await until(lambda: rig.board.slots_processing == 1, "one busy slot")
    rig.engine.stop("long")
    await asyncio.wait_for(rig.stand_in.disconnected.wait(), 5)
    assert rig.board.slots_processing == 0
    assert "Done" not in str(rig.host.payloads.get("long", []))


async def test_without_the_slots_endpoint_busy_slots_are_the_agents_own(rig: Rig) -> None:
    rig.stand_in.slots_endpoint = False
    await until(lambda: rig.engine.props is not None and not rig.engine.props.slots_endpoint, "501 noticed")
    assert rig.board.slots_total == 3
    rig.stand_in.tokens, rig.stand_in.token_delay = 1000, 0.01
    rig.engine.generate(raw("a", max_tokens=1000))
    await until(lambda: rig.board.slots_processing == 1, "own request counted")
    rig.engine.stop("a")
    assert rig.board.slots_processing == 0


async def test_backend_problem_is_none_while_the_server_answers_its_health(rig: Rig) -> None:
    assert await rig.engine.backend_problem() is None


async def test_backend_problem_says_why_when_the_server_is_loading(rig: Rig) -> None:
    rig.stand_in.healthy = False

    problem = await rig.engine.backend_problem()

    assert problem is not None
    assert "Loading model" in problem


async def test_backend_problem_says_why_when_the_server_is_gone(rig: Rig) -> None:
    await rig.runner.cleanup()

    problem = await rig.engine.backend_problem()

    assert problem is not None
    assert f"llama-server at {rig.url} does not answer /health" in problem
