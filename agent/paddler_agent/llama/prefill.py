"""Prompt ingestion: one step's batch, filled with each generating sequence's next token
and then prompt chunks (a prompt's images evaluated through the projector between its
text chunks), and taken back when llama.cpp finds no room for it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import Enum

from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import SlotSequence, decode_log
from paddler_agent.llama.multimodal import ImageChunk, is_placeholder
from paddler_agent.llama.native import Runtime
from paddler_agent.llama.outbox import Outbox
from paddler_agent.llama.slot_cache import SlotCache
from paddler_core.inference import GenerationError

BatchEntry = tuple[SlotSequence, int | None]
"""A sequence in this step's batch and the batch index of its logits (None: its prompt
goes on in a later step, so no token is sampled for it yet)."""


class MediaLayout(Enum):
    """Whether a prompt holds images: a chunk of one that does ends before its next image."""

    TEXT_ONLY = "text_only"
    WITH_IMAGES = "with_images"


class Added(Enum):
    """What a batch entry took from its sequence: undone, it goes back there."""

    NEXT_TOKEN = "next_token"
    PROMPT_CHUNK = "prompt_chunk"


class ImageOutcome(Enum):
    EVALUATED = "evaluated"
    WAITING = "waiting"
    """No room in the KV cache yet: running sequences hold it."""
    FAILED = "failed"
    """The request ended with an error."""


def prompt_chunk(pending: Sequence[int], budget: int, layout: MediaLayout) -> list[int]:
    """The prompt tokens to evaluate this step: at most ``budget`` of ``pending``, and for
    a prompt with images the text up to its next image only (the projector evaluates an
    image apart from the batch). Empty when an image comes first."""
    chunk = list(pending[:budget])
    if layout is MediaLayout.WITH_IMAGES:
        cut = next((i for i, t in enumerate(chunk) if is_placeholder(t)), None)
        if cut is not None:
            return chunk[:cut]
    return chunk


class BatchFiller:
    """Fills the generation context's batch for one step, remembering what it added."""

    def __init__(self, runtime: Runtime, cache: SlotCache, outbox: Outbox) -> None:
        self.runtime = runtime
        self.gen = runtime.gen
        self.cache = cache
        self.outbox = outbox
        self._log: list[tuple[SlotSequence, list[int], Added]] = []
        """What this step's batch added per sequence (tokens, from next_token), to undo
        it when llama.cpp finds no room for the batch."""

    def fill(self) -> list[BatchEntry]:
        """This step's batch: every generating sequence's next token first, then prompt
        chunks, oldest first, within ``n_batch`` and the free cells."""
        batch = self.gen.batch
        batch.clear()
        self._log.clear()
        running = self.cache.running()
        entries = [self._add_next_token(seq) for seq in running if seq.next_token is not None]
        budget = min(self.gen.n_batch - batch.n, self.cache.ledger.free)
        for seq in running:
            if not seq.pending or budget <= 0:
                continue
            if is_placeholder(seq.pending[0]):
                if self._eval_image(seq) is not ImageOutcome.EVALUATED:
                    continue
                budget = min(budget, self.cache.ledger.free)
                if budget <= 0:
                    continue
            layout = MediaLayout.TEXT_ONLY if seq.job.media is None else MediaLayout.WITH_IMAGES
            chunk = prompt_chunk(seq.pending, budget, layout)
            if not chunk:  # another image follows at once: the next step evaluates it
                continue
            entries.append(self._add_chunk(seq, chunk))
            budget -= len(chunk)
        return entries

    def _add_next_token(self, seq: SlotSequence) -> BatchEntry:
        assert seq.next_token is not None
        token = seq.next_token
        index = self.gen.batch.add([token], seq.n_past, seq.slot, last_logits=True)
        self.cache.append(self.cache.slot_of(seq), [token])
        seq.n_past += 1
        seq.next_token = None
        self._log.append((seq, [token], Added.NEXT_TOKEN))
        return seq, index

    def _add_chunk(self, seq: SlotSequence, chunk: list[int]) -> BatchEntry:
        del seq.pending[: len(chunk)]
        last = not seq.pending
        index = self.gen.batch.add(chunk, seq.n_past, seq.slot, last_logits=last)
        self.cache.append(self.cache.slot_of(seq), chunk)
        seq.n_past += len(chunk)
        self._log.append((seq, chunk, Added.PROMPT_CHUNK))
        return seq, index if last else None

    def _eval_image(self, seq: SlotSequence) -> ImageOutcome:
        """Evaluate the image chunk at the head of ``seq.pending`` (outside the step's
        batch: its text before it is already decoded)."""
        media = seq.job.media
        image: ImageChunk | None = media.images.get(seq.pending[0]) if media is not None else None
        if image is None:  # a bug: placeholders of no chunk
            return self._image_failed(
                seq, GenerationError.MULTIMODAL_INGESTION_FAILED, "an image of the prompt was lost"
            )
        if not self.cache.evict_for(image.n_pos):
            return ImageOutcome.WAITING
        started = time.monotonic()
        try:
            projector = self.runtime.projector
            if projector is None:
                raise RequestError(GenerationError.MULTIMODAL_NOT_SUPPORTED, "the multimodal projector is not loaded")
            end = projector.eval_image(self.gen.handle, image, seq.n_past, seq.slot, self.gen.n_batch)
        except RequestError as e:
            decode_log.warning("image evaluation failed request_id=%s error=%s", seq.job.request_id, e.message)
            return self._image_failed(seq, e.kind, e.message)
        placeholders = seq.pending[: image.n_pos]
        del seq.pending[: image.n_pos]
        self.cache.append(self.cache.slot_of(seq), placeholders)
        seq.n_past = end
        decode_log.info(
            "image evaluated request_id=%s slot=%d tokens=%d elapsed_s=%.3f",
            seq.job.request_id,
            seq.slot,
            image.n_tokens,
            time.monotonic() - started,
        )
        return ImageOutcome.EVALUATED

    def _image_failed(self, seq: SlotSequence, kind: GenerationError, message: str) -> ImageOutcome:
        """End the request; its slot's cache may hold half an image, so it goes too."""
        self.outbox.error(seq.job.request_id, kind, message)
        slot = self.cache.slot_of(seq)
        self.cache.release(slot)
        self.cache.forget(slot)
        return ImageOutcome.FAILED

    def undo(self) -> None:
        """Take back what :meth:`fill` added (llama.cpp evaluated none of it)."""
        cache = self.cache
        for seq, tokens, added in reversed(self._log):
            slot = cache.slot_of(seq)
            cache.truncate(slot, len(slot.tokens) - len(tokens))
            seq.n_past -= len(tokens)
            if added is Added.NEXT_TOKEN:
                seq.next_token = tokens[0]
            else:
                seq.pending[0:0] = tokens
        self._log.clear()
