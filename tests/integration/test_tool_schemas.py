"""Tool schemas through real processes (balancer + simulated agent) and real clients: the
``openai`` SDK (chat completions and responses), ``paddler-client`` and the native API's
NDJSON and inference WebSocket. Full JSON Schema is accepted. An invalid schema names the
tool: a 400 on the OpenAI API; on the native API, as Paddler 4.1 streams it, one
``ToolSchemaInvalid`` payload (``paddler-client`` 4.0.0 does not know that variant, so it
is read off the wire here). A schema that references a remote URL is refused without a
connection."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from paddler_client import ClientInference
from paddler_client.continue_from_conversation_history_params import ContinueFromConversationHistoryParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.inference_message import InferenceMessageKind
from paddler_client.tool import Function, Tool
from paddler_client.validated_parameters_schema import ValidatedParametersSchema

from tests.harness import Balancer, Processes
from tests.openai.conftest import openai_client, wait_for_agents

PYDANTIC_SHIP = {
    "$defs": {
        "Address": {
            "properties": {"street": {"type": "string"}, "postcode": {"pattern": "^[0-9]{4,5}$", "type": "string"}},
            "required": ["street", "postcode"],
            "type": "object",
        }
    },
    "properties": {
        "to": {"$ref": "#/$defs/Address"},
        "speed": {"enum": ["standard", "express"], "type": "string"},
    },
    "required": ["to", "speed"],
    "type": "object",
}
"""``Shipment.model_json_schema()`` of a pydantic model: ``$defs`` + ``$ref``."""

OPENCODE_BASH = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "command": {"type": "string"},
        "mode": {"const": "run"},
        "timeout": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "pattern": "^[A-Z_]+$"}, "value": {"type": "string"}},
                "required": ["name", "value"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["command", "mode"],
    "additionalProperties": False,
}

ZOD_READ = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {"path": {"type": "string"}, "encoding": {"$ref": "#/definitions/encoding"}},
    "required": ["path"],
    "additionalProperties": False,
    "definitions": {"encoding": {"type": "string", "enum": ["utf-8", "latin-1"]}},
}

INVALID = {
    "a keyword of the wrong type": (
        {"type": "object", "properties": {"q": {"type": "string", "maxLength": "ten"}}},
        "tool 'lookup': Invalid schema for property 'q': 'ten' is not of type 'integer'",
    ),
    "an unknown type": (
        {"type": "object", "properties": {"q": {"type": "text"}}},
        "tool 'lookup': Invalid schema for property 'q': 'text' is not valid under any of the given schemas",
    ),
    "a bad $ref": (
        {"type": "object", "properties": {"q": {"$ref": "#/$defs/Query"}}},
        "tool 'lookup': $.properties.q['$ref']: '#/$defs/Query' does not resolve inside the schema",
    ),
}

USER: Any = [{"role": "user", "content": "Ship it"}]


def _tool(name: str, parameters: dict[str, Any]) -> Any:
    return {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One balancer with one simulated agent for the whole file (start-up is most of the cost)."""
    processes = Processes(tmp_path_factory.mktemp("tool-schemas"))
    try:
        balancer = processes.balancer()
        processes.agent(balancer, slots=2, name="sim", extra=("--simulated-tokens-per-second", "500"))
        asyncio.run(wait_for_agents(balancer, 1))
        yield balancer
    finally:
        processes.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A port a fetch of ``http://127.0.0.1:PORT/...`` would reach: it must see no connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def _no_connection(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


async def test_openai_sdk_chat_with_full_json_schema_tools_is_answered(pool: Balancer) -> None:
    tools: Any = [_tool("ship", PYDANTIC_SHIP), _tool("bash", OPENCODE_BASH), _tool("read", ZOD_READ)]
    async with openai_client(pool) as client:
        answer = await client.chat.completions.create(model="default", messages=USER, tools=tools, max_tokens=4)
    assert answer.choices[0].message.content


async def test_openai_sdk_forced_call_of_a_tool_with_defs_is_parsed(pool: Balancer) -> None:
    tools: Any = [_tool("ship", PYDANTIC_SHIP), _tool("bash", OPENCODE_BASH)]
    async with openai_client(pool) as client:
        answer = await client.chat.completions.create(
            model="default",
            messages=USER,
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "bash"}},
            max_tokens=200,
        )
    calls = answer.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].function.name == "bash"  # type: ignore[union-attr]


@pytest.mark.parametrize(("schema", "message"), list(INVALID.values()), ids=list(INVALID))
async def test_openai_sdk_chat_refuses_an_invalid_tool_schema_naming_the_tool(
    pool: Balancer, schema: dict[str, Any], message: str
) -> None:
    tools: Any = [_tool("ship", PYDANTIC_SHIP), _tool("lookup", schema)]
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model="default", messages=USER, tools=tools, max_tokens=4)
    assert message in raised.value.message
    assert raised.value.param == "tools.1.function.parameters"


