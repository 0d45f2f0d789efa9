"""HTTP client of a pool balancer's management API, as the operator uses it.

Reads agents, model groups (with their owners) and buffered requests, all as
JSON; writes a model group's desired state with the ``X-Paddler-Owner`` header. A balancer that cannot be
reached (no pod yet, DNS, timeout) raises :class:`BalancerUnreachable`; one that
answers with an error raises :class:`BalancerRejected`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from paddler_core.owner import OWNER_HEADER
from paddler_operator.balancer_views import AgentView, BalancerSnapshot


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


class BalancerClient:
    def __init__(self, settings: BalancerClientSettings | None = None) -> None:
        self.settings = settings or BalancerClientSettings()
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

    async def snapshot(self, base_url: str, group: str | None = None) -> BalancerSnapshot:
        """Agents, model groups and buffered requests (in all, and of ``group`` when given), read in parallel."""
        base = base_url.rstrip("/")
        # One request first: an unreachable balancer fails here, always with the same message
        # (conditions stay stable while it is down, so the status is not rewritten on every retry).
        auth = self._auth(base)
        agents = await self._request("GET", f"{base}/api/v1/agents", headers=auth)
        reads = [
            self._request("GET", f"{base}/api/v1/model_groups", headers=auth),
            self._request("GET", f"{base}/api/v1/buffered_requests", headers=auth),
        ]
        if group is not None:
            reads.append(
                self._request("GET", f"{base}/api/v1/buffered_requests?model_group={quote(group)}", headers=auth)
            )
        groups, buffered, *in_group = await asyncio.gather(*reads)
        rows = (groups or {}).get("model_groups", [])
        return BalancerSnapshot(
            agents=tuple(AgentView.from_json(a) for a in (agents or {}).get("agents", [])),
            buffered_total=_count(buffered),
            buffered_by_group={group: _count(in_group[0])} if group is not None else {},
            group_states={g["name"]: g.get("desired_state") or {} for g in rows},
            group_rollouts={g["name"]: g["rollout"] for g in rows if g.get("rollout") is not None},
            group_owners={g["name"]: g.get("owner") for g in rows},
        )

    async def put_desired_state(
        self, base_url: str, group: str, state: dict[str, Any], owner: str, max_unavailable: str | None = None
    ) -> None:
        """Store the group's state; the balancer rolls it over the group's agents,
        ``max_unavailable`` (a count or a percentage) of them at a time."""
        query = f"?max_unavailable={quote(max_unavailable)}" if max_unavailable is not None else ""
        await self._request(
            "PUT",
            f"{base_url.rstrip('/')}/api/v1/model_groups/{group}/desired_state{query}",
            json_body=state,
            headers=self._auth(base_url, {OWNER_HEADER: owner}),
        )

    async def rollout(self, base_url: str, group: str) -> dict[str, Any] | None:
        """The group's rollout (phase, applied/total, message), or None if it has had none."""
        try:
            body = await self._request("GET", f"{base_url.rstrip('/')}/api/v1/model_groups/{group}/rollout")
        except BalancerRejected as err:
            if err.status == 404:
                return None
            raise
        return body if isinstance(body, dict) else None

    async def delete_desired_state(self, base_url: str, group: str) -> bool:
        """True if the group had a state; False if the balancer did not know it."""
        try:
            await self._request(
                "DELETE",
                f"{base_url.rstrip('/')}/api/v1/model_groups/{group}/desired_state",
                headers=self._auth(base_url),
            )
            return True
        except BalancerRejected as err:
            if err.status == 404:
                return False
            raise
