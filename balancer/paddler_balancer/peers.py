"""The other balancer replicas of a pool, for counts that must cover the whole pool.

KEDA's metrics-api trigger reads one URL, and that URL reaches one replica; requests
buffered on the others would go unseen. ``GET /api/v1/buffered_requests?scope=pool``
therefore adds each peer's own count (``scope=replica``) to this replica's. Peers are
``--peer-management-addr`` entries, each a ``host:port`` whose host may resolve to
several addresses (a headless Service names every replica), resolved again on every
query so replicas that come and go are followed. A replica finds itself among the
answers by its instance id and counts itself once; a peer that does not answer within
:data:`PEER_TIMEOUT_S` counts 0 (and is logged).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import aiohttp

from paddler_core.addresses import is_ip_literal, join_host_port, split_host_port

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 1.0
"""Longest wait for one peer's answer (seconds), resolution included."""
BUFFERED_PATH = "/api/v1/buffered_requests"


class PeerOutcome(StrEnum):
    COUNTED = "Counted"
    SELF = "Self"
    """The address is this replica (the headless Service also names it)."""
    UNREACHABLE = "Unreachable"
    """No answer, an error status, or a body without a count: counts 0."""


@dataclass(frozen=True)
class PeerCount:
    addr: str
    outcome: PeerOutcome
    count: int = 0


async def resolve(addr: str) -> list[str]:
    """``host:port`` -> one ``host:port`` per address the host resolves to (an IP
    literal as is). Raises OSError or ValueError."""
    host, port = split_host_port(addr)
    if is_ip_literal(host):
        return [join_host_port(host, port)]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = dict.fromkeys(join_host_port(str(info[4][0]), port) for info in infos)
    return list(found)


async def _count(session: aiohttp.ClientSession, addr: str, params: dict[str, str], self_id: str) -> PeerCount:
    try:
        async with session.get(f"http://{addr}{BUFFERED_PATH}", params=params) as response:
            response.raise_for_status()
            body: Any = await response.json()
        count = body["buffered_requests_current"]
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"buffered_requests_current is {type(count).__name__}")
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as err:
        log.warning("peer unreachable addr=%s error=%s", addr, (str(err) or type(err).__name__)[:200])
        return PeerCount(addr, PeerOutcome.UNREACHABLE)
    if body.get("instance_id") == self_id:
        return PeerCount(addr, PeerOutcome.SELF)
    return PeerCount(addr, PeerOutcome.COUNTED, max(0, count))


async def _resolve_all(peers: tuple[str, ...]) -> list[str]:
    addresses: list[str] = []
    for peer in peers:
        try:
            async with asyncio.timeout(PEER_TIMEOUT_S):
                addresses += await resolve(peer)
        except (OSError, ValueError, TimeoutError) as err:
            log.warning("peer unreachable addr=%s error=%s", peer, (str(err) or type(err).__name__)[:200])
    return list(dict.fromkeys(addresses))


async def peer_buffered(
    session: aiohttp.ClientSession, peers: tuple[str, ...], model_group: str | None, self_id: str
) -> list[PeerCount]:
    """Each peer's own buffered count (of ``model_group``, or of every group)."""
    params = {"scope": "replica"}
    if model_group is not None:
        params["model_group"] = model_group
    addresses = await _resolve_all(peers)
    return list(await asyncio.gather(*(_count(session, addr, params, self_id) for addr in addresses)))


def peer_session(management_token: str | None) -> aiohttp.ClientSession:
    """The session peers are asked with: short timeout, the pool's management token."""
    headers = {"Authorization": f"Bearer {management_token}"} if management_token else {}
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S), headers=headers)
