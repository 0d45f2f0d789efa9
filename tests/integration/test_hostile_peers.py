"""Hostile peers, through real processes: agents that lie about their slots, answer
nothing or send garbage, and clients that send bodies far over the limit.

A rogue agent here is a real WebSocket client speaking the agent protocol from the
test process; honest agents are real ``paddler agent --engine simulated`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from tests.harness import Balancer, Processes, wait_until


def register(slots: int, name: str = "rogue") -> str:
    return json.dumps(
        {
            "type": "register",
            "protocol_version": 1,
            "name": name,
            "model_group": "default",
            "status": {"slots_total": slots},
        }
    )


@contextlib.asynccontextmanager
async def rogue_agent(
    balancer: Balancer, slots: int, answer: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
) -> AsyncIterator[dict[str, Any]]:
    """A registered rogue agent; ``answer`` maps each generate message to the messages it
    sends back (None: it answers nothing). Yields the balancer's registration reply."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{balancer.management_url}/api/v1/agent_socket/rogue-id") as ws,
    ):
        await ws.send_str(register(slots))
        reply = await ws.receive_json(timeout=5)
        reply = reply[0] if isinstance(reply, list) else reply

        async def serve() -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                decoded = json.loads(msg.data)
                for message in decoded if isinstance(decoded, list) else [decoded]:
                    if message.get("type") == "generate" and answer is not None:
                        for out in answer(message):
                            await ws.send_str(json.dumps(out))

        task = asyncio.create_task(serve())
        try:
            yield reply
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        body: dict[str, Any] = (await http.get(f"{balancer.management_url}/api/v1/agents")).json()
    return list(body["agents"])


async def generate(balancer: Balancer, prompt: str = "hello", timeout: float = 30) -> httpx.Response:
    async with httpx.AsyncClient(timeout=timeout) as http:
        return await http.post(
            f"{balancer.inference_url}/api/v1/continue_from_raw_prompt",
            json={"raw_prompt": prompt, "max_tokens": 4},
        )


def generated_by(response: httpx.Response) -> str:
    last = json.loads(response.text.splitlines()[-1])
    return str(last["Response"]["generated_by"])


# ---- 10. agents that lie or answer garbage ---------------------------------------------------------


async def test_agent_claiming_a_billion_slots_is_rejected_at_registration(paddler: Processes) -> None:
    balancer = paddler.balancer()

    async with rogue_agent(balancer, slots=10**9) as reply:
        listed = await agents(balancer)

    assert reply["type"] == "rejected"
    assert "slots_total" in reply["reason"]
    assert "less than or equal to 1024" in reply["reason"]
    assert listed == []


async def test_agent_that_answers_nothing_stops_drawing_traffic_from_honest_agents(paddler: Processes) -> None:
    balancer = paddler.balancer("--inference-item-timeout", "5s", "--buffered-request-timeout", "20s")
    paddler.agent(balancer, slots=2, name="honest")
    await wait_until(lambda: _names(balancer, ["honest"]), what="honest agent registered")

    async with rogue_agent(balancer, slots=1000) as reply:
        assert reply["type"] == "registered"
        first = await generate(balancer)  # the rogue has the most free slots: it gets this one
        responses = await asyncio.gather(*(generate(balancer, f"request {i}") for i in range(8)))
        rogue = next(a for a in await agents(balancer) if a["name"] == "rogue")

    assert first.status_code == 504
    assert [r.status_code for r in responses] == [200] * 8
    honest_id = next(a["id"] for a in await agents(balancer) if a["name"] == "honest")
    assert {generated_by(r) for r in responses} == {honest_id}
    assert rogue["unresponsive"] is True


