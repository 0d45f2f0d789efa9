"""The agent's links: one WebSocket to each balancer replica.

An agent serves every replica of its pool. ``--management-addr`` may be given more
than once, and a name may stand for several replicas (a Kubernetes headless Service
resolves to one address per pod): :class:`LinkSet` resolves the names again every
``resolve_interval`` seconds and keeps one :class:`BalancerLink` per address. A new
address gets a link; an address gone from DNS loses its link (its requests stop, as on
a lost connection); a name that fails to resolve keeps the links it has.

Each link dials ``/api/v1/agent_socket/{agent_id}``, registers (the same agent id and
secret on every replica), reconnects with its own jittered backoff, and has its own
outbox that one writer task flushes: everything emitted in one event-loop turn (e.g.
the tokens of one decode step) leaves as one frame. What a link receives goes to its
:class:`LinkHost` (the runtime), which answers each request on the link it came in on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from paddler_core.addresses import is_ip_literal, join_host_port, split_host_port
from paddler_core.protocol import AGENT_SOCKET_PATH, MAX_FRAME_BYTES, STATUS_INTERVAL_S, batch_frames, encode_message

log = logging.getLogger(__name__)

AGENT_SECRET_HEADER = "X-Paddler-Agent-Secret"
"""Must match paddler_balancer.agent_claims (the agent does not import the balancer)."""
BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 5.0
HANDSHAKE_TIMEOUT_S = 10.0
"""Seconds to wait for ``registered`` after ``register``."""
CONNECT_TIMEOUT_S = 30.0
"""Seconds a WebSocket handshake may take (an address that went away hangs otherwise)."""
RESOLVE_TIMEOUT_S = 10.0
"""Seconds one name lookup may take before it counts as failed."""
RESOLVE_WARNING_INTERVAL_S = 60.0
"""A name that keeps failing to resolve is logged at most this often (seconds)."""
CLOSE_FLUSH_TIMEOUT_S = 2.0
"""Seconds a link that is closed may take to send what its outbox still holds."""


class RejectedError(Exception):
    """The balancer answered ``register`` with ``rejected`` (or with nothing it knows)."""


class LinkHost(Protocol):
    """What a link needs from the agent runtime. Called on the event loop thread."""

    def register_message(self) -> str:
        """The ``register`` message (with a fresh status snapshot), encoded."""

    def status_message(self) -> dict[str, Any]:
        """A ``status`` message with a fresh snapshot (the version grows across links)."""

    def handle(self, link: BalancerLink, message: Any) -> None:
        """One message received on ``link``."""

    def link_lost(self, link: BalancerLink) -> int:
        """``link`` is down: stop its requests; returns how many were stopped."""


@dataclass(frozen=True)
class Credentials:
    agent_id: str
    secret: str
    """Claims ``agent_id`` at every replica: nobody else can register under it."""
    management_token: str | None = None
    """Sent as ``Authorization: Bearer`` when the balancers require one."""


# ---- pure plans ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkChanges:
    added: tuple[str, ...]
    removed: tuple[str, ...]


def plan_links(current: Iterable[str], wanted: Iterable[str]) -> LinkChanges:
    """Which links to open and which to close to go from ``current`` addresses to ``wanted``."""
    have, want = set(current), set(wanted)
    return LinkChanges(added=tuple(sorted(want - have)), removed=tuple(sorted(have - want)))


def preferred_addresses(resolved: Iterable[tuple[int, str]], port: int) -> frozenset[str]:
    """``host:port`` of every resolved (family, ip), one family only: IPv4 if there is
    any, else IPv6. A dual-stack name (``localhost``, a dual-stack headless Service) gives
    each replica one address per family; one link per replica, not two, so the agent
    never registers twice on the same balancer."""
    by_family: dict[int, set[str]] = {}
    for family, ip in resolved:
        by_family.setdefault(family, set()).add(ip)
    ips = by_family.get(socket.AF_INET) or by_family.get(socket.AF_INET6) or set()
    return frozenset(join_host_port(ip, port) for ip in ips)


def merge_targets(entries: Iterable[tuple[str | None, Iterable[str]]]) -> dict[str, str | None]:
    """Address -> the Host header to dial it with, over (host header, addresses) per
    configured entry; an address named by two entries keeps the first one's header."""
    targets: dict[str, str | None] = {}
    for host_header, addresses in entries:
        for address in sorted(addresses):
            targets.setdefault(address, host_header)
    return targets


# ---- one link --------------------------------------------------------------------------------


