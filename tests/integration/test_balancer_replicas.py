"""Several balancer replicas for one pool, through real processes: refusals routed
again, desired-state versions, graceful stop, which replica answered, and the
pool-wide buffered count KEDA reads from one replica.

Agents that refuse are real WebSocket clients speaking the agent protocol from the
test (``rogue_agent``); the others are ``paddler agent --engine simulated`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.harness import Balancer, Processes, wait_until
from tests.integration.test_hostile_peers import agents, generated_by, rogue_agent


async def names_are(balancer: Balancer, names: list[str]) -> bool:
    return sorted(a["name"] for a in await agents(balancer)) == sorted(names)


async def generate(balancer: Balancer, prompt: str = "hello", max_tokens: int = 4) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(
            f"{balancer.inference_url}/api/v1/continue_from_raw_prompt",
            json={"raw_prompt": prompt, "max_tokens": max_tokens},
        )


async def get(url: str, **params: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url, params=params)


async def buffered(balancer: Balancer, **params: str) -> dict[str, Any]:
    body: dict[str, Any] = (await get(f"{balancer.management_url}/api/v1/buffered_requests", **params)).json()
    return body


@contextlib.asynccontextmanager
async def waiting_requests(balancer: Balancer, count: int) -> AsyncIterator[None]:
    """``count`` requests held in the buffer of ``balancer`` (no agent) until the block ends."""
    tasks = [asyncio.create_task(generate(balancer, f"held {i}")) for i in range(count)]
    try:
        await wait_until(lambda: _buffered_is(balancer, count), what=f"{count} buffered on {balancer.management_addr}")
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _buffered_is(balancer: Balancer, count: int) -> bool:
    return bool((await buffered(balancer))["buffered_requests_current"] == count)


# ---- refusals ---------------------------------------------------------------------------------


async def test_a_request_refused_by_an_agent_is_served_by_another_and_the_client_never_sees_it(
    paddler: Processes,
) -> None:
    balancer = paddler.balancer()
    paddler.agent(balancer, slots=1, name="honest")
    await wait_until(lambda: names_are(balancer, ["honest"]), what="honest agent registered")

    def refuse(message: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"type": "refused", "request_id": message["request_id"], "reason": "NoFreeSlot"}]

    async with rogue_agent(balancer, slots=8, answer=refuse) as reply:  # most free slots: picked first
        response = await generate(balancer)
        metrics = (await get(f"{balancer.management_url}/metrics")).text
        listed = await agents(balancer)

    honest_id = next(a["id"] for a in listed if a["name"] == "honest")
    assert reply["type"] == "registered"
    assert response.status_code == 200
    assert generated_by(response) == honest_id
    assert 'paddler_agent_refusals_total{model_group="default",reason="NoFreeSlot"} 1.0' in metrics
    assert "request refused agent_id=rogue-id" in balancer.process.output()


# ---- versions ---------------------------------------------------------------------------------


async def group_version(balancer: Balancer, group: str) -> int:
    body = (await get(f"{balancer.management_url}/api/v1/model_groups")).json()
    return int(next(g["version"] for g in body["model_groups"] if g["name"] == group))


async def test_a_put_of_the_same_state_keeps_its_version_and_a_new_state_gets_a_newer_one(
    paddler: Processes,
) -> None:
    balancer = paddler.balancer()
    url = f"{balancer.management_url}/api/v1/model_groups/chat/desired_state"
    small = {"model": {"LocalToAgent": "/models/small.gguf"}}
    large = {"model": {"LocalToAgent": "/models/large.gguf"}}
    async with httpx.AsyncClient(timeout=10) as http:
        await http.put(url, json=small)
        first = await group_version(balancer, "chat")
        await http.put(url, json=small)
        again = await group_version(balancer, "chat")
        await http.put(url, json=large)
        newer = await group_version(balancer, "chat")
        rollout = (await http.get(f"{balancer.management_url}/api/v1/model_groups/chat/rollout")).json()
        native = (await http.get(f"{balancer.management_url}/api/v1/balancer_desired_state")).json()

    assert first > 0
    assert again == first
    assert newer > first
    assert rollout["version"] == newer
    assert "version" not in native  # Paddler's body stays as it is


async def test_a_deleted_group_stays_deleted_while_its_agent_still_holds_the_state(
    paddler: Processes, tmp_path: Path
) -> None:
    """A ModelDeployment deleted: the operator deletes its group on every replica while its
    agents are still connected (their pods are being collected). The replica must not adopt
    the group back from them (they hold the deleted version, not a newer one), also after a
    restart from its state file; a state set again later gets a newer version."""
    state_file = f"file://{tmp_path / 'state.json'}"
    balancer = paddler.balancer("--state-database", state_file)
    addr = balancer.management_addr
    paddler.agent(balancer, slots=1, name="chat-0", extra=("--model-group", "chat"))
    await put_chat(balancer, "/models/small.gguf")
    deleted_version = await group_version(balancer, "chat")

    async def agent_holds_it() -> bool:
        return any(a["model_path"] == "/models/small.gguf" for a in await agents(balancer))

    await wait_until(agent_holds_it, timeout=15, what="the agent holds the state")
    async with httpx.AsyncClient(timeout=10) as http:
        deleted = await http.delete(f"{balancer.management_url}/api/v1/model_groups/chat/desired_state")
    assert deleted.status_code == 204
    await assert_group_stays_absent(balancer, "chat")

    balancer.process.stop()
    balancer = paddler.balancer("--state-database", state_file, "--management-addr", addr)
    await wait_until(lambda: names_are(balancer, ["chat-0"]), timeout=15, what="the agent back on the restarted one")
    await assert_group_stays_absent(balancer, "chat")

    await put_chat(balancer, "/models/large.gguf")
    assert await group_version(balancer, "chat") > deleted_version


async def put_chat(balancer: Balancer, path: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{balancer.management_url}/api/v1/model_groups/chat/desired_state"
        assert (await http.put(url, json={"model": {"LocalToAgent": path}})).status_code == 204


async def assert_group_stays_absent(balancer: Balancer, group: str, window: float = 3.0) -> None:
    """A bounded observation (not a wait): over ``window`` seconds the agent pushes its
    status (every second) at least twice; the group must not come back from it."""
    deadline = asyncio.get_running_loop().time() + window
    while asyncio.get_running_loop().time() < deadline:
        body = (await get(f"{balancer.management_url}/api/v1/model_groups")).json()
        assert group not in [g["name"] for g in body["model_groups"]], body
        await asyncio.sleep(0.2)


async def test_pool_scope_reports_a_groups_busy_slots_whichever_replica_serves_them(paddler: Processes) -> None:
    """KEDA's second trigger: the slots a group's agents are busy with, pool-wide, from any one
    replica (each agent reports every replica's requests), so a group that streams with nothing
    buffered is not scaled in."""
    serving = paddler.balancer()
    asked = paddler.balancer()
    paddler.agent(serving, slots=2, name="slow", extra=("--simulated-tokens-per-second", "5"), replicas=(asked,))
    await wait_until(lambda: names_are(asked, ["slow"]), what="agent on the replica that is asked")
    await wait_until(lambda: names_are(serving, ["slow"]), what="agent on the replica that serves")
    streaming = asyncio.create_task(generate(serving, "busy", max_tokens=40))  # ~8 s
    try:

        async def busy_on_asked() -> bool:
            return bool((await buffered(asked, scope="pool", model_group="default"))["slots_processing"] == 1)

        await wait_until(busy_on_asked, what="the asked replica counting the other's busy slot")
        body = await buffered(asked, scope="pool", model_group="default")
        idle = await buffered(serving, scope="pool", model_group="nobody")
    finally:
        streaming.cancel()
        await asyncio.gather(streaming, return_exceptions=True)

    assert body["buffered_requests_current"] == 0
    assert idle["slots_processing"] == 0
    assert "slots_processing" not in await buffered(asked, scope="pool")  # only per model group


# ---- graceful stop ----------------------------------------------------------------------------


async def ready_status(balancer: Balancer) -> int:
    return (await get(f"{balancer.management_url}/ready")).status_code


async def test_sigterm_drains_a_streaming_and_a_buffered_request_and_exits_0(paddler: Processes) -> None:
    balancer = paddler.balancer("--drain-timeout", "30s", "--buffered-request-timeout", "30s")
    paddler.agent(balancer, slots=1, name="slow", extra=("--simulated-tokens-per-second", "10"))
    await wait_until(lambda: names_are(balancer, ["slow"]), what="agent registered")
    ready_before = await ready_status(balancer)

    streaming = asyncio.create_task(generate(balancer, "first", max_tokens=20))  # ~2 s
    await wait_until(lambda: _busy(balancer), what="first request streaming")
    waiting = asyncio.create_task(generate(balancer, "second", max_tokens=10))
    await wait_until(lambda: _buffered_is(balancer, 1), what="second request buffered")
    balancer.process.popen.send_signal(signal.SIGTERM)
    await wait_until(lambda: _ready_is(balancer, 503), what="readiness off while draining")
    first, second = await asyncio.gather(streaming, waiting)
    code = await asyncio.to_thread(balancer.process.popen.wait, 30)

    assert ready_before == 200
    assert (first.status_code, second.status_code) == (200, 200)
    assert "Done" in json.loads(second.text.splitlines()[-1])["Response"]["response"]["GeneratedToken"]
    assert code == 0
    output = balancer.process.output()
    assert "draining phase=stop_accepting in_flight=1 buffered=1" in output
    assert "drained after=" in output


async def _busy(balancer: Balancer) -> bool:
    return any(a["slots_in_flight"] for a in await agents(balancer))


async def _ready_is(balancer: Balancer, status: int) -> bool:
    return await ready_status(balancer) == status


# ---- which replica answered -------------------------------------------------------------------


async def test_every_response_and_the_admin_panel_name_the_replica(paddler: Processes) -> None:
    balancer = paddler.balancer("--replica-name", "balancer-7f9c", admin_panel=True)
    async with httpx.AsyncClient(timeout=10) as http:
        management = await http.get(f"{balancer.management_url}/api/v1/balancer")
        inference = await http.get(f"{balancer.inference_url}/health")
        config = (await http.get(f"{balancer.admin_panel_url}/config.json")).json()
        again = (await http.get(f"{balancer.management_url}/api/v1/balancer")).json()

    body = management.json()
    assert management.headers["X-Paddler-Balancer"] == "balancer-7f9c"
    assert inference.headers["X-Paddler-Balancer"] == "balancer-7f9c"
    assert body["replica_name"] == "balancer-7f9c"
    assert len(body["instance_id"]) >= 8
    assert again["instance_id"] == body["instance_id"]
    assert body["readiness"] == "Serving"
    assert config["replica_name"] == "balancer-7f9c"


# ---- pool-wide buffered count -----------------------------------------------------------------


async def test_pool_scope_adds_each_peer_replicas_buffered_requests(paddler: Processes) -> None:
    peer = paddler.balancer("--buffered-request-timeout", "60s")
    unreachable = "127.0.0.1:1"
    this = paddler.balancer(
        "--buffered-request-timeout",
        "60s",
        "--peer-management-addr",
        peer.management_addr,
        "--peer-management-addr",
        unreachable,
    )
    async with waiting_requests(peer, 2), waiting_requests(this, 1):
        pool = await buffered(this, scope="pool")
        pool_of_group = await buffered(this, scope="pool", model_group="default")
        own = await buffered(this, scope="replica")
        alone = await buffered(peer, scope="pool")
        paddler_body = await buffered(this)

    assert pool["buffered_requests_current"] == 3
    assert pool["unreachable"] == 1
    assert pool_of_group["buffered_requests_current"] == 3
    assert own["buffered_requests_current"] == 1
    assert alone["buffered_requests_current"] == 2  # no peers: its own count
    assert paddler_body == {"buffered_requests_current": 1}
    assert f"peer unreachable addr={unreachable}" in this.process.output()
