"""The unified KV cache as the decode thread keeps it: its sequences (slots), what each
holds, and the room they share.

The decisions are :mod:`paddler_agent.llama.kv_policy`'s (pure); this module carries
them out on llama.cpp's context (``seq_cp``, ``seq_rm``) and keeps
:class:`~paddler_agent.kv_cache.KvLedger` in step: reusing cached prefixes, evicting
idle slots' caches least recently used first, preempting (parking) the youngest running
sequence when the cache is full, and resuming it when there is room again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from paddler_agent.kv_cache import KvLedger
from paddler_agent.llama.jobs import Slot, SlotSequence, decode_log
from paddler_agent.llama.kv_policy import cells_to_start, eviction_order, prefix_plan
from paddler_agent.llama.native import GenContext

MAX_PREFIX_HASHES = 4096


class SlotCache:
    """The slots of one model's generation context, and the cells their caches hold."""

    def __init__(self, gen: GenContext, sequences: int) -> None:
        self.gen = gen
        self.slots = [Slot(i) for i in range(sequences)]
        """Sequence ids of the unified KV cache: at most ``slots`` of the load config run
        at once; the others keep idle conversations cached until their room is needed (LRU)."""
        self.ledger = KvLedger(gen.n_ctx_seq, sequences)

    # -- what the slots hold ------------------------------------------------------------------

    def running(self) -> list[SlotSequence]:
        """Sequences that hold KV cells (not preempted), oldest first."""
        running = [s.seq for s in self.slots if s.seq is not None and not s.seq.parked]
        running.sort(key=lambda q: q.job.order)
        return running

    def parked(self) -> list[SlotSequence]:
        """Preempted sequences, oldest first: the first to resume."""
        return sorted((s.seq for s in self.slots if s.seq is not None and s.seq.parked), key=lambda q: q.job.order)

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.seq is not None)

    def free(self) -> list[Slot]:
        return [s for s in self.slots if s.seq is None]

    def slot_of(self, seq: SlotSequence) -> Slot:
        return self.slots[seq.slot]

    def holds(self, seq: SlotSequence) -> bool:
        """Whether ``seq`` still runs (a step may have ended it)."""
        return self.slots[seq.slot].seq is seq

    def prefix_hashes(self) -> list[str]:
        keys = {k for slot in self.slots for k in slot.prefix_keys}
        return sorted(keys)[:MAX_PREFIX_HASHES]

    # -- changing what a slot holds -----------------------------------------------------------

    def truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            self.gen.seq_truncate(slot.index, keep)
            self.ledger.truncate(slot.index, keep)
            del slot.tokens[keep:]

    def append(self, slot: Slot, tokens: Sequence[int]) -> None:
        slot.tokens.extend(tokens)
        self.ledger.extend(slot.index, len(tokens))

    def forget(self, slot: Slot) -> None:
        """Drop all ``slot`` holds: its cells may hold a failed step's half-written state."""
        self.gen.seq_truncate(slot.index, 0)
        self.ledger.truncate(slot.index, 0)
        slot.tokens.clear()
        slot.prefix_keys = ()

    def release(self, slot: Slot) -> None:
        """End the sequence in ``slot`` (its cache stays, for the next request to reuse)."""
        if slot.seq is not None:
            slot.seq.sampler.free()
            slot.seq.job.free_media()
            slot.seq = None
        slot.last_used = time.monotonic()

    def plan(self, prompt: Sequence[int], slot: Slot, shared: int) -> tuple[Slot | None, int]:
        """(donor, reuse): whose cached prefix ``slot`` keeps for ``prompt`` (kv_policy.prefix_plan)."""
        return prefix_plan(prompt, self.slots, slot, shared)

    def apply_prefix(self, slot: Slot, donor: Slot | None, reuse: int) -> None:
        if donor is not None:
            self.gen.seq_copy(donor.index, slot.index, reuse)
            self.ledger.share(donor.index, slot.index, reuse)
            slot.tokens = donor.tokens[:reuse]
            decode_log.debug("prefix shared src_slot=%d dst_slot=%d tokens=%d", donor.index, slot.index, reuse)
        else:
            self.truncate(slot, reuse)

    # -- room ---------------------------------------------------------------------------------

    def evict(self, slot: Slot, keep: int) -> None:
        """Drop an idle slot's cached tokens beyond ``keep`` (its prefix keys go with them)."""
        if keep < len(slot.tokens):
            decode_log.debug("cached prefix evicted slot=%d tokens=%d kept=%d", slot.index, len(slot.tokens), keep)
            self.truncate(slot, keep)
            slot.prefix_keys = ()

    def evict_for(self, cells: int) -> bool:
        """Evict idle slots' caches, least recently used first, until ``cells`` are free;
        False when running sequences hold too much for that."""
        for other in sorted(self._evictable(), key=lambda s: s.last_used):
            if self.ledger.free >= cells:
                break
            self.evict(other, 0)
        return self.ledger.free >= cells

    def _evictable(self) -> list[Slot]:
        return [s for s in self.slots if s.seq is None and self.ledger.freed_by_truncate(s.index, 0)]

    def room_for(self, tokens: Sequence[int], slot: Slot, donor: Slot | None, reuse: int) -> bool:
        """Whether ``slot`` can evaluate ``tokens`` (keeping ``reuse`` of them cached, from
        itself or copied from ``donor``) and then generate, beside what the running
        sequences still need: their unevaluated tokens and a cell each for their next
        token. Evicts idle slots' cached prefixes, least recently used first, while that
        is not enough (an idle donor keeps the prefix it lends)."""
        ledger = self.ledger
        needed = cells_to_start(len(tokens), reuse, ledger.capacity, self.running())
        own_keep = 0 if donor is not None else reuse

        def fits() -> bool:
            return needed <= ledger.free + ledger.freed_by_truncate(slot.index, own_keep)

        if fits():
            return True
        for other in eviction_order(self.slots, keep=slot):
            self.evict(other, reuse if other is donor else 0)
            if fits():
                return True
        return False

    def make_room(self) -> SlotSequence | None:
        """Give each generating sequence a cell for this step (or, when none generates, a
        prompt chunk at least one): evict idle slots' cached prefixes, least recently
        used first, then preempt the youngest running sequence (it resumes later by
        re-evaluating its tokens). Returns a sequence alone in a full cache: it has used
        the cache up, and the caller ends it before asking again."""
        while True:
            running = self.running()
            if not running:
                return None
            needed = max(1, sum(1 for q in running if q.next_token is not None))
            if needed <= self.ledger.free:
                return None
            idle = self._evictable()
            if idle:
                self.evict(min(idle, key=lambda s: s.last_used), 0)
                continue
            full = self.shed()
            if full is not None:
                return full

    def shed(self) -> SlotSequence | None:
        """Free room by preempting the youngest running sequence; returns the sequence
        instead when it runs alone (nothing to preempt: it has used the cache up)."""
        running = self.running()
        if len(running) == 1:
            return running[0]
        if running:
            self.park(running[-1])
        return None

    def park(self, seq: SlotSequence) -> None:
        """Preempt ``seq``: free its cells; it keeps its slot, sampler and output state and
        re-evaluates its prompt and generated tokens when it resumes."""
        slot = self.slots[seq.slot]
        history = slot.tokens + seq.pending
        if seq.next_token is not None:
            history.append(seq.next_token)
        seq.pending, seq.next_token, seq.n_past, seq.parked = history, None, 0, True
        self.truncate(slot, 0)
        slot.prefix_keys = ()
        decode_log.info(
            "request preempted: the KV cache is full request_id=%s slot=%d tokens=%d generated=%d",
            seq.job.request_id,
            slot.index,
            len(history),
            seq.generated,
        )

    def resume(self, seq: SlotSequence) -> bool:
        """Resume a preempted sequence when the cache has room for all it held."""
        slot = self.slots[seq.slot]
        history = seq.pending
        donor, reuse = self.plan(history, slot, 0)
        if not self.room_for(history, slot, donor, reuse):
            return False
        self.apply_prefix(slot, donor, reuse)
        seq.pending, seq.n_past, seq.parked = history[reuse:], reuse, False
        slot.prefix_keys = seq.job.prefix_keys
        decode_log.info(
            "request resumed request_id=%s slot=%d tokens=%d cached_tokens=%d",
            seq.job.request_id,
            slot.index,
            len(history),
            reuse,
        )
        return True