async def test_invalid_payload_from_an_agent_is_a_502_for_that_request(paddler: Processes) -> None:
    balancer = paddler.balancer("--inference-item-timeout", "10s")

    def garbage(message: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "response", "request_id": message["request_id"], "response": {"GeneratedToken": 5}}]

    async with rogue_agent(balancer, slots=2, answer=garbage):
        native = await generate(balancer)
        async with httpx.AsyncClient(timeout=30) as http:
            openai = await http.post(
                f"{balancer.inference_url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            )
        listed = await agents(balancer)

    assert native.status_code == 502
    assert native.json()["error"]["message"] == "the agent serving this request sent an invalid response"
    assert openai.status_code == 502
    assert listed[0]["slots_in_flight"] == 0


async def _names(balancer: Balancer, expected: list[str]) -> bool:
    try:
        return sorted(a["name"] for a in await agents(balancer)) == expected
    except httpx.HTTPError:
        return False


# ---- 8. request ids of different clients ---------------------------------------------------------


async def test_two_socket_clients_with_the_same_request_id_both_get_their_own_answer(paddler: Processes) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=2, name="only", extra=("--simulated-max-tokens", "8"))
    await wait_until(lambda: _names(balancer, ["only"]), what="agent registered")

    async def ask(prompt: str) -> list[dict[str, Any]]:
        request = {
            "Request": {"id": "order-1", "request": {"ContinueFromRawPrompt": {"raw_prompt": prompt, "max_tokens": 8}}}
        }
        replies: list[dict[str, Any]] = []
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{balancer.inference_url}/api/v1/inference_socket") as ws,
        ):
            await ws.send_str(json.dumps(request))
            async with asyncio.timeout(15):
                while True:
                    reply = await ws.receive_json()
                    replies.append(reply)
                    if "Error" in reply or "Done" in str(reply):
                        return replies

    first, second = await asyncio.gather(ask("first prompt"), ask("second prompt"))

    for replies in (first, second):
        assert all("Response" in r and r["Response"]["request_id"] == "order-1" for r in replies), replies
        assert len(replies) == 9  # 8 tokens, then Done


# ---- 11. bodies over the limit ----------------------------------------------------------------------

LIMIT = 16 * 1024 * 1024


