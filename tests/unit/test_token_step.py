"""The decode thread's token step (paddler_agent.llama.token_step), without a model: what a
sampled token does to its sequence, and which kind each token counts as in the usage."""

from __future__ import annotations

import pytest

from paddler_agent.llama.token_step import TokenOutcome, TokenTally, outcome_after_token
from paddler_core.generated_output import TokenCounts


@pytest.mark.parametrize(
    ("end_of_generation", "stopped", "generated", "max_tokens", "n_past", "n_ctx", "outcome"),
    [
        (False, False, 1, 10, 5, 100, TokenOutcome.CONTINUE),
        (True, False, 1, 10, 5, 100, TokenOutcome.FINISHED),
        (False, True, 1, 10, 5, 100, TokenOutcome.FINISHED),
        (False, False, 10, 10, 5, 100, TokenOutcome.FINISHED),
        (False, False, 3, 10, 100, 100, TokenOutcome.CONTEXT_FULL),
        # the last allowed token in a full context finishes well: it was asked for
        (False, False, 10, 10, 100, 100, TokenOutcome.FINISHED),
        (False, False, 3, 10, 99, 100, TokenOutcome.CONTINUE),
    ],
)
def test_outcome_after_token(
    end_of_generation: bool,
    stopped: bool,
    generated: int,
    max_tokens: int,
    n_past: int,
    n_ctx: int,
    outcome: TokenOutcome,
) -> None:
    assert (
        outcome_after_token(
            end_of_generation=end_of_generation,
            stopped=stopped,
            generated=generated,
            max_tokens=max_tokens,
            n_past=n_past,
            n_ctx=n_ctx,
        )
        is outcome
    )


@pytest.mark.parametrize(
    ("events", "counts", "uncounted"),
    [
        # each token emits content at once
        (["sampled", "ContentToken", "sampled", "ContentToken"], TokenCounts(content=2), 0),
        # an opening <think> emits nothing: it counts as the reasoning it opens
        (["sampled", "sampled", "ReasoningToken"], TokenCounts(reasoning=2), 0),
        # a piece emitted with no token waiting counts nothing
        (["ContentToken", "sampled", "ToolCallToken", "ContentToken"], TokenCounts(tool_call=1), 0),
        # a token whose text is held back waits for a kind
        (["sampled"], TokenCounts(), 1),
    ],
)
def test_a_token_counts_as_the_kind_of_the_first_piece_it_emits(
    events: list[str], counts: TokenCounts, uncounted: int
) -> None:
    tally = TokenTally()
    for event in events:
        if event == "sampled":
            tally.sampled()
        else:
            tally.emitted(event)
    assert (tally.counts, tally.uncounted) == (counts, uncounted)
