"""HTTP client of a pool's balancers' management APIs, as the operator uses it.

A pool may run several balancer replicas, all active, with no store between them: the
operator writes to every one and reads from every one. The host of a pool's management
URL (a headless Service) is resolved with the event loop's ``getaddrinfo`` to all its
addresses, one replica each (:func:`resolve_replicas`; an IP literal or ``localhost``
is one replica). Reads are combined into one pool-wide
:class:`~paddler_operator.balancer_views.BalancerSnapshot` by the pure
:func:`~paddler_operator.balancer_views.combine_snapshots`; writes (a model group's
desired state with the ``X-Paddler-Owner`` header) go to every replica (a PUT of the same
state keeps the balancer's version, so repeating it is safe).

A pool none of whose replicas can be reached (no pod yet, DNS, timeout) raises
:class:`BalancerUnreachable`; one that answers with an error raises
:class:`BalancerRejected`. Some replicas unreachable is a partial pass, not an error: the
snapshot's ``unreachable`` and the writes' return values say which.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from paddler_core.addresses import is_ip_literal, join_host_port
from paddler_core.owner import OWNER_HEADER
from paddler_operator.balancer_views import (
    AgentView,
    BalancerSnapshot,
    ReplicaRead,
    RolloutView,
    combine_rollouts,
    combine_snapshots,
)

T = TypeVar("T")

Resolver = Callable[[str], Awaitable[tuple[str, ...]]]
"""A pool's management URL -> the management URL of each of its balancer replicas."""


class BalancerUnreachable(Exception):
    """Connection refused, DNS failure or timeout."""


