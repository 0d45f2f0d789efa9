"""Paddler 4.1's wire contract, each behaviour through real processes: the inference
WebSocket's cancellation and token-generation notifications, request fields, the
balancer's shutdown with open event streams."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import httpx
import websockets

from tests.harness import Balancer, Processes, wait_until


def _socket_url(balancer: Balancer, query: str = "") -> str:
    return balancer.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket" + query


async def _agents(balancer: Balancer) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        found: list[dict[str, Any]] = (await http.get(balancer.management_url + "/api/v1/agents")).json()["agents"]
    return found


async def _ready(balancer: Balancer, count: int = 1) -> None:
    async def ready() -> bool:
        found = await _agents(balancer)
        return len(found) == count and all(a["slots_total"] > 0 for a in found)

    await wait_until(ready, timeout=20, what=f"{count} agent(s) ready")


async def _buffered(balancer: Balancer) -> int:
    async with httpx.AsyncClient() as http:
        body = (await http.get(balancer.management_url + "/api/v1/buffered_requests")).json()
    count: int = body["buffered_requests_current"]
    return count


def _request(request_id: str, max_tokens: int = 200) -> str:
    params = {"raw_prompt": "Tell me", "max_tokens": max_tokens}
    return json.dumps({"Request": {"id": request_id, "request": {"ContinueFromRawPrompt": params}}})


def _stop(request_id: str) -> str:
    return json.dumps({"Notification": {"StopRespondingTo": request_id}})


async def test_stop_responding_to_notification_stops_a_running_request_and_frees_its_slot(
    paddler: Processes,
) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="sim", extra=("--simulated-tokens-per-second", "20"))
    await _ready(balancer)
    async with websockets.connect(_socket_url(balancer)) as ws:
        await ws.send(_request("running"))
        first = json.loads(await ws.recv())
        assert first["Response"]["request_id"] == "running"
        await ws.send(_stop("running"))

        async def idle() -> bool:
            return all(a["slots_in_flight"] == 0 and a["slots_processing"] == 0 for a in await _agents(balancer))

        await wait_until(idle, timeout=5, what="slot freed after StopRespondingTo")
        await ws.send(_request("next", max_tokens=2))
        async with asyncio.timeout(10):  # the socket keeps serving
            while True:
                reply = json.loads(await ws.recv())
                response = reply.get("Response", {})
                if response.get("request_id") == "next" and "Done" in response["response"]["GeneratedToken"]:
                    break


async def test_stop_responding_to_notification_releases_a_buffered_request(paddler: Processes) -> None:
    balancer = paddler.balancer()  # no agent: requests wait in the buffer
    async with websockets.connect(_socket_url(balancer)) as ws:
        await ws.send(_request("waiting"))

        async def buffered() -> bool:
            return await _buffered(balancer) == 1

        await wait_until(buffered, timeout=5, what="request buffered")
        await ws.send(_stop("waiting"))

        async def released() -> bool:
            return await _buffered(balancer) == 0

        await wait_until(released, timeout=5, what="buffered request released by StopRespondingTo")


async def _put_embeddings(balancer: Balancer, enabled: bool) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(
            balancer.management_url + "/api/v1/balancer_desired_state",
            json={"inference_parameters": {"enable_embeddings": enabled}},
        )
        assert response.status_code == 204, response.text


async def test_socket_is_notified_when_token_generation_is_disabled_and_enabled(paddler: Processes) -> None:
    balancer = paddler.balancer()
    await _put_embeddings(balancer, True)
    async with websockets.connect(_socket_url(balancer)) as ws:
        assert json.loads(await ws.recv()) == {"Notification": "TokenGenerationDisabled"}  # on connect
        await _put_embeddings(balancer, False)
        assert json.loads(await ws.recv()) == {"Notification": "TokenGenerationEnabled"}
        await _put_embeddings(balancer, True)
        assert json.loads(await ws.recv()) == {"Notification": "TokenGenerationDisabled"}


async def test_conversation_request_accepts_parse_tool_calls(paddler: Processes) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="sim", extra=("--simulated-tokens-per-second", "200"))
    await _ready(balancer)
    body = {
        "add_generation_prompt": True,
        "conversation_history": [{"role": "user", "content": "hi"}],
        "enable_thinking": False,
        "max_tokens": 3,
        "tools": [],
        "parse_tool_calls": False,
    }
    async with httpx.AsyncClient() as http:
        response = await http.post(balancer.inference_url + "/api/v1/continue_from_conversation_history", json=body)
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    assert "Done" in lines[-1]["Response"]["response"]["GeneratedToken"]


async def test_balancer_with_open_event_streams_exits_on_sigterm_without_waiting_for_them(paddler: Processes) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="sim")
    await _ready(balancer)
    async with httpx.AsyncClient(timeout=10) as http:
        streams = []
        for path in ("/api/v1/agents/stream", "/api/v1/buffered_requests/stream"):
            stream = http.stream("GET", balancer.management_url + path)
            response = await stream.__aenter__()
            assert response.status_code == 200
            streams.append(stream)
            await anext(response.aiter_lines())  # subscribed: the first event arrived
        popen = balancer.process.popen
        started = time.monotonic()
        popen.send_signal(signal.SIGTERM)

        async def exited() -> bool:
            return popen.poll() is not None

        await wait_until(exited, timeout=10, interval=0.01, what="balancer exited")
        elapsed = time.monotonic() - started
        code = popen.poll()
        for stream in streams:
            await stream.__aexit__(None, None, None)
    assert code == 0
    # The streams never end on their own: held, they would keep the management listener
    # for aiohttp's default shutdown timeout (60 s). The balancer gives them 1 s; the bound
    # leaves a loaded machine room for the process's own exit and stays far below 60 s.
    assert elapsed < 15.0, f"exited {elapsed:.2f} s after SIGTERM"


async def test_tool_schema_requiring_a_field_not_in_properties_is_rejected(paddler: Processes) -> None:
    balancer = paddler.balancer()
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city", "country"],
            },
        },
    }
    body = {
        "add_generation_prompt": True,
        "conversation_history": [{"role": "user", "content": "hi"}],
        "enable_thinking": False,
        "max_tokens": 3,
        "tools": [tool],
    }
    async with httpx.AsyncClient() as http:
        native = await http.post(balancer.inference_url + "/api/v1/continue_from_conversation_history", json=body)
        chat = await http.post(
            balancer.inference_url + "/v1/chat/completions",
            json={"messages": body["conversation_history"], "tools": [tool]},
        )
        bad_type = {
            **tool,
            "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}},
        }
        invalid_property = await http.post(
            balancer.inference_url + "/api/v1/continue_from_conversation_history", json={**body, "tools": [bad_type]}
        )
    # Paddler 4.1 streams the native answer (no agent is needed for it); OpenAI's is a 400.
    assert native.status_code == 200
    assert "Required field 'country' not found in properties" in _tool_schema_invalid(native)
    assert chat.status_code == 400
    assert "Required field 'country' not found in properties" in chat.json()["error"]["message"]
    assert "Invalid schema for property 'x'" in _tool_schema_invalid(invalid_property)
    async with websockets.connect(_socket_url(balancer)) as ws:
        request = {"Request": {"id": "t", "request": {"ContinueFromConversationHistory": body}}}
        await ws.send(json.dumps(request))
        response = json.loads(await ws.recv())["Response"]
    assert response["request_id"] == "t"
    assert (
        "Required field 'country' not found in properties"
        in response["response"]["GeneratedToken"]["ToolSchemaInvalid"]
    )


def _tool_schema_invalid(response: httpx.Response) -> str:
    """The message of the one ``ToolSchemaInvalid`` payload a native NDJSON answer holds."""
    [line] = response.text.splitlines()
    message: str = json.loads(line)["Response"]["response"]["GeneratedToken"]["ToolSchemaInvalid"]
    return message


async def test_remote_malformed_and_invalid_base64_image_urls_are_refused_with_a_clear_400(
    paddler: Processes,
) -> None:
    balancer = paddler.balancer()
    cases = {
        "http://example.com/cat.png": "remote image URLs are not fetched",
        "data:image/png,not-base64-marked": "malformed image data URI",
        "data:image/png;base64,@@@not base64@@@": "not valid base64",
    }
    async with httpx.AsyncClient() as http:
        for url, reason in cases.items():
            part = {"type": "image_url", "image_url": {"url": url}}
            native = await http.post(
                balancer.inference_url + "/api/v1/continue_from_conversation_history",
                json={"conversation_history": [{"role": "user", "content": [part]}], "max_tokens": 3},
            )
            chat = await http.post(
                balancer.inference_url + "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": [part]}]},
            )
            responses = await http.post(
                balancer.inference_url + "/v1/responses",
                json={"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
            )
            for response in (native, chat, responses):
                assert response.status_code == 400, (url, response.text)
                assert reason in response.json()["error"]["message"], (url, response.text)
