"""Which model sources a desired state may name: URL allow-list and local roots (no I/O).

The balancer checks a desired state's ``Url`` on PUT (400 with the reason); the agent
checks it again before it downloads, on every redirect hop and on every address a
host name resolves to, and checks ``LocalToAgent`` paths against its roots.

URL rules (``--model-url-allow``, repeatable; default ``https://``):

* An entry is a URL prefix: ``https://`` (any host over https),
  ``http://models.internal:8080/gguf/`` (that host and port, paths under it),
  ``https://*.example.com`` (any subdomain).
* Loopback, link-local (cloud metadata lives there), unspecified, multicast and
  reserved addresses, and the well-known metadata host names, are refused unless an
  entry names that host explicitly: a scheme-only entry never opens them.
* ``file://`` URLs are local paths: they need a ``file://`` entry at the balancer and
  the agent's roots at the agent.
"""

from __future__ import annotations

import ipaddress
import posixpath
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_URL_ALLOW = ("https://",)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data"})
_EXTRA_BLOCKED_NETS = (
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud metadata
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS metadata over IPv6
)


class ModelAccessDenied(ValueError):
    """A model source the policy refuses; the message says why and which option opens it."""


@dataclass(frozen=True)
class AllowEntry:
    scheme: str
    host: str | None
    """None: any host (the entry named only a scheme). ``*.example.com``: any subdomain."""
    port: int | None
    path: str

    @classmethod
    def parse(cls, text: str) -> AllowEntry:
        raw = text.strip()
        parts = urlsplit(raw)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https", "file") or not raw.lower().startswith(f"{scheme}://"):
            raise ValueError(f"invalid model URL allow entry {text!r}; expected e.g. https:// or http://host:port/path")
        host = (parts.hostname or "").lower() or None
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"invalid port in model URL allow entry {text!r}") from None
        return cls(scheme=scheme, host=host, port=port, path=parts.path or "/")

    def matches(self, scheme: str, host: str, port: int | None, path: str) -> bool:
        if scheme != self.scheme:
            return False
        if self.host is not None:
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        if self.port is not None and port != self.port:
            return False
        return (path or "/").startswith(self.path)

    @property
    def names_host(self) -> bool:
        return self.host is not None and not self.host.startswith("*.")


def address_is_internal(address: str) -> bool:
    """Loopback, link-local, unspecified, multicast, reserved, or a metadata address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_link_local
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_reserved
        or any(ip in net for net in _EXTRA_BLOCKED_NETS)
    )


def host_is_internal(host: str) -> bool:
    """A host name or literal address that points inside the machine or at metadata."""
    name = host.lower().rstrip(".").strip("[]")
    return (
        name == "localhost"
        or name.endswith(".localhost")
        or name in METADATA_HOSTS
        or address_is_internal(name)
        or _numeric_ipv4_alias(name)
    )


def _numeric_ipv4_alias(name: str) -> bool:
    """``2130706433``, ``0x7f.1``, ``0177.0.0.1``: forms some resolvers read as IPv4 addresses."""
    labels = name.split(".")
    if not 1 <= len(labels) <= 4 or not all(labels):
        return False
    try:
        values = [int(label, 0) for label in labels]
    except ValueError:
        return False
    return (
        len(labels) < 4
        or any(label.startswith("0") and len(label) > 1 for label in labels)
        or any(v > 255 for v in values)
    )


@dataclass(frozen=True)
class ModelUrlPolicy:
    entries: tuple[AllowEntry, ...] = tuple(AllowEntry.parse(e) for e in DEFAULT_URL_ALLOW)

    @classmethod
    def from_entries(cls, texts: tuple[str, ...] | list[str]) -> ModelUrlPolicy:
        """The policy of ``--model-url-allow`` values; none given: the default (``https://``)."""
        return cls(tuple(AllowEntry.parse(t) for t in (texts or DEFAULT_URL_ALLOW)))

    def describe(self) -> str:
        return ", ".join(
            f"{e.scheme}://{e.host or ''}{f':{e.port}' if e.port else ''}{e.path if e.path != '/' else ''}"
            for e in self.entries
        )

    def _entry(self, url: str) -> tuple[AllowEntry, str]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        try:
            port = parts.port
        except ValueError:
            raise ModelAccessDenied(f"model URL {url} has an invalid port") from None
        if scheme in ("http", "https") and not host:
            raise ModelAccessDenied(f"model URL {url} names no host")
        if parts.username is not None or parts.password is not None:
            raise ModelAccessDenied(f"model URL {url} carries credentials; give the agent a token instead")
        for entry in self.entries:
            if entry.matches(scheme, host, port, parts.path):
                return entry, host
        raise ModelAccessDenied(
            f"model URL {url} is not allowed by this balancer's model URL allow-list "
            f"({self.describe()}); add it with --model-url-allow"
        )

    def check_url(self, url: str) -> None:
        """Raises ModelAccessDenied unless ``url`` matches an entry and does not point at an
        internal address (unless that entry names the host itself)."""
        entry, host = self._entry(url)
        if entry.scheme != "file" and not entry.names_host and host_is_internal(host):
            raise ModelAccessDenied(
                f"model URL {url} points at a loopback, link-local or metadata address; "
                "allow that host explicitly with --model-url-allow if you mean it"
            )

    def check_address(self, url: str, address: str) -> None:
        """A host name of ``url`` resolved to ``address``: refuse internal addresses unless the
        matching entry names the host."""
        entry, _host = self._entry(url)
        if not entry.names_host and address_is_internal(address):
            raise ModelAccessDenied(
                f"model URL {url} resolves to the internal address {address}; "
                "allow that host explicitly with --model-url-allow if you mean it"
            )


def path_is_under(path: str, roots: tuple[str, ...]) -> bool:
    """``path`` (absolute, already resolved) lies in one of ``roots`` (absolute, resolved)."""
    if not posixpath.isabs(path):
        return False
    normal = posixpath.normpath(path)
    return any(normal == root or normal.startswith(root.rstrip("/") + "/") for root in roots)
