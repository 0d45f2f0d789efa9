"""The response stream of one request in flight on an agent.

The agent socket reader pushes payloads in; the API handler reads them out in
batches (everything that arrived since the last read, so one socket write can
carry several tokens). Errors are explicit outcomes, not exceptions from deep
inside the reader.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from enum import Enum
from typing import Any


class StreamFailure(Enum):
    """Why a request ended without its final payload."""

    ITEM_TIMEOUT = "item_timeout"
    AGENT_LOST = "agent_lost"
    INVALID_PAYLOAD = "invalid_payload"
    """The agent sent a response that is not a Paddler payload."""
    REFUSED = "refused"
    """The agent refused the request before running it (``refused``: no free slot,
    stopping). Before any payload the balancer routes it again and the client never
    sees this; after one (an agent breaking the protocol) it is a 502."""

    @property
    def status(self) -> int:
        return 504 if self is StreamFailure.ITEM_TIMEOUT else 502

    @property
    def message(self) -> str:
        return _FAILURE_MESSAGES[self]


class InferenceFailure(Exception):
    """A known failure with its HTTP status; never a 500."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        """Machine-readable reason: buffer_full, buffer_timeout, item_timeout, agent_lost,
        invalid_payload, refused, no_agents, invalid_request, unknown_model, request_too_large."""


ITEM_TIMEOUT_MESSAGE = "no token from the agent within the inference item timeout"
AGENT_LOST_MESSAGE = "the agent serving this request disconnected"
INVALID_PAYLOAD_MESSAGE = "the agent serving this request sent an invalid response"
REFUSED_MESSAGE = "the agent serving this request refused it after it had started"
_FAILURE_MESSAGES = {
    StreamFailure.ITEM_TIMEOUT: ITEM_TIMEOUT_MESSAGE,
    StreamFailure.AGENT_LOST: AGENT_LOST_MESSAGE,
    StreamFailure.INVALID_PAYLOAD: INVALID_PAYLOAD_MESSAGE,
    StreamFailure.REFUSED: REFUSED_MESSAGE,
}


class ResponseStream:
    """Payloads of one request from one agent."""

    __slots__ = ("_items", "_waiter", "failure", "finished", "first_item_at", "request_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._items: deque[tuple[Any, bool]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.failure: StreamFailure | None = None
        self.finished = False
        """The final payload has been received from the agent."""
        self.first_item_at: float | None = None

    def push(self, payload: Any, final: bool) -> None:
        if self.finished or self.failure is not None:
            return
        if self.first_item_at is None:
            self.first_item_at = time.monotonic()
        self._items.append((payload, final))
        if final:
            self.finished = True
        self._wake()

    def fail(self, failure: StreamFailure) -> None:
        if self.finished or self.failure is not None:
            return
        self.failure = failure
        self._wake()

    async def next_batch(self, item_timeout: float) -> list[tuple[Any, bool]]:
        """Everything received so far (at least one item).

        Raises InferenceFailure on item timeout or a lost agent.
        """
        if not self._items and self.failure is None:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                async with asyncio.timeout(item_timeout):
                    await self._waiter
            except TimeoutError:
                self.failure = StreamFailure.ITEM_TIMEOUT
            finally:
                self._waiter = None
        if self._items:
            items = list(self._items)
            self._items.clear()
            return items
        failure = self.failure or StreamFailure.AGENT_LOST
        raise InferenceFailure(failure.status, failure.message, failure.value)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
