"""The engine interface: what runs an agent's slots.

Three engines implement it: ``simulated`` (deterministic tokens, no model),
``llama`` (llama.cpp through llama-cpp-python; the only subpackage that imports
``llama_cpp``) and ``llama_server`` (a llama-server process over HTTP). The agent
runtime (``runtime.py``) owns the balancer connection and calls the engine; the
engine reports back through :class:`EngineHost` and by writing its fields on the
shared :class:`StatusBoard`.

Requests reach an engine validated: the runtime parses each ``generate`` /
``embed`` message where it enters the agent, and answers an invalid one itself. (A
conversation's messages and tools are validated once more in the chat-template
renderer's child process, which reads them as JSON from a pipe.)

Threading rule: every method here is called on the event loop thread, and an
engine calls ``host.emit`` / ``host.status_changed`` on the event loop thread
only (a decode thread uses ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

from paddler_core.desired_state import BalancerDesiredState
from paddler_core.inference import ErrorKind, ResponsePayload
from paddler_core.protocol import (
    AgentIssue,
    AgentStatus,
    EmbedMessage,
    GenerateMessage,
    StateApplicationStatus,
)


class EngineHost(Protocol):
    def emit(self, request_id: str, payload: ResponsePayload, final: bool, error_kind: ErrorKind | None = None) -> None:
        """Send one client-facing response payload; ``final`` ends the request. A terminal
        error says what it means to the balancer in ``error_kind`` (not shown to clients)."""

    def status_changed(self) -> None:
        """Push a fresh status snapshot to the balancer soon (coalesced)."""


@dataclass
class StatusBoard:
    """The mutable status an engine writes; the runtime snapshots it with a version."""

    slots_total: int = 0
    """Slots serving now: 0 while no model is loaded, while loading and while swapping."""
    desired_slots_total: int = 0
    slots_processing: int = 0
    model_path: str | None = None
    download_current: int = 0
    download_total: int = 0
    download_filename: str | None = None
    download_indeterminate: bool = False
    issues: list[AgentIssue] = field(default_factory=list)
    state_application_status: StateApplicationStatus = StateApplicationStatus.FRESH
    uses_chat_template_override: bool = False
    prefix_hashes: list[str] = field(default_factory=list)
    applied_state_revision: str | None = None
    """Set by the runtime when applying a desired state has finished."""
    kv_cache_tokens_used: int = 0
    kv_cache_tokens_total: int = 0
    prompt_tokens_reused: int = 0
    prompt_tokens_evaluated: int = 0

    def snapshot(self, version: int) -> AgentStatus:
        # asdict copies the lists, so the snapshot does not change with the board.
        return AgentStatus(version=version, **dataclasses.asdict(self))


class Engine(ABC):
    """Runs a fixed number of slots. Subclasses: SimulatedEngine, LlamaEngine."""

    publishes_prefix_hashes: bool = False
    """True when the engine writes ``board.prefix_hashes`` from what its slots really
    hold; otherwise the runtime approximates them from the last requests it routed."""

    def __init__(self, host: EngineHost, board: StatusBoard, slots: int) -> None:
        self.host = host
        self.board = board
        self.slots = slots
        board.desired_slots_total = slots

    @abstractmethod
    async def apply_desired_state(self, state: BalancerDesiredState) -> None:
        """Make the engine serve ``state``. Called again with a newer state at any
        time (the runtime cancels a superseded call). Failures become issues on the
        board and ``state_application_status``; they never raise."""

    @abstractmethod
    def generate(self, message: GenerateMessage) -> None:
        """Start a generation; stream its payloads through ``host.emit``. A request
        that arrives while no slot can take it (race with a swap) is held until one
        can, or answered with a terminal error."""

    @abstractmethod
    def embed(self, message: EmbedMessage) -> None:
        """Start an embedding batch; stream ``{"Embedding": ...}`` payloads."""

    @abstractmethod
    def stop(self, request_id: str) -> None:
        """Stop responding to ``request_id`` and free its slot; emits nothing more."""

    def model_metadata(self) -> dict[str, str] | None:
        """GGUF metadata of the loaded model, or None when none is loaded."""
        return None

    def decode_heartbeat(self) -> float | None:
        """``time.monotonic()`` of the decode loop's last turn while a model is loaded (the
        liveness probe's evidence that the loop is not stuck), or None where none runs."""
        return None

    async def backend_problem(self) -> str | None:
        """Why the server this engine forwards to cannot serve, asked at this moment (the
        readiness probe); None when it can, or when the engine forwards to none."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, most engines need it
        """Release everything (threads, model memory)."""