class BalancerLink:
    """One replica: dial, register, serve, reconnect; until :meth:`close`."""

    def __init__(
        self,
        host: LinkHost,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        address: str,
        host_header: str | None = None,
    ) -> None:
        self.address = address
        """``ip:port`` (or the configured ``host:port``) this link dials; logged as ``balancer=``."""
        self.registered = False
        self._host = host
        self._session = session
        self._credentials = credentials
        self._url = f"ws://{address}" + AGENT_SOCKET_PATH.format(agent_id=credentials.agent_id)
        self._headers = {AGENT_SECRET_HEADER: credentials.secret}
        if host_header is not None:
            self._headers["Host"] = host_header  # the name it was resolved from, as before links
        if credentials.management_token:
            self._headers["Authorization"] = f"Bearer {credentials.management_token}"
        self._outbox: list[Any] = []
        self._ready = asyncio.Event()
        self._status_dirty = False
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"BalancerLink({self.address})"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"balancer-link-{self.address}")

    async def close(self) -> None:
        """Send what the outbox holds, close the socket, stop reconnecting."""
        self._closing.set()
        task = self._task
        if task is None:
            return
        if not self.registered:
            task.cancel()  # dialling or waiting to retry: nothing to flush
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def send(self, message: Any) -> None:
        """Queue one message (a dict) for this replica; dropped while not registered (what
        it answers died with the socket)."""
        if not self.registered:
            return
        self._outbox.append(message)
        self._ready.set()

    def status_changed(self) -> None:
        """Push a fresh status snapshot soon (coalesced with what else is queued)."""
        self._status_dirty = True
        self._ready.set()

    async def _run(self) -> None:
        backoff = BACKOFF_INITIAL_S
        try:
            while not self._closing.is_set():
                try:
                    async with self._session.ws_connect(
                        self._url,
                        heartbeat=5.0,
                        max_msg_size=MAX_FRAME_BYTES,
                        headers=self._headers,
                        timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                    ) as ws:
                        backoff = BACKOFF_INITIAL_S
                        await self._serve(ws)
                except aiohttp.WSServerHandshakeError as err:
                    if err.status == 401:
                        log.error(
                            "balancer refused this agent's management token (HTTP 401): set --management-token "
                            "(env PADDLER_MANAGEMENT_TOKEN) to the balancer's; balancer=%s retry_in=%.1fs",
                            self.address,
                            backoff,
                        )
                    else:
                        log.info("balancer unreachable balancer=%s error=%s retry_in=%.1fs", self.address, err, backoff)
                except (aiohttp.ClientError, OSError) as err:
                    log.info("balancer unreachable balancer=%s error=%s retry_in=%.1fs", self.address, err, backoff)
                except RejectedError as err:
                    log.error("balancer rejected this agent balancer=%s reason=%s", self.address, err)
                except (TimeoutError, ValueError) as err:
                    log.warning("handshake with balancer failed balancer=%s error=%s", self.address, err)
                self._lost()
                if self._closing.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff * (0.5 + random.random())):
                        await self._closing.wait()
                backoff = min(BACKOFF_MAX_S, backoff * 2)
        finally:
            self._lost()

    def _lost(self) -> None:
        if not self.registered:
            return
        self.registered = False
        self._outbox.clear()
        self._status_dirty = False
        stopped = self._host.link_lost(self)
        log.info("balancer link lost balancer=%s requests_stopped=%d", self.address, stopped)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(self._host.register_message())
        decoded = await ws.receive_json(timeout=HANDSHAKE_TIMEOUT_S)
        messages = decoded if isinstance(decoded, list) else [decoded]
        first = messages[0] if messages and isinstance(messages[0], dict) else {}
        if first.get("type") != "registered":
            raise RejectedError(str(first.get("reason", decoded)))
        self.registered = True
        log.info("registered agent_id=%s balancer=%s", self._credentials.agent_id, self.address)
        for message in messages[1:]:
            self._host.handle(self, message)
        writer = asyncio.create_task(self._write_loop(ws), name=f"link-writer-{self.address}")
        ticker = asyncio.create_task(self._status_ticker(), name=f"link-status-{self.address}")
        closing = asyncio.create_task(self._closing.wait(), name=f"link-closing-{self.address}")
        reader = asyncio.create_task(self._read_loop(ws), name=f"link-reader-{self.address}")
        tasks = [writer, ticker, closing, reader]
        try:
            await asyncio.wait([reader, closing], return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not reader.done():
                await _cancel(writer)
                with contextlib.suppress(TimeoutError, ConnectionResetError, aiohttp.ClientError):
                    async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT_S):
                        await self._flush(ws)
        finally:
            for task in tasks:
                await _cancel(task)
            await ws.close()

    async def _read_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                decoded = json.loads(msg.data)
            except (ValueError, RecursionError) as err:
                log.error("invalid frame from balancer balancer=%s error=%s", self.address, str(err)[:200])
                continue
            for message in decoded if isinstance(decoded, list) else (decoded,):
                self._host.handle(self, message)

    async def _status_ticker(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.status_changed()

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            await self._flush(ws)

    async def _flush(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        messages, self._outbox = self._outbox, []
        if self._status_dirty:
            self._status_dirty = False
            messages.append(self._host.status_message())
        for frame in batch_frames([encode_message(m) for m in messages]):
            await ws.send_str(frame)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ConnectionResetError):
        await task


# ---- the set of links ------------------------------------------------------------------------


@dataclass
class _Entry:
    """One ``--management-addr``: an IP literal (one address) or a name (every address)."""

    host: str
    port: int
    addresses: frozenset[str] = frozenset()
    warned_at: float | None = None
    failing: bool = False

    @classmethod
    def parse(cls, text: str) -> _Entry:
        host, port = split_host_port(text)
        entry = cls(host, port)
        if entry.literal:
            entry.addresses = frozenset({join_host_port(host, port)})
        return entry

    @property
    def literal(self) -> bool:
        return is_ip_literal(self.host)

    @property
    def host_header(self) -> str | None:
        return None if self.literal else join_host_port(self.host, self.port)

    def resolve_failed(self, error: str) -> None:
        """Keep the addresses it had; warn now and then."""
        self.failing = True
        now = time.monotonic()
        if self.warned_at is None or now - self.warned_at >= RESOLVE_WARNING_INTERVAL_S:
            self.warned_at = now
            log.warning(
                "balancer name does not resolve name=%s error=%s links_kept=%d",
                join_host_port(self.host, self.port),
                error,
                len(self.addresses),
            )


class LinkSet:
    """The links to every balancer replica named by the configured addresses."""

    def __init__(
        self,
        host: LinkHost,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        addresses: Sequence[str],
        resolve_interval: float,
    ) -> None:
        self.links: dict[str, BalancerLink] = {}
        self._host = host
        self._session = session
        self._credentials = credentials
        self._entries = [_Entry.parse(text) for text in addresses]
        self._resolve_interval = resolve_interval

    def __iter__(self) -> Iterator[BalancerLink]:
        return iter(list(self.links.values()))

    async def maintain(self, closing: asyncio.Event) -> None:
        """Resolve and reconcile the links until ``closing`` is set. While a name has
        no address yet, look again sooner (backoff up to ``resolve_interval``)."""
        retry = BACKOFF_INITIAL_S
        while True:
            await self.refresh()
            if all(e.addresses for e in self._entries):
                delay, retry = self._resolve_interval, BACKOFF_INITIAL_S
            else:
                delay, retry = min(retry, self._resolve_interval), min(retry * 2, self._resolve_interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await closing.wait()
            if closing.is_set():
                return

    async def refresh(self) -> None:
        """Resolve every name once, then open and close links to match."""
        for entry in self._entries:
            if not entry.literal:
                await self._resolve(entry)
        targets = merge_targets((e.host_header, e.addresses) for e in self._entries)
        changes = plan_links(self.links, targets)
        removed = [self.links.pop(address) for address in changes.removed]
        for link in removed:
            log.info("balancer link removed balancer=%s reason=not-resolved-any-more", link.address)
        await asyncio.gather(*(link.close() for link in removed))
        for address in changes.added:
            log.info("balancer link added balancer=%s name=%s", address, targets[address] or address)
            link = self.links[address] = BalancerLink(
                self._host, self._session, self._credentials, address, targets[address]
            )
            link.start()

    async def _resolve(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT_S):
                infos = await loop.getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as err:
            entry.resolve_failed(str(err) or type(err).__name__)
            return
        addresses = preferred_addresses(((info[0], str(info[4][0])) for info in infos), entry.port)
        if not addresses:
            entry.resolve_failed("no address")
            return
        if entry.failing:
            entry.failing, entry.warned_at = False, None
            log.info("balancer name resolves again name=%s addresses=%d", entry.host_header, len(addresses))
        entry.addresses = addresses

    async def close(self) -> None:
        """Close every link (each sends what its outbox holds first)."""
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.close() for link in links))
