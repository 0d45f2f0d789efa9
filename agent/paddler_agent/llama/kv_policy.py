"""How the decode thread uses the unified KV cache, as pure decisions over token lists
(no llama.cpp): which idle slot a request runs in, whose cached prefix it reuses, which
idle caches go first when room is short, and how many cells a start needs.

:class:`paddler_agent.llama.slot_cache.SlotCache` carries the decisions out
(``seq_cp``, ``seq_rm``) and :class:`paddler_agent.kv_cache.KvLedger` counts the cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from paddler_agent.llama.jobs import Slot, SlotSequence

COPY_MIN_TOKENS = 1
"""Share another slot's cached prefix when it holds at least this many more prompt
tokens than the chosen slot (sharing cells of the unified cache costs no memory and
no compute)."""
CONTINUE_MAX_DROP = 32
"""A request continues an idle sequence's cache in place when that drops at most this
many of its cached tokens (a chat template may render the last answer's tail otherwise
than it was generated); a request that would drop more takes another sequence and
copies the shared prefix, so the cached conversation stays."""


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left = np.asarray(a[:n], dtype=np.int64)
    right = np.asarray(b[:n], dtype=np.int64)
    mismatch = np.flatnonzero(left != right)
    return int(mismatch[0]) if mismatch.size else n


def pick_slot(prompt: Sequence[int], free: Sequence[Slot]) -> tuple[Slot, int]:
    """The idle sequence to run ``prompt`` in, and the tokens it already holds: the one
    whose cache the prompt continues (it drops at most CONTINUE_MAX_DROP cached tokens: a
    conversation's next turn); else an empty one, else the least recently used, so other
    cached conversations stay (:func:`prefix_plan` copies a shared prefix such as a
    system prompt from whichever sequence holds it)."""
    shared = {s.index: common_prefix_length(s.tokens, prompt) for s in free}
    best = max(free, key=lambda s: (shared[s.index], -s.last_used))
    if shared[best.index] and len(best.tokens) - shared[best.index] <= CONTINUE_MAX_DROP:
        return best, shared[best.index]
    target = min(free, key=lambda s: (bool(s.tokens), s.last_used))
    return target, shared[target.index]


def prefix_plan(prompt: Sequence[int], slots: Sequence[Slot], slot: Slot, shared: int) -> tuple[Slot | None, int]:
    """(donor, reuse): keep the longest cached prefix of ``prompt`` for ``slot``: its own
    (``shared`` tokens), or another slot's (busy or not) when that is longer by
    COPY_MIN_TOKENS; ``reuse`` prompt tokens need no evaluation (at least one is always
    evaluated)."""
    donor = max(
        (s for s in slots if s is not slot),
        key=lambda s: common_prefix_length(s.tokens, prompt),
        default=None,
    )
    if donor is not None:
        donor_shared = min(common_prefix_length(donor.tokens, prompt), len(prompt) - 1)
        if donor_shared >= shared + COPY_MIN_TOKENS:
            return donor, donor_shared
    return None, min(shared, len(prompt) - 1)


def eviction_order(slots: Iterable[Slot], keep: Slot) -> list[Slot]:
    """Idle slots whose cached tokens may go to make room for ``keep``: least recently
    used first."""
    idle = [s for s in slots if s.seq is None and s is not keep and s.tokens]
    return sorted(idle, key=lambda s: s.last_used)


def cells_to_start(prompt_tokens: int, reuse: int, capacity: int, running: Iterable[SlotSequence]) -> int:
    """KV cells a start needs free: the prompt's unevaluated tokens, one for its first
    generated token (unless the prompt fills the whole cache), and what the running
    sequences still need (their unevaluated tokens and a cell each for their next token)."""
    headroom = 1 if prompt_tokens < capacity else 0
    return prompt_tokens - reuse + headroom + sum(len(q.pending) + 1 for q in running)
