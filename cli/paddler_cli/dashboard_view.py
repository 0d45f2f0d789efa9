"""What ``paddler dashboard`` shows, and where it reads it (no Textual here).

It reads the management API: the agents and buffered-request SSE streams
(``/api/v1/agents/stream``, ``/api/v1/buffered_requests/stream``, pushed on every
change) and the model groups (``/api/v1/model_groups``, polled: it has no stream).
When the balancer cannot be reached, :class:`DashboardState` says so and keeps the last
data marked stale while :class:`Feed` reconnects with backoff.

The pieces that decide what is shown (:class:`DashboardState`, :func:`slot_bar`,
:func:`agent_rows`) are pure; :mod:`paddler_cli.dashboard_app` draws them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from paddler_core.management_wire import AgentSnapshot, AgentsSnapshot
from paddler_core.protocol import AgentIssue, AgentStatus

log = logging.getLogger(__name__)

SORT_ORDERS = ("name", "group", "busy", "issues")
BAR_WIDTH = 16
GROUPS_POLL_S = 2.0
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 5.0
SSE_READ_TIMEOUT_S = 40.0
"""The balancer writes a keep-alive every 15 s; silence this long means a dead link."""


# ---- what is shown (pure) ----------------------------------------------------------------------


BUSY, FREE = "\u2588", "\u2591"


def slot_bar(busy: int, total: int, width: int = BAR_WIDTH) -> str:
    """``████░░░░ 2/4``: busy slots of total, as a fixed-width bar."""
    if total <= 0:
        return " " * width + " 0/0"
    filled = min(width, round(width * min(busy, total) / total))
    return BUSY * filled + FREE * (width - filled) + f" {busy}/{total}"


def _issue_text(issue: AgentIssue) -> str:
    message = issue.params.get("message")
    return f"{issue.variant}: {message}" if message else issue.variant


def _download_text(status: AgentStatus) -> str:
    """``model.gguf 42%`` while the agent downloads (no percent when the size is unknown)."""
    if not status.download_filename:
        return ""
    total = status.download_total
    percent = f" {100 * status.download_current // total}%" if total else ""
    return f"{status.download_filename}{percent}"


@dataclass
class AgentView:
    id: str
    name: str
    group: str
    slots_total: int
    busy: int
    """The balancer's own in-flight requests on this agent."""
    model: str
    status: str
    issues: list[str]
    download: str

    @classmethod
    def of(cls, agent: AgentSnapshot) -> AgentView:
        status = agent.status
        return cls(
            id=agent.id,
            name=agent.name or agent.id[:8],
            group=agent.model_group,
            slots_total=status.slots_total,
            busy=agent.slots_in_flight,
            model=status.model_path or "-",
            status=status.state_application_status.value,
            issues=[_issue_text(i) for i in status.issues],
            download=_download_text(status),
        )


@dataclass
class GroupView:
    name: str
    model: str
    """The group's desired model, as the balancer's JSON."""


@dataclass
class DashboardState:
    """Everything on screen, fed by the streams."""

    address: str
    agents: list[AgentView] = field(default_factory=list)
    buffered: int = 0
    groups: list[GroupView] = field(default_factory=list)
    connected: bool = False
    error: str | None = None
    """Why the last attempt failed; None before the first failure."""
    updated: datetime | None = None
    sort: str = SORT_ORDERS[0]

    def apply_agents(self, body: dict[str, Any]) -> None:
        self.agents = [AgentView.of(a) for a in AgentsSnapshot.model_validate(body).agents]
        self._fresh()

    def apply_buffered(self, body: dict[str, Any]) -> None:
        self.buffered = int(body.get("buffered_requests_current") or 0)
        self._fresh()

    def apply_groups(self, body: dict[str, Any]) -> None:
        groups = []
        for g in body.get("model_groups", []):
            model = g.get("desired_state", {}).get("model", "None")
            label = model if isinstance(model, str) else json.dumps(model, separators=(",", ":"))
            groups.append(GroupView(name=str(g.get("name")), model=label))
        self.groups = groups
        self._fresh()

    def _fresh(self) -> None:
        self.connected = True
        self.error = None
        self.updated = datetime.now(UTC)

    def lost(self, error: str) -> None:
        self.connected = False
        self.error = error

    def next_sort(self) -> str:
        self.sort = SORT_ORDERS[(SORT_ORDERS.index(self.sort) + 1) % len(SORT_ORDERS)]
        return self.sort

    def sorted_agents(self) -> list[AgentView]:
        keys: dict[str, Callable[[AgentView], Any]] = {
            "name": lambda a: (a.name, a.id),
            "group": lambda a: (a.group, a.name, a.id),
            "busy": lambda a: (-a.busy, -a.slots_total, a.name),
            "issues": lambda a: (-len(a.issues), a.name),
        }
        return sorted(self.agents, key=keys[self.sort])

    def banner(self) -> str:
        if not self.connected and self.error is None:
            return f"Connecting to the balancer at {self.address}..."
        if not self.connected:
            stale = " Showing the last data received." if self.updated else ""
            return f"Balancer at {self.address} unreachable ({self.error}); retrying.{stale}"
        at = self.updated.strftime("%H:%M:%S") if self.updated else "-"
        return f"Balancer {self.address}: live, updated {at} UTC"

    def totals(self) -> str:
        total = sum(a.slots_total for a in self.agents)
        busy = sum(a.busy for a in self.agents)
        issues = sum(len(a.issues) for a in self.agents)
        return (
            f"agents {len(self.agents)}   slots {slot_bar(busy, total, 24)}   "
            f"buffered requests {self.buffered}   issues {issues}   sort: {self.sort} (s)"
        )


