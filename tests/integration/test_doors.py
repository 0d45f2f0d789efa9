"""Credentials and exposure (issue 10, cases 9 and 12), on real processes.

Tokens on the management port and the agent socket, agent ids claimed by a secret,
API keys that paddler-client 4.0.0 can send, CORS only for listed origins, and the
model URL allow-list / local roots at the balancer and again at the agent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from paddler_client import ClientInference, ClientManagement
from paddler_client.continue_from_conversation_history_params import ContinueFromConversationHistoryParams
from paddler_client.continue_from_raw_prompt_params import ContinueFromRawPromptParams
from paddler_client.conversation_message import ConversationMessage
from paddler_client.error import HttpError

from paddler_agent.model_files import CheckingResolver, ModelAccess, ModelSourceError
from paddler_agent.model_source import resolve_model
from paddler_core.desired_state import ModelSource, UrlModelReference
from paddler_core.model_access import ModelUrlPolicy
from tests.harness import Balancer, Processes, wait_until

TOKEN = "mgmt-token-for-tests"
API_KEY = "inference-key-for-tests"
REGISTER = {
    "type": "register",
    "protocol_version": 1,
    "name": "rogue",
    "model_group": "default",
    "status": {"slots_total": 1000},
}


def with_credential(url: str, secret: str) -> str:
    """``http://host:port`` -> ``http://paddler:<secret>@host:port``: what paddler-client takes."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://paddler:{secret}@{rest}"


async def agents(balancer: Balancer, token: str | None = None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{balancer.management_url}/api/v1/agents", headers=headers)
    response.raise_for_status()
    return list(response.json()["agents"])


async def wait_for_agent_names(balancer: Balancer, names: list[str], token: str | None = None) -> None:
    async def listed() -> bool:
        return sorted(a["name"] for a in await agents(balancer, token)) == sorted(names)

    await wait_until(listed, timeout=15, what=f"agents {names}")


async def put_state(balancer: Balancer, body: Any, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient() as http:
        return await http.put(f"{balancer.management_url}/api/v1/balancer_desired_state", json=body, headers=headers)


async def agent_issues(balancer: Balancer) -> list[dict[str, Any]]:
    return [issue for a in await agents(balancer) for issue in a["issues"]]


@pytest.fixture
async def clients() -> AsyncIterator[list[ClientInference | ClientManagement]]:
    opened: list[ClientInference | ClientManagement] = []
    yield opened
    for client in opened:
        await client.close()


async def prompt_tokens(inference: ClientInference, prompt: str, over_socket: bool) -> list[str]:
    """Tokens of one request: a raw prompt over the inference WebSocket, or a conversation
    over NDJSON (the one native POST paddler-client makes)."""
    if over_socket:
        params = ContinueFromRawPromptParams(raw_prompt=prompt, max_tokens=3)
        messages = [m async for m in await inference.continue_from_raw_prompt(params)]
    else:
        chat = ContinueFromConversationHistoryParams(
            add_generation_prompt=True,
            conversation_history=[ConversationMessage(role="user", content=prompt)],
            enable_thinking=False,
            max_tokens=3,
        )
        messages = [m async for m in inference.post_continue_from_conversation_history(chat)]
    return [m.token for m in messages if m.is_token and m.token is not None]


# --- case 9: an agent id is claimed only with a credential ---------------------------------


async def test_rogue_agent_cannot_take_over_a_known_agent_id(
    paddler: Processes, clients: list[ClientInference | ClientManagement]
) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=2, name="real")
    await wait_for_agent_names(balancer, ["real"])
    real_id = (await agents(balancer))[0]["id"]

    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{balancer.management_url}/api/v1/agent_socket/{real_id}") as ws,
    ):
        await ws.send_str(json.dumps(REGISTER))
        reply = await ws.receive_json(timeout=5)

    assert reply["type"] == "rejected"
    assert "claimed by another agent" in reply["reason"]
    listed = await agents(balancer)
    assert [(a["id"], a["name"]) for a in listed] == [(real_id, "real")]
    inference = ClientInference(balancer.inference_url)
    clients.append(inference)
    assert len(await prompt_tokens(inference, "still served", over_socket=False)) == 3