async def _raw_http(url: str, head: bytes, body_chunks: int = 0, chunk: bytes = b"") -> tuple[bytes, int]:
    """Send ``head`` and up to ``body_chunks`` chunks; returns (response bytes, chunks sent
    before the response arrived)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = 0
    try:
        writer.write(head)
        await writer.drain()
        response = b""
        async with asyncio.timeout(20):
            while not response:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.01 if sent < body_chunks else 5):
                        response = await reader.read(65536)
                        break
                if sent < body_chunks:
                    with contextlib.suppress(ConnectionError):
                        writer.write(chunk)
                        await writer.drain()
                    sent += 1
        return response, sent
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_declared_oversized_body_is_rejected_before_it_is_sent(paddler: Processes) -> None:
    balancer = paddler.balancer()
    head = (
        b"POST /api/v1/continue_from_raw_prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 70000000\r\n\r\n"
    )

    response, _ = await _raw_http(balancer.inference_url, head)  # not one byte of the body sent

    assert response.startswith(b"HTTP/1.1 413")
    assert b"larger than the limit of 16777216 bytes" in response


async def test_a_body_without_a_length_is_cut_off_at_the_limit(paddler: Processes) -> None:
    balancer = paddler.balancer()
    head = (
        b"POST /api/v1/continue_from_raw_prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    size = 1024 * 1024
    chunk = f"{size:x}\r\n".encode() + b" " * size + b"\r\n"

    response, sent = await _raw_http(balancer.inference_url, head, body_chunks=64, chunk=chunk)

    assert response.startswith(b"HTTP/1.1 413")
    assert b"sent without a length" in response
    assert sent < 32  # answered once the limit (16 chunks) passed, long before all 64 were sent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_memory_returns_after_rejected_large_posts(paddler: Processes) -> None:
    balancer = paddler.balancer()
    pid = balancer.process.popen.pid
    baseline = rss_mb(pid)
    body = b'{"raw_prompt": "' + b"x" * (LIMIT - 20) + b'", "max_tokens": 1}'  # just under the limit
    too_big = body + b" " * (2 * 1024 * 1024)

    async def stream(data: bytes) -> AsyncIterator[bytes]:  # no Content-Length: read up to the limit
        for i in range(0, len(data), 1 << 20):
            yield data[i : i + (1 << 20)]

    async with httpx.AsyncClient(timeout=60) as http:
        for _ in range(10):
            declared = await http.post(
                f"{balancer.inference_url}/api/v1/continue_from_raw_prompt",
                content=too_big,
                headers={"Content-Type": "application/json"},
            )
            assert declared.status_code == 413
            streamed = await http.post(
                f"{balancer.inference_url}/v1/completions",
                content=stream(too_big),
                headers={"Content-Type": "application/json"},
            )
            assert streamed.status_code == 413

    async def memory_returned() -> bool:
        return rss_mb(pid) - baseline < 60

    await wait_until(memory_returned, timeout=10, what=f"RSS back near {baseline:.0f} MB (now {rss_mb(pid):.0f} MB)")


# ---- a hostile balancer: what an agent does with messages it cannot use -----------------------------


async def test_agent_survives_messages_it_cannot_use_and_says_why(paddler: Processes) -> None:
    """A real simulated agent dials a balancer played by the test, which sends an
    out-of-bounds desired state, a prompt with a lone surrogate and a malformed request:
    the agent reports an issue, answers each request with an error, and keeps serving."""
    from aiohttp import web

    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outgoing: asyncio.Queue[str] = asyncio.Queue()

    async def agent_socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive_json()  # register
        await ws.send_str(json.dumps({"type": "registered", "agent_id": "x"}))

        async def forward() -> None:
            while True:
                await ws.send_str(await outgoing.get())

        sender = asyncio.create_task(forward())
        try:
            async for msg in ws:
                decoded = json.loads(msg.data)
                for message in decoded if isinstance(decoded, list) else [decoded]:
                    received.put_nowait(message)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/agent_socket/{agent_id}", agent_socket)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        agent = paddler.spawn(
            "agent-target",
            ["agent", "--management-addr", f"127.0.0.1:{port}", "--slots", "2", "--name", "t", "--engine", "simulated"],
        )
        state = {"inference_parameters": {"context_size": 10**30}}
        outgoing.put_nowait(json.dumps({"type": "set_desired_state", "state": state}))
        outgoing.put_nowait(
            '{"type": "generate", "request_id": "bad", "variant": "ContinueFromRawPrompt", '
            '"params": {"raw_prompt": "\\ud800", "max_tokens": 2}}'
        )
        outgoing.put_nowait(json.dumps({"type": "generate", "request_id": "malformed"}))
        outgoing.put_nowait(
            json.dumps(
                {
                    "type": "generate",
                    "request_id": "good",
                    "variant": "ContinueFromRawPrompt",
                    "params": {"raw_prompt": "hi", "max_tokens": 2},
                }
            )
        )
        finals: dict[str, Any] = {}
        issues: list[str] = []
        async with asyncio.timeout(20):
            while not ({"bad", "malformed", "good"} <= finals.keys() and issues):
                message = await received.get()
                if message.get("type") == "response" and message.get("final"):
                    finals[message["request_id"]] = message["response"]
                elif message.get("type") == "status":
                    issues = [next(iter(i)) if isinstance(i, dict) else i for i in message["status"]["issues"]]
    finally:
        await runner.cleanup()

    assert issues == ["InvalidDesiredState"]
    assert "Done" in finals["bad"]["GeneratedToken"]  # the simulated engine hashes it safely
    assert "invalid request" in finals["malformed"]["GeneratedToken"]["SamplerError"]
    assert "Done" in finals["good"]["GeneratedToken"]
    assert agent.alive
