"""Incremental detokenised text: UTF-8 decoding that holds back a possible stop string."""

from __future__ import annotations

import codecs
from collections.abc import Iterable


class TextStream:
    """Incremental UTF-8 decoding that holds back text that may start a stop string."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Text that can be sent now; sets ``stopped`` when a stop string appeared."""
        return self._release(self._held + self._decoder.decode(piece))

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    def _release(self, text: str) -> str:
        if not self._stops:
            return text
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if stop.startswith(text[len(text) - k :]):
                    best = k
                    break
        return best