async def test_agent_socket_refuses_an_agent_without_the_token(paddler: Processes) -> None:
    balancer = paddler.balancer("--management-token", TOKEN)
    keyless = paddler.agent(balancer, slots=1, name="keyless")
    paddler.agent(balancer, slots=1, name="trusted", env={"PADDLER_MANAGEMENT_TOKEN": TOKEN})
    await wait_for_agent_names(balancer, ["trusted"], TOKEN)

    async def keyless_told_why() -> bool:
        return "refused this agent's management token (HTTP 401)" in keyless.output()

    await wait_until(keyless_told_why, timeout=10, what="the keyless agent logs the 401")
    assert [a["name"] for a in await agents(balancer, TOKEN)] == ["trusted"]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{balancer.management_url}/api/v1/agent_socket/intruder")
    assert refused.value.status == 401


# --- case 12: the management port needs the token ------------------------------------------

MANAGEMENT_ROUTES = [
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/agents/stream"),
    ("GET", "/api/v1/buffered_requests"),
    ("GET", "/api/v1/buffered_requests/stream"),
    ("GET", "/api/v1/balancer_desired_state"),
    ("PUT", "/api/v1/balancer_desired_state"),
    ("GET", "/api/v1/model_groups"),
    ("PUT", "/api/v1/model_groups/other/desired_state"),
    ("DELETE", "/api/v1/model_groups/other/desired_state"),
    ("GET", "/api/v1/agent/someone/model_metadata"),
    ("GET", "/api/v1/agent/someone/chat_template_override"),
    ("GET", "/api/v1/agent_socket/someone"),
    ("GET", "/metrics"),
]


