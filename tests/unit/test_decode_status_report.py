"""What the decode thread reports to the status board after each turn
(paddler_agent.llama.status_report): only what changed, nothing when nothing did."""

from __future__ import annotations

from paddler_agent.llama.jobs import StatusDelta
from paddler_agent.llama.status_report import LoopStatus, StatusReporter

IDLE = LoopStatus(slots_processing=0, prefix_hashes=[], kv_cache_tokens_used=0, prompt_tokens=(0, 0))


def test_an_idle_turn_reports_nothing() -> None:
    assert StatusReporter().delta(IDLE) is None


def test_a_turn_reports_what_changed_and_only_once() -> None:
    reporter = StatusReporter()
    busy = LoopStatus(slots_processing=1, prefix_hashes=["k"], kv_cache_tokens_used=12, prompt_tokens=(4, 8))
    assert reporter.delta(busy) == StatusDelta(
        slots_processing=1, prefix_hashes=["k"], kv_cache_tokens_used=12, prompt_tokens=(4, 8)
    )
    same = LoopStatus(slots_processing=1, prefix_hashes=["k"], kv_cache_tokens_used=12, prompt_tokens=(0, 0))
    assert reporter.delta(same) is None
    more = LoopStatus(slots_processing=1, prefix_hashes=["k"], kv_cache_tokens_used=13, prompt_tokens=(0, 0))
    assert reporter.delta(more) == StatusDelta(kv_cache_tokens_used=13)
    assert reporter.delta(IDLE) == StatusDelta(slots_processing=0, prefix_hashes=[], kv_cache_tokens_used=0)


def test_prompt_tokens_are_news_even_when_nothing_else_changed() -> None:
    status = LoopStatus(slots_processing=0, prefix_hashes=[], kv_cache_tokens_used=0, prompt_tokens=(0, 3))
    reporter = StatusReporter()
    assert reporter.delta(status) == StatusDelta(prompt_tokens=(0, 3))
    assert reporter.delta(status) == StatusDelta(prompt_tokens=(0, 3))
