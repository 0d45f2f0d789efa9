"""``host:port`` addresses, as flags and Services name them (no I/O here).

A name may stand for several balancer replicas (a headless Service resolves to one
address per pod): whoever dials it resolves the name again and again and keeps one
connection per address. This module only splits and joins; the resolving is done at
the edges (the agent's links, the balancer's peers, the operator's client).
"""

from __future__ import annotations

import ipaddress


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port). Raises ValueError with the reason."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"invalid address {text!r}; expected host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"invalid address {text!r}; the host is empty")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """(host, port) -> ``host:port``, brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_literal(host: str) -> bool:
    """True for ``10.0.0.1`` or ``::1``: nothing to resolve."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
