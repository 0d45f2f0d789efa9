"""Prometheus metrics (and StatsD gauges). Gauges are read from live state at
scrape time, so they always exist and read 0 when idle."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class GroupGauges:
    model_group: str
    agents: int
    slots_total: int
    slots_processing: int
    requests_buffered: int
    prompt_tokens_reused: int = 0
    """Prompt tokens the group's agents found in their KV caches, as they report them."""
    prompt_tokens_evaluated: int = 0
    """Prompt tokens the group's agents evaluated, as they report them."""

    @property
    def prompt_reuse_ratio(self) -> float:
        """Reused / (reused + evaluated) prompt tokens; 0 before any request."""
        seen = self.prompt_tokens_reused + self.prompt_tokens_evaluated
        return self.prompt_tokens_reused / seen if seen else 0.0


@dataclass(frozen=True)
class AgentGauges:
    model_group: str
    agent_id: str
    agent_name: str
    kv_cache_tokens_used: int
    kv_cache_tokens_total: int


class _LiveGauges(Collector):
    def __init__(self, read: Callable[[], list[GroupGauges]], read_agents: Callable[[], list[AgentGauges]]) -> None:
        self._read = read
        self._read_agents = read_agents

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._collect_groups()
        yield from self._collect_agents()

    def _collect_agents(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model_group", "agent_id", "agent_name"]
        used = GaugeMetricFamily(
            "paddler_agent_kv_cache_tokens_used",
            "KV cache cells in use on the agent (running requests and cached prefixes)",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "paddler_agent_kv_cache_tokens_total",
            "KV cache cells of the agent (context_size, shared by its slots)",
            labels=labels,
        )
        for row in self._read_agents():
            key = [row.model_group, row.agent_id, row.agent_name]
            used.add_metric(key, float(row.kv_cache_tokens_used))
            total.add_metric(key, float(row.kv_cache_tokens_total))
        yield used
        yield total

    def _collect_groups(self) -> Iterator[GaugeMetricFamily]:
        rows = self._read()
        families = {
            "agents": GaugeMetricFamily("paddler_agents", "Connected agents", labels=["model_group"]),
            "slots_total": GaugeMetricFamily("paddler_slots_total", "Slots reported by agents", labels=["model_group"]),
            "slots_processing": GaugeMetricFamily(
                "paddler_slots_processing", "Slots busy with a request", labels=["model_group"]
            ),
            "requests_buffered": GaugeMetricFamily(
                "paddler_requests_buffered",
                "Requests waiting for a free slot",
                labels=["model_group"],
            ),
            "prompt_tokens_reused": GaugeMetricFamily(
                "paddler_prompt_tokens_reused",
                "Prompt tokens found in the agents' KV caches (not evaluated), summed over connected agents",
                labels=["model_group"],
            ),
            "prompt_tokens_evaluated": GaugeMetricFamily(
                "paddler_prompt_tokens_evaluated",
                "Prompt tokens the agents evaluated, summed over connected agents",
                labels=["model_group"],
            ),
            "prompt_reuse_ratio": GaugeMetricFamily(
                "paddler_prompt_reuse_ratio",
                "Reused / (reused + evaluated) prompt tokens of the connected agents",
                labels=["model_group"],
            ),
        }
        for row in rows:
            for key, family in families.items():
                family.add_metric([row.model_group], float(getattr(row, key)))
        # Unlabelled total: the metric HPA / KEDA scale on (ARCHITECTURE.md).
        total = GaugeMetricFamily("paddler_buffered_requests", "Requests waiting for a free slot, all model groups")
        total.add_metric([], float(sum(r.requests_buffered for r in rows)))
        yield total
        yield from families.values()


class Metrics:
    def __init__(
        self,
        read_gauges: Callable[[], list[GroupGauges]],
        read_agent_gauges: Callable[[], list[AgentGauges]] = list,
    ) -> None:
        self.read_gauges = read_gauges
        self.registry = CollectorRegistry()
        self.registry.register(_LiveGauges(read_gauges, read_agent_gauges))
        self.time_to_first_token = Histogram(
            "paddler_time_to_first_token_seconds",
            "From request arrival to the first token sent to the client",
            ["model_group"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "paddler_request_duration_seconds",
            "From request arrival to its last byte",
            ["model_group"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "paddler_generated_tokens",
            "Tokens streamed to clients",
            ["model_group"],
            registry=self.registry,
        )
        self.requests = Counter(
            "paddler_requests",
            "Finished requests by outcome (HTTP status code)",
            ["model_group", "code"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "paddler_agent_refusals",
            "Requests an agent refused before running them (routed again; clients never see them)",
            ["model_group", "reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def statsd_reporter(metrics: Metrics, addr: tuple[str, int], prefix: str, interval: float) -> None:
    """Send gauges to StatsD over UDP every ``interval`` seconds until cancelled."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        while True:
            rows = metrics.read_gauges()
            lines = [
                f"{prefix}{key}:{sum(getattr(r, key) for r in rows)}|g"
                for key in ("agents", "slots_total", "slots_processing", "requests_buffered")
            ]
            try:
                sock.sendto("\n".join(lines).encode(), addr)
            except OSError as err:
                log.warning("statsd send failed addr=%s:%s error=%s", addr[0], addr[1], err)
            await asyncio.sleep(interval)
    finally:
        sock.close()
