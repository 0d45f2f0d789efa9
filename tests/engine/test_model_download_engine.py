"""A model named by URL, downloaded for real by a ``paddler agent --engine llama`` process:
the GGUF served over HTTP on loopback, stored in the agent's cache, loaded and answering
through a real balancer (the failures of a download are in test_agent_issues.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from paddler_agent.model_download import url_cache_path
from tests.harness import Balancer, Processes, wait_until
from tests.openai.conftest import openai_client

pytestmark = pytest.mark.engine


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[Balancer, Path]]:
    """A balancer and one llama agent with an empty model cache (loopback URLs opened)."""
    processes = Processes(tmp_path)
    try:
        loopback = ("--model-url-allow", "http://127.0.0.1/")
        balancer = processes.balancer("--buffered-request-timeout", "120s", *loopback)
        cache = tmp_path / "agent-cache"
        processes.agent(
            balancer, slots=1, name="llama", engine="llama", extra=("--model-cache-dir", str(cache), *loopback)
        )
        yield balancer, cache
    finally:
        processes.close()


@pytest.fixture
async def model_server(model_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    """The SmolLM2 GGUF over HTTP; the second item lists the methods of the requests served."""
    served: list[str] = []

    async def gguf(request: web.Request) -> web.StreamResponse:
        served.append(request.method)
        return web.FileResponse(model_path)

    app = web.Application()
    app.router.add_get("/models/smollm2.gguf", gguf)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/models/smollm2.gguf", served
    finally:
        await runner.cleanup()


async def test_agent_downloads_a_model_by_url_caches_it_and_serves_it(
    pool: tuple[Balancer, Path], model_server: tuple[str, list[str]], model_path: Path
) -> None:
    balancer, cache = pool
    url, served = model_server
    async with httpx.AsyncClient(base_url=balancer.management_url, timeout=30) as http:
        response = await http.put("/api/v1/balancer_desired_state", json={"model": {"Url": {"url": url}}})
        assert response.status_code == 204, response.text

        async def serving() -> bool:
            agents = (await http.get("/api/v1/agents")).json()["agents"]
            return bool(agents) and agents[0]["state_application_status"] == "Applied" and agents[0]["slots_total"] == 1

        await wait_until(serving, timeout=180, interval=0.3, what="agent serving the downloaded model")

    stored = url_cache_path(url, cache)
    assert stored.is_file(), sorted(str(p) for p in cache.rglob("*"))
    assert _sha256(stored) == _sha256(model_path)  # the whole file, byte for byte
    assert not list(stored.parent.glob("*.part"))  # the partial file was renamed into place
    assert served.count("GET") == 1

    async with openai_client(balancer) as client:
        reply = await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
        )
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