async def test_management_routes_require_the_token(
    paddler: Processes, clients: list[ClientInference | ClientManagement]
) -> None:
    balancer = paddler.balancer("--management-token", TOKEN)
    async with httpx.AsyncClient() as http:
        refused = {
            path: (await http.request(method, balancer.management_url + path, json={})).status_code
            for method, path in MANAGEMENT_ROUTES
        }
        wrong = await http.get(
            balancer.management_url + "/api/v1/agents", headers={"Authorization": "Bearer not-the-token"}
        )
        health = await http.get(balancer.management_url + "/health")
        with_token = await http.get(
            balancer.management_url + "/api/v1/agents", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert refused == {path: 401 for _method, path in MANAGEMENT_ROUTES}
    assert wrong.status_code == 401
    assert "management token" in wrong.json()["error"]["message"]
    assert health.status_code == 200
    assert with_token.status_code == 200

    management = ClientManagement(with_credential(balancer.management_url, TOKEN))
    keyless = ClientManagement(balancer.management_url)
    clients.extend([management, keyless])
    assert (await management.get_agents()).agents == []
    with pytest.raises(HttpError):
        await keyless.get_agents()


async def test_management_port_without_a_token_says_so_at_startup(paddler: Processes) -> None:
    balancer = paddler.balancer()
    assert "management port is OPEN: no --management-token" in balancer.process.output()
    assert await agents(balancer) == []


async def test_sse_stream_takes_the_token_as_a_query_parameter(paddler: Processes) -> None:
    balancer = paddler.balancer("--management-token", TOKEN)
    url = f"{balancer.management_url}/api/v1/buffered_requests/stream?management_token={TOKEN}"
    async with httpx.AsyncClient() as http, http.stream("GET", url) as response:
        assert response.status_code == 200
        first = await anext(response.aiter_lines())
        # ...but a plain route does not read the query parameter (it would end up in logs).
        plain = await http.get(f"{balancer.management_url}/api/v1/agents?management_token={TOKEN}")
    assert json.loads(first.removeprefix("data: ")) == {"buffered_requests_current": 0}
    assert plain.status_code == 401


# --- inference API keys that paddler-client can use ----------------------------------------


async def test_paddler_client_reaches_the_native_api_with_a_key(
    paddler: Processes, clients: list[ClientInference | ClientManagement]
) -> None:
    balancer = paddler.balancer("--api-key", API_KEY)
    paddler.agent(balancer, slots=2, name="keyed")
    await wait_for_agent_names(balancer, ["keyed"])
    inference = ClientInference(with_credential(balancer.inference_url, API_KEY))
    clients.append(inference)

    assert len(await prompt_tokens(inference, "over ndjson", over_socket=False)) == 3
    assert len(await prompt_tokens(inference, "over the socket", over_socket=True)) == 3


async def test_paddler_client_without_the_key_is_refused(
    paddler: Processes, clients: list[ClientInference | ClientManagement]
) -> None:
    balancer = paddler.balancer("--api-key", API_KEY)
    paddler.agent(balancer, slots=1, name="keyed")
    await wait_for_agent_names(balancer, ["keyed"])
    inference = ClientInference(with_credential(balancer.inference_url, "wrong-key"))
    clients.append(inference)

    with pytest.raises(Exception, match="401"):
        await prompt_tokens(inference, "over the socket", over_socket=True)


async def test_inference_socket_takes_the_key_as_a_query_parameter(paddler: Processes) -> None:
    balancer = paddler.balancer("--api-key", API_KEY)
    paddler.agent(balancer, slots=1, name="keyed")
    await wait_for_agent_names(balancer, ["keyed"])
    socket_url = balancer.inference_url.replace("http://", "ws://") + "/api/v1/inference_socket"
    request = {"Request": {"id": "q1", "request": {"ContinueFromRawPrompt": {"raw_prompt": "hi", "max_tokens": 2}}}}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(socket_url)
        async with session.ws_connect(f"{socket_url}?api_key={API_KEY}") as ws:
            await ws.send_str(json.dumps(request))
            replies = [await ws.receive_json(timeout=5) for _ in range(3)]
        openai_with_query = await session.get(f"{balancer.inference_url}/v1/models?api_key={API_KEY}")
    assert refused.value.status == 401
    assert all(r["Response"]["request_id"] == "q1" for r in replies)
    assert openai_with_query.status == 401  # the OpenAI routes take the key only in a header


# --- CORS only for configured origins -------------------------------------------------------


async def preflight(url: str, origin: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST"})


async def test_cors_preflight_from_an_unlisted_origin_is_refused(paddler: Processes) -> None:
    balancer = paddler.balancer()
    refused = await preflight(balancer.inference_url + "/v1/chat/completions", "https://evil.example")
    management = await preflight(balancer.management_url + "/api/v1/balancer_desired_state", "https://evil.example")
    async with httpx.AsyncClient() as http:
        simple = await http.get(balancer.inference_url + "/health", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert management.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    assert "access-control-allow-origin" not in simple.headers


async def test_cors_preflight_from_a_listed_origin_is_allowed(paddler: Processes) -> None:
    balancer = paddler.balancer(
        "--inference-cors-allowed-host", "https://app.example", "--inference-cors-allowed-host", "http://localhost:3000"
    )
    allowed = await preflight(balancer.inference_url + "/v1/chat/completions", "http://localhost:3000")
    other = await preflight(balancer.inference_url + "/v1/chat/completions", "https://other.example")
    management = await preflight(balancer.management_url + "/api/v1/agents", "https://app.example")
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Authorization" in allowed.headers["access-control-allow-headers"]
    assert other.status_code == 403
    assert management.status_code == 403  # listed for inference only


# --- model URLs and local paths -------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/model.gguf",
        "https://169.254.169.254/latest/meta-data/model.gguf",
        "https://metadata.google.internal/computeMetadata/v1/m.gguf",
        "https://127.0.0.1/m.gguf",
        "https://[::1]/m.gguf",
        "https://2130706433/m.gguf",
        "http://models.example.com/m.gguf",
    ],
)
async def test_put_pointing_at_a_metadata_address_is_refused(paddler: Processes, url: str) -> None:
    balancer = paddler.balancer()
    response = await put_state(balancer, {"model": {"Url": {"url": url}}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["kind"] == "model_url_not_allowed"
    assert url in error["message"]
    assert "--model-url-allow" in error["message"]


async def test_put_with_an_https_url_is_accepted(paddler: Processes) -> None:
    balancer = paddler.balancer()
    response = await put_state(balancer, {"model": {"Url": {"url": "https://models.example.com/m.gguf"}}})
    assert response.status_code == 204


async def test_agent_refuses_a_url_its_own_allow_list_does_not_hold(paddler: Processes) -> None:
    balancer = paddler.balancer("--model-url-allow", "http://127.0.0.1:9/")
    paddler.agent(balancer, slots=1, name="careful")
    await wait_for_agent_names(balancer, ["careful"])

    response = await put_state(balancer, {"model": {"Url": {"url": "http://127.0.0.1:9/m.gguf"}}})
    assert response.status_code == 204

    async def refused() -> bool:
        return any("ModelSourceNotAllowed" in issue for issue in await agent_issues(balancer))

    await wait_until(refused, timeout=10, what="the agent reports ModelSourceNotAllowed")
    (agent,) = await agents(balancer)
    assert agent["state_application_status"] == "AttemptedAndNotAppliable"
    assert "http://127.0.0.1:9/m.gguf" in json.dumps(agent["issues"])


async def test_local_path_outside_the_roots_reads_the_same_whether_it_exists(
    paddler: Processes, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"GGUF-not-really")
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="rooted", extra=("--model-local-root", str(root)))
    await wait_for_agent_names(balancer, ["rooted"])

    async def issue_for(path: str) -> dict[str, Any]:
        assert (await put_state(balancer, {"model": {"LocalToAgent": path}})).status_code == 204
        found: list[dict[str, Any]] = []

        async def reported() -> bool:
            found[:] = [i for i in await agent_issues(balancer) if json.dumps(i).find(path) >= 0]
            return bool(found)

        await wait_until(reported, timeout=10, what=f"an issue about {path}")
        return found[0]

    existing = await issue_for(str(outside))
    missing = await issue_for(str(tmp_path / "missing.gguf"))
    escaping = await issue_for(str(root / ".." / "secret.gguf"))

    def shape(issue: dict[str, Any], path: str) -> str:
        return json.dumps(issue).replace(path, "<path>")

    assert list(existing) == ["ModelSourceNotAllowed"]
    assert shape(existing, str(outside)) == shape(missing, str(tmp_path / "missing.gguf"))
    assert list(escaping) == ["ModelSourceNotAllowed"]


# --- the agent's download follows redirects itself, checking each hop -----------------------

GGUF_BYTES = b"GGUF" + bytes(60)


async def redirecting_server(target: str) -> web.AppRunner:
    async def redirect(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(target)

    async def model(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=GGUF_BYTES)

    app = web.Application()
    app.router.add_get("/m.gguf", redirect)
    app.router.add_get("/files/m.gguf", model)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def port_of(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest/meta-data/m.gguf", "http://localhost:{port}/files/m.gguf"]
)
async def test_agent_download_refuses_a_redirect_to_an_internal_address(tmp_path: Path, target: str) -> None:
    runner = await redirecting_server("")
    port = port_of(runner)
    await runner.cleanup()
    runner = await redirecting_server(target.format(port=port))
    try:
        access = ModelAccess(ModelUrlPolicy.from_entries([f"http://127.0.0.1:{port_of(runner)}/"]))
        url = f"http://127.0.0.1:{port_of(runner)}/m.gguf"
        with pytest.raises(ModelSourceError) as refused:
            await resolve_model(
                ModelSource(kind="Url", url=UrlModelReference(url=url)), tmp_path, lambda _p: None, access=access
            )
    finally:
        await runner.cleanup()
    assert refused.value.variant == "ModelSourceNotAllowed"
    assert target.split("/")[2].split(":")[0] in refused.value.message


async def test_agent_download_follows_an_allowed_redirect(tmp_path: Path) -> None:
    runner = await redirecting_server("/files/m.gguf")
    try:
        base = f"http://127.0.0.1:{port_of(runner)}"
        access = ModelAccess(ModelUrlPolicy.from_entries([f"{base}/"]))
        path = await resolve_model(
            ModelSource(kind="Url", url=UrlModelReference(url=f"{base}/m.gguf")),
            tmp_path,
            lambda _p: None,
            access=access,
        )
    finally:
        await runner.cleanup()
    assert path.read_bytes() == GGUF_BYTES


async def test_agent_resolver_refuses_a_name_that_resolves_to_loopback() -> None:
    # A host name the allow-list lets through (any http host) that resolves to 127.0.0.1: the
    # connection would go inside the machine, so the resolver refuses before anything is dialled.
    resolver = CheckingResolver(ModelAccess(ModelUrlPolicy.from_entries(["http://"])))
    resolver.url = "http://localhost/m.gguf"
    try:
        with pytest.raises(ModelSourceError) as refused:
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()
    assert refused.value.variant == "ModelSourceNotAllowed"
    assert "resolves to the internal address" in refused.value.message
