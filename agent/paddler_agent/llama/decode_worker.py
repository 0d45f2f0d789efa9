"""The decode loop of one loaded model: :class:`DecodeWorker` (continuous batching, run on
its :class:`~paddler_agent.llama.native_thread.NativeThread`).

One step of the loop goes through its phases, each in a module of its own, the way
Paddler's continuous-batch scheduler is laid out:

* admission and slot assignment: :mod:`paddler_agent.llama.slot_admission`;
* the shared KV cache (prefix reuse, eviction, preemption): :mod:`paddler_agent.llama.slot_cache`;
* embeddings, a batch of documents a step: :mod:`paddler_agent.llama.embedding_queue`;
* prompt ingestion (the step's batch, images): :mod:`paddler_agent.llama.prefill`;
* the token step (sampling, then what the token does): here, deciding with
  :mod:`paddler_agent.llama.token_step` and answering through :mod:`paddler_agent.llama.outbox`;
* finishing and cancelling: here, at the end of this module.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from paddler_agent.images import DecodedImage
from paddler_agent.llama.commands import Cancel, Command, Embed, Generate
from paddler_agent.llama.embedding_queue import EmbeddingQueue
from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import Deliver, Settings, SlotSequence, StatusDelta, decode_log
from paddler_agent.llama.native import Runtime
from paddler_agent.llama.outbox import Outbox
from paddler_agent.llama.prefill import BatchEntry, BatchFiller
from paddler_agent.llama.slot_admission import Admission
from paddler_agent.llama.slot_cache import SlotCache
from paddler_agent.llama.status_report import LoopStatus, StatusReporter
from paddler_agent.llama.token_step import TokenOutcome, outcome_after_token
from paddler_core.inference import GenerationError
from paddler_core.protocol import EmbedMessage, GenerateMessage

HEARTBEAT_INTERVAL_S = 1.0
"""An idle decode loop wakes this often to stamp ``DecodeWorker.heartbeat`` (the agent's ``/live``)."""
DECODE_NO_ROOM = 1
"""``llama_decode``'s code for a batch the KV cache has no room for (nothing was evaluated)."""


class DecodeWorker:
    """The decode loop of one loaded model (run on its NativeThread)."""

    def __init__(self, runtime: Runtime, settings: Settings, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.runtime = runtime
        self.model = runtime.model
        self.gen = runtime.gen
        self._loop = loop
        self._deliver = deliver
        self._out = Outbox()
        self._cache = SlotCache(runtime.gen, runtime.config.sequences)
        self._admission = Admission(runtime, settings, self._cache, self._out)
        self._filler = BatchFiller(runtime, self._cache, self._out)
        self._embeds = EmbeddingQueue(runtime, self._out.emit)
        self._reporter = StatusReporter()
        self._empty_steps = 0
        self._stalled = False
        """Two steps in a row could do nothing: sleep until a command arrives (a guard
        against spinning; admission always has room once nothing runs)."""
        self._inbox: deque[Command] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.steps = 0
        self.heartbeat = time.monotonic()
        """``time.monotonic()`` of the loop's last turn, also while idle (read by ``/live``)."""

    # -- called from the event loop -----------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._admission.preparer.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A settings change (group defaults, template) applies to the requests prepared next."""
        self._admission.preparer.settings = settings

    def submit(
        self,
        message: GenerateMessage | EmbedMessage,
        rendered: str | None = None,
        images: list[DecodedImage] | None = None,
    ) -> None:
        """Queue a request; ``rendered`` is a conversation's prompt, rendered beforehand
        (templates never run on this thread), with its decoded ``images`` in the order
        of the projector's markers in it."""
        if isinstance(message, EmbedMessage):
            self._post(Embed(message))
        else:
            self._post(Generate(message, rendered, images))

    def cancel(self, request_id: str) -> None:
        self._post(Cancel(request_id))

    def request_stop(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()

    def _post(self, command: Command) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    # -- the decode thread --------------------------------------------------------------------

    def run(self) -> None:
        decode_log.info(
            "decode loop start slots=%d kv_cache_tokens=%d n_batch=%d",
            len(self._cache.slots),
            self.gen.n_ctx_seq,
            self.gen.n_batch,
        )
        try:
            while self._wait_for_work():
                self._step()
                self._flush()
        except Exception as e:
            decode_log.exception("decode loop crashed")
            self._fail_all("decode loop crashed; see the agent log")
            self._flush()
            self._report_stopped(f"{type(e).__name__}: {e}")
        finally:
            for slot in self._cache.slots:
                self._cache.release(slot)
            for job in self._admission.waiting:
                job.free_media()
            decode_log.info("decode loop stop steps=%d", self.steps)

    def _report_stopped(self, error: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, [], StatusDelta(loop_stopped=error))
        except RuntimeError:
            decode_log.warning("event loop closed; decode loop stop not reported")

    def _wait_for_work(self) -> bool:
        with self._wake:
            while not self._closing and not self._inbox and not self._has_work():
                self.heartbeat = time.monotonic()
                self._wake.wait(HEARTBEAT_INTERVAL_S)
            self.heartbeat = time.monotonic()
            if self._closing:
                return False
            inbox = list(self._inbox)
            self._inbox.clear()
        if inbox:
            self._stalled = False
            self._empty_steps = 0
        for command in inbox:
            self._handle_command(command)
        return True

    def _has_work(self) -> bool:
        if self._stalled:
            return False
        return bool(self._embeds) or bool(self._admission.waiting) or self._cache.busy() > 0

    def _handle_command(self, command: Command) -> None:
        match command:
            case Generate():
                self._admission.queue(command)
            case Embed(message):
                self._embeds.append(message)
            case Cancel(request_id):
                self._cancel(request_id)

    def _step(self) -> None:
        self._admission.admit()
        embedded = bool(self._embeds)
        if embedded:
            self._embeds.run_one_batch()
        while (full := self._cache.make_room()) is not None:
            self._context_full(full)
        entries = self._filler.fill()
        if not entries:
            # The first empty step may have freed room (a sequence ended) for the next
            # one to admit a request; a second one in a row can change nothing.
            self._empty_steps = 0 if embedded else self._empty_steps + 1
            if self._empty_steps >= 2 and self._has_work():
                decode_log.warning("decode loop stalled: nothing can run until a command arrives")
                self._stalled = True
            return
        self._empty_steps = 0
        self.steps += 1
        rc = self.gen.batch.decode(self.gen.handle)
        if rc != 0:
            self._decode_failed(rc, entries)
            return
        for seq, index in entries:
            if index is not None and self._cache.holds(seq):
                self._on_logits(seq, index)

    def _flush(self) -> None:
        admission = self._admission
        status = LoopStatus(
            slots_processing=self._cache.busy(),
            prefix_hashes=self._cache.prefix_hashes(),
            kv_cache_tokens_used=self._cache.ledger.used,
            prompt_tokens=admission.prompt_tokens,
        )
        admission.prompt_tokens = (0, 0)
        delta = self._reporter.delta(status)
        if not self._out and delta is None:
            return
        out = self._out.take()
        try:
            self._loop.call_soon_threadsafe(self._deliver, out, delta)
        except RuntimeError:
            decode_log.warning("event loop closed; dropped payloads count=%d", len(out))

    def _decode_failed(self, rc: int, entries: list[BatchEntry]) -> None:
        if rc == DECODE_NO_ROOM:
            # The ledger should prevent it; a cache type it does not model (e.g.
            # sliding-window) may not: nothing was evaluated, so undo the step and
            # preempt the youngest sequence.
            decode_log.warning(
                "llama_decode found no KV cache room sequences=%d used=%d", len(entries), self._cache.ledger.used
            )
            self._filler.undo()
            full = self._cache.shed()
            if full is not None:
                self._context_full(full)
            return
        decode_log.error("llama_decode failed code=%d sequences=%d", rc, len(entries))
        for seq, _ in entries:
            if self._cache.holds(seq):
                slot = self._cache.slot_of(seq)
                self._out.error(
                    seq.job.request_id, GenerationError.SAMPLER_ERROR, f"llama_decode failed with code {rc}"
                )
                self._cache.release(slot)
                self._cache.forget(slot)

    # -- the token step -----------------------------------------------------------------------

    def _on_logits(self, seq: SlotSequence, index: int) -> None:
        try:
            token = seq.sampler.sample(self.gen.handle, index)
        except RequestError as e:
            self._out.flush_text(seq)
            self._out.error(seq.job.request_id, e.kind, e.message, e.error_kind)
            self._cache.release(self._cache.slot_of(seq))
            return
        end_of_generation = self.model.is_eog(token)
        if not end_of_generation:
            seq.generated += 1
            seq.tally.sampled()
            self._out.text(seq, seq.text.push(self.model.piece(token)))
        outcome = outcome_after_token(
            end_of_generation=end_of_generation,
            stopped=seq.text.stopped,
            generated=seq.generated,
            max_tokens=seq.job.max_tokens,
            n_past=seq.n_past,
            n_ctx=self.gen.n_ctx_seq,
        )
        match outcome:
            case TokenOutcome.FINISHED:
                self._finish(seq)
            case TokenOutcome.CONTEXT_FULL:
                self._context_full(seq)
            case TokenOutcome.CONTINUE:
                seq.next_token = token

    # -- finishing and cancelling -------------------------------------------------------------

    def _finish(self, seq: SlotSequence) -> None:
        self._out.finished(seq)
        decode_log.info(
            "request done request_id=%s slot=%d prompt_tokens=%d cached_tokens=%d generated=%d elapsed_s=%.3f",
            seq.job.request_id,
            seq.slot,
            len(seq.job.prompt),
            seq.cached,
            seq.generated,
            time.monotonic() - seq.started,
        )
        self._cache.release(self._cache.slot_of(seq))

    def _context_full(self, seq: SlotSequence) -> None:
        self._out.context_full(seq, self.gen.n_ctx_seq)
        decode_log.info("request context full request_id=%s slot=%d", seq.job.request_id, seq.slot)
        self._cache.release(self._cache.slot_of(seq))

    def _cancel(self, request_id: str) -> None:
        self._admission.cancel(request_id)
        self._embeds.cancel(request_id)
        for slot in self._cache.slots:
            if slot.seq is not None and slot.seq.job.request_id == request_id:
                decode_log.info(
                    "request cancelled request_id=%s slot=%d generated=%d", request_id, slot.index, slot.seq.generated
                )
                self._cache.release(slot)

    def _fail_all(self, message: str) -> None:
        for slot in self._cache.slots:
            if slot.seq is not None:
                self._out.error(slot.seq.job.request_id, GenerationError.SAMPLER_ERROR, message)
                self._cache.release(slot)
        self._admission.fail_all(message)
