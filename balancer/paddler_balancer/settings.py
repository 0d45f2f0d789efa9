"""Balancer settings: one typed dataclass, units in the docstrings."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from enum import StrEnum

from paddler_core.model_access import ModelUrlPolicy

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from ``"10000"`` (bare number: milliseconds, like Paddler's flags),
    ``"500ms"``, ``"10s"``, ``"2m"`` or ``"1h"``."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}; use e.g. 10000 (ms), 500ms, 10s, 2m")
    value, unit = float(match.group(1)), match.group(2) or "ms"
    return value * _UNIT_SECONDS[unit]


def parse_addr(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); port 0 picks a free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid address {text!r}; expected host:port")
    return host.strip("[]") or "127.0.0.1", int(port)


def default_replica_name() -> str:
    """This replica's name: env ``POD_NAME`` (Kubernetes' downward API), else the host name."""
    return os.environ.get("POD_NAME") or socket.gethostname()


class RoutingPolicy(StrEnum):
    """How the balancer picks an agent (``--routing``); see :mod:`paddler_balancer.routing`."""

    PREFIX = "prefix"
    """Prefix affinity under a load cap, new prefixes by consistent hashing with bounded loads."""
    LEAST_BUSY = "least-busy"
    """Paddler 4.1: the agent with the most free slots."""


@dataclass(frozen=True)
class BalancerSettings:
    inference_addr: str = "127.0.0.1:8061"
    """Native + OpenAI inference APIs (host:port)."""
    management_addr: str = "127.0.0.1:8060"
    """Management API, agent sockets and /metrics (host:port)."""
    web_admin_panel_addr: str | None = None
    """Web admin panel (host:port); None turns it off."""
    compat_openai_addr: str | None = None
    """Optional extra address serving only the OpenAI API (Paddler compatibility)."""
    max_buffered_requests: int = 30
    """Requests held while no agent has a free slot; 0 disables buffering."""
    buffered_request_timeout: float = 10.0
    """Seconds a request may wait in the buffer before a 504."""
    inference_item_timeout: float = 30.0
    """Seconds without a token from the agent before a 504."""
    state_database: str = "memory://"
    """``memory://`` or ``file:///path.json`` (desired state survives a restart)."""
    statsd_addr: str | None = None
    """StatsD host:port; None turns StatsD off."""
    statsd_prefix: str = "paddler_"
    statsd_reporting_interval: float = 10.0
    """Seconds between StatsD reports."""
    api_key: str | None = None
    """When set, inference requests need it (Bearer, Basic password, or ``?api_key=`` on the
    native routes); see docs/security.md."""
    management_token: str | None = None
    """When set, every management route but ``/health`` needs it, agent sockets included."""
    inference_cors_allowed_hosts: tuple[str, ...] = ()
    """Browser origins (``scheme://host[:port]``, or ``*``) allowed to call the inference API."""
    management_cors_allowed_hosts: tuple[str, ...] = ()
    """Browser origins allowed to call the management API (the admin panel's always is)."""
    model_url_policy: ModelUrlPolicy = field(default_factory=ModelUrlPolicy)
    """Which model URLs a desired state may name (checked on PUT; agents check again)."""
    routing_candidates: int = 16
    """Most agents scored per decision (a random sample beyond it keeps decisions O(1))."""
    routing: RoutingPolicy = RoutingPolicy.PREFIX
    """``prefix``: prefix affinity under a load cap, new prefixes by consistent hashing with
    bounded loads (the same choice on every replica); ``least-busy``: Paddler 4.1's most
    free slots."""
    prefix_affinity_load_cap: float = 0.75
    """Prefix affinity only counts for agents using less than this share of their slots."""
    prefix_load_factor: float = 1.25
    """A new prefix goes to an agent only while its busy slots stay within this factor of
    its fair share of the load (consistent hashing with bounded loads)."""
    max_unavailable: str = "25%"
    """Agents of a model group that may stop serving at once while a new desired state
    rolls over them: a count or a percentage (rounded down, at least 1). A PUT may set
    its own with ``?max_unavailable=``."""
    replica_name: str = field(default_factory=default_replica_name)
    """This replica's name: shown by the admin panel, sent as ``X-Paddler-Balancer``."""
    drain_delay: float = 0.0
    """Seconds a stopping replica keeps accepting after its readiness went off (so load
    balancers and Kubernetes endpoints stop sending before the listener closes)."""
    drain_timeout: float = 50.0
    """Seconds a stopping replica waits for in-flight and buffered requests to finish."""
    peer_management_addrs: tuple[str, ...] = ()
    """Management ``host:port`` of the other replicas (a name may resolve to several, e.g. a
    headless Service; resolved again on each query): pool-wide buffered counts."""
