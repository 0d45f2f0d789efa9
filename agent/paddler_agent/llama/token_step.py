"""The token step's decisions, as pure logic (no llama.cpp): what a sampled token does
to its sequence, and which kind each generated token counts as in ``Done``'s usage.

:class:`paddler_agent.llama.outbox.Outbox` and the decode worker carry them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from paddler_core.generated_output import TokenCounts


class TokenOutcome(Enum):
    """What becomes of a sequence after one sampled token."""

    CONTINUE = "continue"
    """The token is fed back: the next step decodes it."""
    FINISHED = "finished"
    """End of generation, a stop string or ``max_tokens``: the request is done."""
    CONTEXT_FULL = "context_full"
    """The sequence's context is used up: the request ends with a context-full error."""


def outcome_after_token(
    *, end_of_generation: bool, stopped: bool, generated: int, max_tokens: int, n_past: int, n_ctx: int
) -> TokenOutcome:
    """The outcome of a token: an end-of-generation token, a stop string or the last
    allowed token finish the request (finishing wins over a full context, whose request
    would have ended anyway); a token with no cell left for it ends it as context full."""
    if end_of_generation or stopped or generated >= max_tokens:
        return TokenOutcome.FINISHED
    if n_past >= n_ctx:
        return TokenOutcome.CONTEXT_FULL
    return TokenOutcome.CONTINUE


@dataclass
class TokenTally:
    """Generated tokens per kind, for a sequence whose text is classified as it streams.

    A token counts as the kind of the first piece of text it emits. One that emits
    nothing (a tag, or text the stop-string matcher holds back) counts as the kind of the
    next piece emitted: an opening ``<think>`` counts as reasoning, the text it opens.
    """

    counts: TokenCounts = field(default_factory=TokenCounts)
    uncounted: int = 0
    """Generated tokens whose kind is not known yet (they emitted nothing so far)."""

    def sampled(self) -> None:
        """One more generated token, of a kind the next emitted piece tells."""
        self.uncounted += 1

    def emitted(self, kind: str) -> None:
        """A piece of ``kind`` was emitted: the tokens waiting for a kind take it."""
        if self.uncounted:
            self.counts.add(kind, self.uncounted)
            self.uncounted = 0
