"""Bookkeeping of the llama engine's shared KV cache (pure Python, no llama.cpp)."""

from __future__ import annotations


class KvLedger:
    """How many cells of the unified KV cache are in use, kept in step with llama.cpp.

    llama.cpp frees a cell when no sequence holds it any more, and a prefix copied to
    another slot (``seq_cp``) tags the same cells with both sequences instead of
    duplicating them. The ledger mirrors that with cell ids of its own (not llama.cpp's
    cell indices; only the count matters): per slot the ids of its cells in position
    order, and a reference count per id.
    """

    def __init__(self, capacity: int, slots: int) -> None:
        self.capacity = capacity
        self._cells: list[list[int]] = [[] for _ in range(slots)]
        self._refs: dict[int, int] = {}
        self._next_id = 0

    @property
    def used(self) -> int:
        return len(self._refs)

    @property
    def free(self) -> int:
        return self.capacity - len(self._refs)

    def held(self, slot: int) -> int:
        return len(self._cells[slot])

    def extend(self, slot: int, n: int) -> None:
        """``slot`` evaluated ``n`` more tokens: n new cells."""
        first = self._next_id
        self._next_id += n
        self._cells[slot].extend(range(first, first + n))
        refs = self._refs
        for cell in range(first, first + n):
            refs[cell] = 1

    def truncate(self, slot: int, keep: int) -> None:
        """``slot`` dropped positions ``>= keep``."""
        cells = self._cells[slot]
        refs = self._refs
        for cell in cells[keep:]:
            left = refs[cell] - 1
            if left:
                refs[cell] = left
            else:
                del refs[cell]
        del cells[keep:]

    def share(self, src: int, dst: int, n: int) -> None:
        """``dst`` dropped everything and now holds positions ``[0, n)`` of ``src``."""
        self.truncate(dst, 0)
        shared = self._cells[src][:n]
        for cell in shared:
            self._refs[cell] += 1
        self._cells[dst] = shared

    def freed_by_truncate(self, slot: int, keep: int) -> int:
        """Cells that truncating ``slot`` to ``keep`` positions would free."""
        refs = self._refs
        return sum(1 for cell in self._cells[slot][keep:] if refs[cell] == 1)
