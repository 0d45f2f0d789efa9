"""Counting the pool's buffered requests across balancer replicas: each peer's own
count over real HTTP, itself skipped by instance id, an unreachable peer counted 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from paddler_balancer.peers import PeerCount, PeerOutcome, peer_buffered, peer_session, resolve


def replica(instance_id: str, count: int) -> web.Application:
    async def buffered(request: web.Request) -> web.Response:
        assert request.query["scope"] == "replica"
        return web.json_response({"buffered_requests_current": count, "instance_id": instance_id})

    app = web.Application()
    app.router.add_get("/api/v1/buffered_requests", buffered)
    return app


@pytest.fixture
async def replicas() -> AsyncIterator[list[str]]:
    runners = []
    addrs = []
    for instance_id, count in (("me", 5), ("other", 2)):
        runner = web.AppRunner(replica(instance_id, count))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        addrs.append(f"127.0.0.1:{runner.addresses[0][1]}")
    yield addrs
    for runner in runners:
        await runner.cleanup()


async def test_peers_count_once_each_and_skip_this_replica(replicas: list[str]) -> None:
    me, other = replicas
    async with peer_session(None) as session:
        counts = await peer_buffered(session, (me, other, other, "127.0.0.1:1"), "default", "me")

    assert sorted(counts, key=lambda c: c.addr) == sorted(
        [
            PeerCount(me, PeerOutcome.SELF),
            PeerCount(other, PeerOutcome.COUNTED, 2),
            PeerCount("127.0.0.1:1", PeerOutcome.UNREACHABLE),
        ],
        key=lambda c: c.addr,
    )


async def test_a_name_resolves_to_every_address_and_an_ip_stays_as_it_is() -> None:
    assert await resolve("10.0.0.7:8060") == ["10.0.0.7:8060"]
    assert "127.0.0.1:8060" in await resolve("localhost:8060")