async def test_openai_sdk_responses_refuses_an_invalid_tool_schema_naming_the_tool(pool: Balancer) -> None:
    schema, message = INVALID["an unknown type"]
    tool: Any = {"type": "function", "name": "lookup", "parameters": schema}
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.responses.create(model="default", input="hi", tools=[tool])
    assert message in raised.value.message


async def test_openai_sdk_tool_with_a_remote_ref_is_refused_without_a_connection(
    pool: Balancer, listener: socket.socket
) -> None:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/address.json"
    schema = {"type": "object", "properties": {"to": {"$ref": url}}}
    async with openai_client(pool) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(
                model="default",
                messages=USER,
                tools=[_tool("ship", schema)],
                max_tokens=4,
            )
    assert f"tool 'ship': $.properties.to['$ref']: '{url}' is outside the schema" in raised.value.message
    assert _no_connection(listener)


def _paddler_tool(name: str, parameters: dict[str, Any]) -> Tool:
    return Tool(function=Function(name=name, description=name, parameters=ValidatedParametersSchema(**parameters)))


def _params(*tools: Tool) -> ContinueFromConversationHistoryParams:
    return ContinueFromConversationHistoryParams(
        add_generation_prompt=True,
        conversation_history=[ConversationMessage(role="user", content="Run it")],
        enable_thinking=False,
        max_tokens=4,
        tools=list(tools),
    )


@pytest.fixture
async def paddler_client(pool: Balancer) -> AsyncIterator[ClientInference]:
    client = ClientInference(pool.inference_url)
    yield client
    await client.close()


async def test_paddler_client_with_full_json_schema_tools_is_answered(paddler_client: ClientInference) -> None:
    # paddler-client 4.0.0 sends type, properties, required, additionalProperties (it drops $defs).
    params = _params(_paddler_tool("bash", OPENCODE_BASH))
    kinds = [m.kind async for m in paddler_client.post_continue_from_conversation_history(params)]
    assert kinds[-1] == InferenceMessageKind.DONE
    streamed = [m.kind async for m in await paddler_client.continue_from_conversation_history(params)]
    assert streamed[-1] == InferenceMessageKind.DONE


def _conversation(*tools: Any) -> dict[str, Any]:
    return {"conversation_history": USER, "max_tokens": 4, "tools": list(tools)}


async def _ndjson_payloads(pool: Balancer, body: dict[str, Any]) -> tuple[int, list[Any]]:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{pool.inference_url}/api/v1/continue_from_conversation_history", json=body)
    return response.status_code, [json.loads(line)["Response"]["response"] for line in response.text.splitlines()]


async def _socket_payload(pool: Balancer, body: dict[str, Any]) -> Any:
    """The first payload of one request on the inference WebSocket."""
    url = pool.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    request = {"Request": {"id": "r1", "request": {"ContinueFromConversationHistory": body}}}
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws, asyncio.timeout(10):
        await ws.send_json(request)
        while "Response" not in (message := await ws.receive_json()):
            pass
    return message["Response"]["response"]


@pytest.mark.parametrize(("schema", "message"), list(INVALID.values()), ids=list(INVALID))
async def test_native_ndjson_streams_tool_schema_invalid_naming_the_tool(
    pool: Balancer, schema: dict[str, Any], message: str
) -> None:
    status, payloads = await _ndjson_payloads(
        pool, _conversation(_tool("bash", OPENCODE_BASH), _tool("lookup", schema))
    )
    assert status == 200
    [payload] = payloads
    assert message in payload["GeneratedToken"]["ToolSchemaInvalid"]


async def test_inference_socket_streams_tool_schema_invalid_naming_the_tool(pool: Balancer) -> None:
    schema, message = INVALID["an unknown type"]
    payload = await _socket_payload(pool, _conversation(_tool("bash", OPENCODE_BASH), _tool("lookup", schema)))
    assert message in payload["GeneratedToken"]["ToolSchemaInvalid"]


async def test_native_tool_with_a_remote_ref_is_refused_without_a_connection(
    pool: Balancer, listener: socket.socket
) -> None:
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/query.json"
    _, [payload] = await _ndjson_payloads(
        pool, _conversation(_tool("lookup", {"type": "object", "properties": {"q": {"$ref": url}}}))
    )
    assert (
        f"'{url}' is outside the schema; references are never fetched" in payload["GeneratedToken"]["ToolSchemaInvalid"]
    )
    assert _no_connection(listener)
