"""Agent issues with Paddler 4.1's variants and ``{"model_path": ...}`` params, as a
``paddler agent --engine llama`` process reports them to a real balancer (read back
through the management API, as Paddler's admin panel and clients read them)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from tests.engine.projector import write_test_projector
from tests.harness import Balancer, Processes, wait_until
from tests.openai.conftest import openai_client

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A balancer and one llama agent with no model yet (each test pushes its state)."""
    processes = Processes(tmp_path_factory.mktemp("issues"))
    try:
        # The download tests point at a local server: open loopback (docs/security.md).
        loopback = ("--model-url-allow", "http://127.0.0.1/")
        balancer = processes.balancer(*loopback)
        cache = tmp_path_factory.mktemp("agent-cache")
        processes.agent(
            balancer, slots=1, name="llama", engine="llama", extra=("--model-cache-dir", str(cache), *loopback)
        )
        yield balancer
    finally:
        processes.close()


@pytest.fixture
async def file_server() -> AsyncIterator[str]:
    """A local HTTP server answering 404, 403 and 500 for model downloads."""
    statuses = {"missing.gguf": 404, "private.gguf": 403, "broken.gguf": 500}

    async def serve(request: web.Request) -> web.Response:
        return web.Response(status=statuses.get(request.match_info["name"], 404), text="no")

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _put(balancer: Balancer, state: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.put(balancer.management_url + "/api/v1/balancer_desired_state", json=state)
        assert response.status_code == 204, response.text


async def _issues(balancer: Balancer) -> list[Any]:
    async with httpx.AsyncClient() as http:
        agents = (await http.get(balancer.management_url + "/api/v1/agents")).json()["agents"]
    return [issue for agent in agents for issue in agent.get("issues", [])]


async def _wait_issue(balancer: Balancer, variant: str, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def reported() -> bool:
        for issue in await _issues(balancer):
            if isinstance(issue, dict) and variant in issue:
                found.update(issue[variant])
                return True
        return False

    await wait_until(reported, timeout=timeout, what=f"agent issue {variant}")
    return found


async def test_missing_local_model_is_reported_as_model_file_does_not_exist(pool: Balancer, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.gguf")
    await _put(pool, {"model": {"LocalToAgent": missing}})
    params = await _wait_issue(pool, "ModelFileDoesNotExist")
    assert params["model_path"] == missing


async def test_local_file_that_is_not_a_model_is_reported_as_model_cannot_be_loaded(
    pool: Balancer, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "notes.gguf"
    not_a_model.write_text("not a model")
    await _put(pool, {"model": {"LocalToAgent": str(not_a_model)}})
    params = await _wait_issue(pool, "ModelCannotBeLoaded")
    assert params["model_path"] == str(not_a_model)


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("missing.gguf", "ModelDoesNotExistAtUrl"),
        ("private.gguf", "DownloadServerDeniedAccess"),
        ("broken.gguf", "DownloadServerErrored"),
    ],
)
async def test_download_failure_is_reported_with_paddler_variant(
    pool: Balancer, file_server: str, name: str, variant: str
) -> None:
    url = f"{file_server}/{name}"
    await _put(pool, {"model": {"Url": {"url": url}}})
    params = await _wait_issue(pool, variant)
    assert params["model_path"] == url


async def test_unreachable_download_server_is_reported_as_download_server_is_unreachable(pool: Balancer) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/model.gguf"
    await _put(pool, {"model": {"Url": {"url": url}}})
    params = await _wait_issue(pool, "DownloadServerIsUnreachable")
    assert params["model_path"] == url


async def test_chat_template_that_does_not_compile_is_reported_when_applied_and_cleared_by_a_good_one(
    pool: Balancer, model_path: Path
) -> None:
    broken = "{% for message in messages %}{{ message.content }"
    await _put(
        pool,
        {
            "model": {"LocalToAgent": str(model_path)},
            "chat_template_override": {"content": broken},
            "use_chat_template_override": True,
        },
    )
    params = await _wait_issue(pool, "ChatTemplateDoesNotCompile", timeout=120)
    assert params["template_content"] == broken
    assert params["model_path"] == {"model_path": str(model_path)}
    assert params["error"]
    good = "{% for message in messages %}{{ message.content }}{% endfor %}"
    await _put(
        pool,
        {
            "model": {"LocalToAgent": str(model_path)},
            "chat_template_override": {"content": good},
            "use_chat_template_override": True,
        },
    )

    async def cleared() -> bool:
        return not any(isinstance(i, dict) and "ChatTemplateDoesNotCompile" in i for i in await _issues(pool))

    await wait_until(cleared, timeout=30, what="ChatTemplateDoesNotCompile cleared by a good template")


async def test_agent_asked_for_too_many_slots_registers_and_reports_slot_cannot_start(
    paddler: Processes, model_path: Path
) -> None:
    balancer = paddler.balancer()
    agent = paddler.agent(balancer, slots=65, name="greedy", engine="llama")
    params = await _wait_issue(balancer, "SlotCannotStart", timeout=30)
    assert params["slot_index"] == 64
    assert "64" in params["error"]
    await _put(balancer, {"model": {"LocalToAgent": str(model_path)}})

    async def refused() -> bool:
        async with httpx.AsyncClient() as http:
            agents = (await http.get(balancer.management_url + "/api/v1/agents")).json()["agents"]
        return [a["state_application_status"] for a in agents] == ["AttemptedAndNotAppliable"]

    await wait_until(refused, timeout=30, what="the state refused, the agent still registered")
    assert agent.alive


def _projector(kind: str, tmp_path: Path, model_path: Path) -> Path:
    """A ``multimodal_projection`` file that cannot be loaded, of the given kind."""
    if kind == "missing":
        return tmp_path / "mmproj-missing.gguf"
    if kind == "not_gguf":
        path = tmp_path / "mmproj-notes.gguf"
        path.write_text("these are notes, not a projector")
        return path
    if kind == "language_model":
        return model_path  # a GGUF, but a language model's, not a projector's
    whole = write_test_projector(tmp_path / "mmproj-whole.gguf")
    data = whole.read_bytes()
    path = tmp_path / "mmproj-truncated.gguf"
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


@pytest.mark.parametrize("kind", ["missing", "not_gguf", "language_model", "truncated"])
async def test_projector_that_cannot_be_loaded_is_an_agent_issue_and_text_is_still_served(
    pool: Balancer, model_path: Path, tmp_path: Path, kind: str
) -> None:
    projector = _projector(kind, tmp_path, model_path)
    await _put(
        pool,
        {"model": {"LocalToAgent": str(model_path)}, "multimodal_projection": {"LocalToAgent": str(projector)}},
    )
    found: list[dict[str, Any]] = []

    async def reported() -> bool:
        async with httpx.AsyncClient() as http:
            agents = (await http.get(pool.management_url + "/api/v1/agents")).json()["agents"]
        found[:] = [
            {**agent, "issue": issue["MultimodalProjectionCannotBeLoaded"]}
            for agent in agents
            for issue in agent.get("issues", [])
            if isinstance(issue, dict)
            and issue.get("MultimodalProjectionCannotBeLoaded", {}).get("model_path") == str(projector)
        ]
        return bool(found) and found[0]["slots_total"] == 1

    await wait_until(reported, timeout=120, what="MultimodalProjectionCannotBeLoaded for this projector")
    (agent,) = found
    assert agent["state_application_status"] == "AttemptedAndNotAppliable"
    assert agent["issue"]["message"].startswith("The multimodal projection cannot be loaded")
    async with openai_client(pool) as client:
        text = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
        assert text.choices[0].finish_reason in ("stop", "length")
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        with pytest.raises(openai.BadRequestError) as error:
            await client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}],  # type: ignore[list-item]
                max_tokens=4,
            )
    assert error.value.code == "multimodal_not_supported"
    assert "could not be loaded" in str(error.value)
