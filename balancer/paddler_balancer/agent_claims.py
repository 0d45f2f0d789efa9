"""Who may use an agent id: the first agent to register with an id claims it with a secret.

An agent sends a random secret of its own (``X-Paddler-Agent-Secret``) when it dials
``/api/v1/agent_socket/{agent_id}``. The balancer keeps a digest of it per id, so that
reading an id from ``GET /api/v1/agents`` is not enough to register under it and knock
the real agent out: a later registration with that id must present the same secret
(the real agent reconnecting after a network blip does). A secretless registration
can take a free, unclaimed id, never one that is connected or claimed. The management
token (``--management-token``) decides who may dial at all; this decides which id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict

from aiohttp import web

AGENT_SECRET_HEADER = "X-Paddler-Agent-Secret"
MAX_CLAIMS = 65536
"""Ids remembered at most (least recently registered forgotten first): bounds memory
against a peer that registers endless ids."""


class AgentClaims:
    def __init__(self, capacity: int = MAX_CLAIMS) -> None:
        self.capacity = capacity
        self._digests: OrderedDict[str, bytes] = OrderedDict()

    def admit(self, agent_id: str, secret: str | None, connected: bool) -> str | None:
        """None if this registration may use ``agent_id`` (and records the claim);
        otherwise the reason to reject it."""
        digest = hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest() if secret else None
        known = self._digests.get(agent_id)
        if known is not None and (digest is None or not hmac.compare_digest(known, digest)):
            return f"agent id {agent_id} is claimed by another agent (its {AGENT_SECRET_HEADER} differs)"
        if known is None and connected:
            return f"agent id {agent_id} is in use by a connected agent"
        if digest is not None:
            self._digests[agent_id] = digest
            self._digests.move_to_end(agent_id)
            while len(self._digests) > self.capacity:
                self._digests.popitem(last=False)
        return None


CLAIMS_KEY = web.AppKey("agent_claims", AgentClaims)
