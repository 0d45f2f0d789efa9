"""What the decode thread tells the engine's status board after a turn: only what changed
since it last told it, so an idle loop sends nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from paddler_agent.llama.jobs import StatusDelta


@dataclass(frozen=True)
class LoopStatus:
    """The decode thread's status at the end of a turn."""

    slots_processing: int
    prefix_hashes: list[str]
    kv_cache_tokens_used: int
    prompt_tokens: tuple[int, int]
    """(reused, evaluated) prompt tokens of the requests started since the last report."""


@dataclass
class StatusReporter:
    """The status last reported, to tell the next report's changes from it."""

    slots_processing: int = 0
    prefix_hashes: list[str] = field(default_factory=list)
    kv_cache_tokens_used: int = 0

    def delta(self, status: LoopStatus) -> StatusDelta | None:
        """What changed since the last report (recorded as reported), or None for nothing.
        Prompt tokens are counts since the last report: any count is news."""
        delta = StatusDelta()
        if status.slots_processing != self.slots_processing:
            self.slots_processing = delta.slots_processing = status.slots_processing
        if status.prefix_hashes != self.prefix_hashes:
            self.prefix_hashes = delta.prefix_hashes = status.prefix_hashes
        if status.kv_cache_tokens_used != self.kv_cache_tokens_used:
            self.kv_cache_tokens_used = delta.kv_cache_tokens_used = status.kv_cache_tokens_used
        if status.prompt_tokens != (0, 0):
            delta.prompt_tokens = status.prompt_tokens
        if delta == StatusDelta():
            return None
        return delta