AGENT_COLUMNS = ("name", "group", "slots (busy/total)", "status", "issues", "model")


def agent_rows(state: DashboardState) -> list[tuple[str, tuple[str, ...]]]:
    """(row key, cells) of the agents table, in the current sort order."""
    rows: list[tuple[str, tuple[str, ...]]] = []
    for a in state.sorted_agents():
        status = a.status + (f" (downloading {a.download})" if a.download else "")
        rows.append(
            (a.id, (a.name, a.group, slot_bar(a.busy, a.slots_total), status, str(len(a.issues)), _short(a.model)))
        )
    return rows


GROUP_COLUMNS = ("model group", "agents", "slots (in flight/total)", "desired model")


def group_rows(state: DashboardState) -> list[tuple[str, ...]]:
    """One row per model group: its agents and slots from the (live) agents stream,
    its desired model from the (polled) model groups."""
    models = {g.name: g.model for g in state.groups}
    names = sorted({*models, *(a.group for a in state.agents)})
    rows: list[tuple[str, ...]] = []
    for name in names:
        members = [a for a in state.agents if a.group == name]
        busy, total = sum(a.busy for a in members), sum(a.slots_total for a in members)
        rows.append((name, str(len(members)), slot_bar(busy, total, 10), _short(models.get(name, "-"), 60)))
    return rows


def agent_detail(state: DashboardState, agent_id: str | None) -> str:
    agent = next((a for a in state.agents if a.id == agent_id), None)
    if agent is None:
        return "No agent selected (arrows move the selection)."
    lines = [
        f"{agent.name}  id {agent.id}  group {agent.group}",
        f"slots {slot_bar(agent.busy, agent.slots_total)}  status {agent.status or '-'}",
        f"model {agent.model}",
    ]
    if agent.download:
        lines.append(f"downloading {agent.download}")
    lines += [f"issue: {text}" for text in agent.issues] or ["no issues"]
    return "\n".join(lines)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


# ---- the management API (I/O) ----------------------------------------------------------------


async def sse_bodies(session: aiohttp.ClientSession, url: str) -> AsyncIterator[dict[str, Any]]:
    """The JSON body of every ``data:`` event of one SSE stream; raises on a broken link."""
    timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=SSE_READ_TIMEOUT_S)
    async with session.get(url, timeout=timeout) as response:
        if response.status != 200:
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=f"HTTP {response.status} from {url}"
            )
        async for raw in response.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if line.startswith("data:"):
                decoded = json.loads(line[5:])
                if isinstance(decoded, dict):
                    yield decoded
    raise ConnectionResetError(f"the balancer closed the stream {url}")


class Feed:
    """Keeps ``state`` in step with a balancer; calls ``changed`` after each update."""

    def __init__(self, state: DashboardState, changed: Callable[[], None]) -> None:
        self.state = state
        self.changed = changed
        self.base = f"http://{state.address}"

    async def run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        async with aiohttp.ClientSession() as session:
            while True:
                error: BaseException | None = None
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(self._follow(session, "/api/v1/agents/stream", self.state.apply_agents))
                        group.create_task(
                            self._follow(session, "/api/v1/buffered_requests/stream", self.state.apply_buffered)
                        )
                        group.create_task(self._poll_groups(session))
                except* (aiohttp.ClientError, OSError, TimeoutError, ValueError) as errors:
                    error = errors.exceptions[0]
                if error is None:
                    continue
                if self.state.connected:  # it had worked since the last failure
                    backoff = BACKOFF_INITIAL_S
                self.state.lost(_describe(error))
                self.changed()
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _follow(self, session: aiohttp.ClientSession, path: str, apply: Callable[[dict[str, Any]], None]) -> None:
        async for body in sse_bodies(session, self.base + path):
            apply(body)
            self.changed()

    async def _poll_groups(self, session: aiohttp.ClientSession) -> None:
        while True:
            async with session.get(self.base + "/api/v1/model_groups", timeout=aiohttp.ClientTimeout(5)) as response:
                response.raise_for_status()
                self.state.apply_groups(await response.json())
            self.changed()
            await asyncio.sleep(GROUPS_POLL_S)


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect: {error.os_error.strerror or error.os_error}"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