class BalancerRejected(Exception):
    """The balancer answered with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass(frozen=True)
class BalancerClientSettings:
    request_timeout: float = 3.0
    """Seconds for one management API request, connect included."""


def _count(body: Any) -> int:
    """``{"buffered_requests_current": n}`` of ``GET /api/v1/buffered_requests``."""
    return int((body or {}).get("buffered_requests_current", 0))


async def resolve_replicas(base_url: str) -> tuple[str, ...]:
    """The management URL of every balancer replica behind ``base_url``: its host resolved to all
    its addresses (sorted, so passes compare). An IP literal or ``localhost`` is one replica, itself.
    A name that does not resolve raises :class:`BalancerUnreachable`."""
    base = base_url.rstrip("/")
    parts = urlsplit(base)
    host = parts.hostname
    if host is None or host == "localhost" or is_ip_literal(host):
        return (base,)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as err:  # socket.gaierror: no such name, or no address yet (no balancer pod)
        raise BalancerUnreachable(f"resolve {host}: {err}") from err
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise BalancerUnreachable(f"resolve {host}: no address")
    return tuple(urlunsplit((parts.scheme, join_host_port(a, port), parts.path, "", "")) for a in addresses)


def _first_failure(results: Sequence[tuple[str, object]]) -> Exception | None:
    """The exception to raise when every replica failed (the first by URL), else None."""
    if not results or not all(isinstance(r, Exception) for _, r in results):
        return None
    first = results[0][1]
    return first if isinstance(first, Exception) else None


def _raise_failures(results: Sequence[tuple[str, object]]) -> None:
    """A write or read over the replicas fails when one replica refused it (its answer
    stands for all: they hold the same state), or when none could be reached."""
    rejected = [r for _, r in results if isinstance(r, BalancerRejected)]
    if rejected:
        raise rejected[0]
    failure = _first_failure(results)
    if failure is not None:
        raise failure


class BalancerClient:
    def __init__(self, settings: BalancerClientSettings | None = None, resolver: Resolver | None = None) -> None:
        self.settings = settings or BalancerClientSettings()
        self.resolver: Resolver = resolver or resolve_replicas
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, str] = {}

    def use_token(self, base_url: str, token: str | None) -> None:
        """Send ``token`` (the pool's management token) to the balancer at ``base_url``."""
        base = base_url.rstrip("/")
        if token:
            self._tokens[base] = token
        else:
            self._tokens.pop(base, None)

    def _auth(self, base_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        token = self._tokens.get(base_url.rstrip("/"))
        headers = dict(extra or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, url: str, *, json_body: Any = None, headers: dict[str, str] | None = None, text: bool = False
    ) -> Any:
        try:
            async with self._http().request(method, url, json=json_body, headers=headers) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise BalancerRejected(resp.status, body[:500])
                if text:
                    return body
                return await resp.json(content_type=None) if body else None
        except (aiohttp.ClientConnectionError, aiohttp.InvalidURL, TimeoutError) as err:
            raise BalancerUnreachable(f"{method} {url}: {type(err).__name__}: {err}") from err
        except aiohttp.ClientResponseError as err:
            raise BalancerRejected(err.status, err.message) from err

    async def replicas(self, base_url: str) -> tuple[str, ...]:
        """The management URL of each balancer replica of the pool at ``base_url``."""
        return await self.resolver(base_url)

    async def _each(
        self, replicas: Sequence[str], call: Callable[[str], Awaitable[T]]
    ) -> list[tuple[str, T | Exception]]:
        """``call`` on every replica at once; (replica, result or the BalancerUnreachable/BalancerRejected it
        raised), in replica order. Anything else (a bug) propagates."""
        results = await asyncio.gather(*(call(r) for r in replicas), return_exceptions=True)
        out: list[tuple[str, T | Exception]] = []
        for replica, result in zip(replicas, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, BalancerUnreachable | BalancerRejected):
                raise result
            out.append((replica, result))
        return out

    async def _replica_snapshot(self, replica: str, auth: dict[str, str], group: str | None) -> BalancerSnapshot:
        # One request first: an unreachable balancer fails here, always with the same message
        # (conditions stay stable while it is down, so the status is not rewritten on every retry).
        agents = await self._request("GET", f"{replica}/api/v1/agents", headers=auth)
        reads = [
            self._request("GET", f"{replica}/api/v1/model_groups", headers=auth),
            self._request("GET", f"{replica}/api/v1/buffered_requests", headers=auth),
        ]
        if group is not None:
            reads.append(
                self._request("GET", f"{replica}/api/v1/buffered_requests?model_group={quote(group)}", headers=auth)
            )
        groups, buffered, *in_group = await asyncio.gather(*reads)
        rows = (groups or {}).get("model_groups", [])
        return BalancerSnapshot(
            agents=AgentView.all_of(agents),
            buffered_total=_count(buffered),
            buffered_by_group={group: _count(in_group[0])} if group is not None else {},
            group_states={g["name"]: g.get("desired_state") or {} for g in rows},
            group_rollouts={g["name"]: r for g in rows if (r := RolloutView.parse(g.get("rollout"))) is not None},
            group_owners={g["name"]: g.get("owner") for g in rows},
        )

    async def snapshot(self, base_url: str, group: str | None = None) -> BalancerSnapshot:
        """Agents, model groups and buffered requests (in all, and of ``group`` when given) of every
        replica, read in parallel and combined (:func:`combine_snapshots`). Raises only when no replica
        answered; the snapshot's ``unreachable`` names the replicas that did not."""
        base = base_url.rstrip("/")
        auth = self._auth(base)
        results = await self._each(await self.replicas(base), lambda r: self._replica_snapshot(r, auth, group))
        failure = _first_failure(results)
        if failure is not None:
            raise failure
        reads = [
            ReplicaRead(url, None, str(result)) if isinstance(result, Exception) else ReplicaRead(url, result)
            for url, result in results
        ]
        combined = combine_snapshots(reads)
        assert combined is not None  # at least one replica answered
        return combined

    async def put_desired_state(
        self, base_url: str, group: str, state: dict[str, Any], owner: str, max_unavailable: str | None = None
    ) -> dict[str, str]:
        """Store the group's state on every replica; the balancers roll it over the group's agents,
        ``max_unavailable`` (a count or a percentage) of them at a time. Returns the replicas that
        could not be reached (URL -> error; empty: all have it). Raises when a replica refuses the
        state, or when none could be reached."""
        base = base_url.rstrip("/")
        query = f"?max_unavailable={quote(max_unavailable)}" if max_unavailable is not None else ""
        headers = self._auth(base, {OWNER_HEADER: owner})

        async def put(replica: str) -> None:
            path = f"{replica}/api/v1/model_groups/{quote(group)}/desired_state{query}"
            await self._request("PUT", path, json_body=state, headers=headers)

        results = await self._each(await self.replicas(base), put)
        _raise_failures(results)
        return {url: str(r) for url, r in results if isinstance(r, Exception)}

    async def rollout(self, base_url: str, group: str) -> RolloutView | None:
        """The group's rollout (phase, applied/total, message) over the replicas, as far as the least
        advanced one (:func:`combine_rollouts`), or None if none has had one."""
        base = base_url.rstrip("/")
        auth = self._auth(base)

        async def read(replica: str) -> RolloutView | None:
            try:
                body = await self._request("GET", f"{replica}/api/v1/model_groups/{quote(group)}/rollout", headers=auth)
            except BalancerRejected as err:
                if err.status == 404:
                    return None
                raise
            return RolloutView.parse(body)

        results = await self._each(await self.replicas(base), read)
        _raise_failures(results)
        return combine_rollouts([r for _, r in results if isinstance(r, RolloutView)])

    async def delete_desired_state(self, base_url: str, group: str) -> bool:
        """Drop the group's state from every replica. True if a replica had it; False if none that
        answered knew it. A replica that cannot be reached keeps it until a later pass."""
        base = base_url.rstrip("/")
        auth = self._auth(base)

        async def delete(replica: str) -> bool:
            try:
                await self._request(
                    "DELETE", f"{replica}/api/v1/model_groups/{quote(group)}/desired_state", headers=auth
                )
            except BalancerRejected as err:
                if err.status == 404:
                    return False
                raise
            return True

        results = await self._each(await self.replicas(base), delete)
        _raise_failures(results)
        return any(r is True for _, r in results)
