"""BalancerClient against a pool of several balancer replicas: real ``paddler balancer``
processes on 127.0.0.1, one pool URL standing for all of them (a fixed resolver plays the
headless Service's DNS), and the resolver itself over a fake ``getaddrinfo``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from paddler_operator.balancer_client import (
    BalancerClient,
    BalancerClientSettings,
    BalancerUnreachable,
    resolve_replicas,
)
from tests.harness import Balancer, Processes
from tests.harness import wait_until as async_wait_until

TOKEN = "pool-management-token"
POOL_URL = "http://p-management-peers.ns.svc:8060"
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing listens
STATE = {"model": {"LocalToAgent": "/m.gguf"}}


def replicas_client(*urls: str) -> BalancerClient:
    async def resolve(base_url: str) -> tuple[str, ...]:
        return urls

    client = BalancerClient(BalancerClientSettings(request_timeout=2.0), resolver=resolve)
    client.use_token(POOL_URL, TOKEN)
    return client


@pytest.fixture
async def pair(paddler: Processes) -> AsyncIterator[tuple[Balancer, Balancer, BalancerClient]]:
    first = paddler.balancer("--management-token", TOKEN, "--buffered-request-timeout", "20s")
    second = paddler.balancer("--management-token", TOKEN, "--buffered-request-timeout", "20s")
    client = replicas_client(first.management_url, second.management_url)
    yield first, second, client
    await client.close()


async def _groups(balancer: Balancer) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{balancer.management_url}/api/v1/model_groups", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as resp,
    ):
        body: dict[str, Any] = await resp.json()
    return {g["name"]: g for g in body["model_groups"]}


async def test_desired_state_put_reaches_every_replica(pair: tuple[Balancer, Balancer, BalancerClient]) -> None:
    first, second, client = pair
    missed = await client.put_desired_state(POOL_URL, "m", STATE, "ModelDeployment/ns/m")
    assert missed == {}
    assert [("m" in await _groups(b)) for b in (first, second)] == [True, True]


async def test_rollout_is_read_with_the_management_token(pair: tuple[Balancer, Balancer, BalancerClient]) -> None:
    """It was read without one: a pool with a token answered 401 and the operator reported
    DesiredStateRejected for a state that had been stored."""
    _, _, client = pair
    await client.put_desired_state(POOL_URL, "m", STATE, "ModelDeployment/ns/m")
    rollout = await client.rollout(POOL_URL, "m")
    assert rollout is None or rollout.phase in ("Progressing", "Complete", "Failed")


async def test_snapshot_sums_buffered_requests_over_replicas(
    pair: tuple[Balancer, Balancer, BalancerClient],
) -> None:
    first, second, client = pair
    await client.put_desired_state(POOL_URL, "m", STATE, "ModelDeployment/ns/m")
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    session = client._http()
    pending = [
        asyncio.create_task(
            session.post(f"{b.inference_url}/v1/chat/completions", json=chat, timeout=aiohttp.ClientTimeout(30))
        )
        for b in (first, second)
    ]
    try:

        async def both_buffered() -> bool:
            return (await client.snapshot(POOL_URL, "m")).buffered_by_group == {"m": 2}

        await async_wait_until(both_buffered, timeout=10, what="one request buffered on each replica, summed")
        snap = await client.snapshot(POOL_URL, "m")
        assert (snap.buffered_total, snap.partial, len(snap.replicas)) == (2, None, 2)
    finally:
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_an_unreachable_replica_makes_the_pass_partial(paddler: Processes) -> None:
    balancer = paddler.balancer("--management-token", TOKEN)
    client = replicas_client(balancer.management_url, UNREACHABLE)
    try:
        missed = await client.put_desired_state(POOL_URL, "m", STATE, "ModelDeployment/ns/m")
        snap = await client.snapshot(POOL_URL)
        assert list(missed) == [UNREACHABLE]
        assert (snap.replicas, list(snap.unreachable)) == ((balancer.management_url,), [UNREACHABLE])
        assert "m" in snap.group_states
        assert snap.partial is not None
        assert snap.partial.startswith("1 of 2 balancer replicas unreachable: http://127.0.0.1:9")
    finally:
        await client.close()


async def test_no_replica_reachable_raises_unreachable() -> None:
    client = replicas_client(UNREACHABLE, "http://127.0.0.1:7")
    try:
        with pytest.raises(BalancerUnreachable):
            await client.snapshot(POOL_URL)
        with pytest.raises(BalancerUnreachable):
            await client.put_desired_state(POOL_URL, "m", STATE, "me")
    finally:
        await client.close()


async def test_delete_removes_the_group_from_every_replica(pair: tuple[Balancer, Balancer, BalancerClient]) -> None:
    first, second, client = pair
    await client.put_desired_state(POOL_URL, "m", STATE, "ModelDeployment/ns/m")
    assert await client.delete_desired_state(POOL_URL, "m") is True
    assert [("m" in await _groups(b)) for b in (first, second)] == [False, False]
    assert await client.delete_desired_state(POOL_URL, "m") is False


# --- resolving a pool's URL to its replicas ---------------------------------------------


def _info(address: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr: tuple[Any, ...] = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
    return (family, socket.SOCK_STREAM, 6, "", sockaddr)


@pytest.mark.parametrize(
    ("url", "addresses", "replicas"),
    [
        ("http://127.0.0.1:4321", None, ("http://127.0.0.1:4321",)),
        ("http://127.0.0.1:4321/", None, ("http://127.0.0.1:4321",)),
        ("http://[::1]:4321", None, ("http://[::1]:4321",)),
        ("http://localhost:4321", None, ("http://localhost:4321",)),
        ("http://p-management-peers.ns.svc:8060", ["10.0.0.7"], ("http://10.0.0.7:8060",)),
        (
            "http://p-management-peers.ns.svc:8060",
            ["10.0.0.9", "10.0.0.7", "10.0.0.9"],
            ("http://10.0.0.7:8060", "http://10.0.0.9:8060"),
        ),
        ("http://peers.ns.svc:8060", ["fd00::5"], ("http://[fd00::5]:8060",)),
        ("http://peers.ns.svc", ["10.0.0.7"], ("http://10.0.0.7:80",)),
    ],
)
async def test_resolve_replicas(
    monkeypatch: pytest.MonkeyPatch, url: str, addresses: list[str] | None, replicas: tuple[str, ...]
) -> None:
    asked: list[tuple[str, int]] = []

    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        asked.append((host, port))
        return [_info(a, port) for a in addresses or []]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    assert await resolve_replicas(url) == replicas
    assert bool(asked) == (addresses is not None)


async def test_a_name_that_does_not_resolve_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def getaddrinfo(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    with pytest.raises(BalancerUnreachable, match=r"resolve p-management-peers\.ns\.svc"):
        await resolve_replicas(POOL_URL)
