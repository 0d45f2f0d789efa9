"""The decode thread of one loaded model: :class:`NativeThread` (load, warm-up, loop, free) and
:class:`DecodeWorker` (continuous batching, prefix reuse, KV-cache room, embeddings)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

from paddler_agent.images import DecodedImage
from paddler_agent.kv_cache import KvLedger
from paddler_agent.llama.commands import Cancel, Command, Embed, Generate
from paddler_agent.llama.embedding_queue import EmbeddingQueue
from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import (
    Deliver,
    Emit,
    Job,
    Payload,
    Settings,
    Slot,
    SlotSequence,
    StatusDelta,
)
from paddler_agent.llama.kv_policy import cells_to_start, eviction_order, pick_slot, prefix_plan
from paddler_agent.llama.multimodal import (
    ImageChunk,
    is_placeholder,
)
from paddler_agent.llama.native import LoadConfig, Runtime
from paddler_agent.llama.prompts import JobPreparer
from paddler_agent.llama.sampling import FastSampler, GrammarSampler, Sampler
from paddler_agent.llama.text_stream import TextStream
from paddler_agent.tool_calls import OutputClassifier, parse_tool_calls
from paddler_core.inference import (
    ErrorKind,
    GenerationError,
    done_payload,
    generated_error_payload,
    token_payload,
    usage_dict,
)
from paddler_core.protocol import (
    EmbedMessage,
    GenerateMessage,
)

logger = logging.getLogger(__name__)


MAX_PREFIX_HASHES = 4096
HEARTBEAT_INTERVAL_S = 1.0
"""An idle decode loop wakes this often to stamp ``DecodeWorker.heartbeat`` (the agent's ``/live``)."""


class NativeThread:
    """The one thread that touches a model: load, warm-up, decode loop, free.

    llama.cpp's CPU backend runs its graph with OpenMP, which keeps a team of
    spinning worker threads per calling thread; a second thread that has ever
    decoded (e.g. a warm-up in an executor thread) keeps its team alive and halved
    the decode loop's speed on 2 cores. So everything native for one model happens
    on this thread.
    """

    def __init__(
        self, config: LoadConfig, settings: Settings, loop: asyncio.AbstractEventLoop, deliver: Deliver
    ) -> None:
        self.config = config
        self.settings = settings
        self.worker: DecodeWorker | None = None
        self._loop = loop
        self._deliver = deliver
        self._ready: asyncio.Future[Runtime] = loop.create_future()
        self._thread = threading.Thread(target=self._main, name="llama-native", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def ready(self) -> Runtime:
        """The loaded runtime once warm and serving; raises what loading raised."""
        return await self._ready

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop and free the model (blocking; call from a worker thread)."""
        if self.worker is not None:
            self.worker.request_stop()
        self._thread.join()

    def _main(self) -> None:
        try:
            runtime = Runtime.load(self.config)
            worker = DecodeWorker(runtime, self.settings, self._loop, self._deliver)
        except BaseException as e:
            self._resolve(e)
            return
        self.worker = worker
        self._resolve(runtime)
        try:
            worker.run()
        finally:
            runtime.free()
            logger.info("model freed path=%s", self.config.path)

    def _resolve(self, outcome: Runtime | BaseException) -> None:
        def settle() -> None:
            if self._ready.done():
                return
            if isinstance(outcome, BaseException):
                self._ready.set_exception(outcome)
            else:
                self._ready.set_result(outcome)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            logger.warning("event loop closed before the model was ready")


class DecodeWorker:
    """The decode loop of one loaded model (run on its NativeThread)."""

    def __init__(self, runtime: Runtime, settings: Settings, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self.runtime = runtime
        self.model = runtime.model
        self.gen = runtime.gen
        self._preparer = JobPreparer(runtime, settings)
        self._loop = loop
        self._deliver = deliver
        self._slots = [Slot(i) for i in range(runtime.config.sequences)]
        """Sequence ids of the unified KV cache: at most ``_max_running`` run at once; the
        others keep idle conversations cached until their room is needed (LRU)."""
        self._max_running = runtime.config.slots
        self._ledger = KvLedger(self.gen.n_ctx_seq, runtime.config.sequences)
        self._prompt_tokens = (0, 0)
        """(reused, evaluated) prompt tokens of requests started since the last status delta."""
        self._waiting: deque[Job] = deque()
        self._arrivals = itertools.count()
        self._step_log: list[tuple[SlotSequence, list[int], bool]] = []
        """What this step's batch added per sequence (tokens, from next_token), to undo
        it when llama.cpp finds no room for the batch."""
        self._empty_steps = 0
        self._stalled = False
        """Two steps in a row could do nothing: sleep until a command arrives (a guard
        against spinning; admission always has room once nothing runs)."""
        self._embeds = EmbeddingQueue(runtime, self._emit)
        self._inbox: deque[Command] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._out: list[Emit] = []
        self._busy_reported = 0
        self._hashes_reported: list[str] = []
        self._kv_reported = 0
        self.steps = 0
        self.heartbeat = time.monotonic()
        """``time.monotonic()`` of the loop's last turn, also while idle (read by ``/live``)."""

    # -- called from the event loop -----------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._preparer.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A settings change (group defaults, template) applies to the requests prepared next."""
        self._preparer.settings = settings

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
        logger.info(
            "decode loop start slots=%d kv_cache_tokens=%d n_batch=%d",
            len(self._slots),
            self.gen.n_ctx_seq,
            self.gen.n_batch,
        )
        try:
            while self._wait_for_work():
                self._step()
                self._flush()
        except Exception as e:
            logger.exception("decode loop crashed")
            self._fail_all("decode loop crashed; see the agent log")
            self._flush()
            self._report_stopped(f"{type(e).__name__}: {e}")
        finally:
            self._release_samplers()
            for job in self._waiting:
                job.free_media()
            logger.info("decode loop stop steps=%d", self.steps)

    def _report_stopped(self, error: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, [], StatusDelta(loop_stopped=error))
        except RuntimeError:
            logger.warning("event loop closed; decode loop stop not reported")

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
        return bool(self._embeds) or bool(self._waiting) or any(s.seq is not None for s in self._slots)

    def _handle_command(self, command: Command) -> None:
        match command:
            case Generate():
                self._queue(command)
            case Embed(message):
                self._embeds.append(message)
            case Cancel(request_id):
                self._cancel(request_id)

    def _cancel(self, request_id: str) -> None:
        for job in self._waiting:
            if job.request_id == request_id:
                job.free_media()
        self._waiting = deque(m for m in self._waiting if m.request_id != request_id)
        self._embeds.cancel(request_id)
        for slot in self._slots:
            if slot.seq is not None and slot.seq.job.request_id == request_id:
                logger.info(
                    "request cancelled request_id=%s slot=%d generated=%d", request_id, slot.index, slot.seq.generated
                )
                self._release(slot)

    def _step(self) -> None:
        self._admit_waiting()
        embedded = bool(self._embeds)
        if embedded:
            self._embeds.run_one_batch()
        self._make_room()
        entries = self._fill_batch()
        if not entries:
            # The first empty step may have freed room (a sequence ended) for the next
            # one to admit a request; a second one in a row can change nothing.
            self._empty_steps = 0 if embedded else self._empty_steps + 1
            if self._empty_steps >= 2 and self._has_work():
                logger.warning("decode loop stalled: nothing can run until a command arrives")
                self._stalled = True
            return
        self._empty_steps = 0
        self.steps += 1
        rc = self.gen.batch.decode(self.gen.handle)
        if rc != 0:
            self._decode_failed(rc, entries)
            return
        for seq, index in entries:
            if index is not None and self._slots[seq.slot].seq is seq:
                self._on_logits(seq, index)

    def _flush(self) -> None:
        delta = self._status_delta()
        if not self._out and delta is None:
            return
        out, self._out = self._out, []
        try:
            self._loop.call_soon_threadsafe(self._deliver, out, delta)
        except RuntimeError:
            logger.warning("event loop closed; dropped payloads count=%d", len(out))

    def _status_delta(self) -> StatusDelta | None:
        delta = StatusDelta()
        busy = sum(1 for s in self._slots if s.seq is not None)
        if busy != self._busy_reported:
            self._busy_reported = busy
            delta.slots_processing = busy
        hashes = self._prefix_hashes()
        if hashes != self._hashes_reported:
            self._hashes_reported = hashes
            delta.prefix_hashes = hashes
        used = self._ledger.used
        if used != self._kv_reported:
            self._kv_reported = used
            delta.kv_cache_tokens_used = used
        if self._prompt_tokens != (0, 0):
            delta.prompt_tokens, self._prompt_tokens = self._prompt_tokens, (0, 0)
        if (
            delta.slots_processing is None
            and delta.prefix_hashes is None
            and delta.kv_cache_tokens_used is None
            and delta.prompt_tokens is None
        ):
            return None
        return delta

    def _prefix_hashes(self) -> list[str]:
        keys = {k for slot in self._slots for k in slot.prefix_keys}
        return sorted(keys)[:MAX_PREFIX_HASHES]

    # -- admission ----------------------------------------------------------------------------

    def _queue(self, command: Generate) -> None:
        """Prepare a request when it arrives, so one that can never run (a prompt longer
        than the whole KV cache, a broken template) is answered before it waits."""
        message = command.message
        try:
            job = self._preparer.prepare(message, command.rendered, command.images)
        except RequestError as e:
            self._reject_request(message.request_id, e)
            return
        except Exception as e:  # one request's failure must not stop the loop
            logger.exception("request failed to start request_id=%s", message.request_id)
            text = f"the request failed to start: {type(e).__name__}: {e}"
            self._emit(message.request_id, generated_error_payload(GenerationError.SAMPLER_ERROR, text), True)
            return
        job.order = next(self._arrivals)
        self._waiting.append(job)

    def _reject_request(self, request_id: str, error: RequestError) -> None:
        logger.info("request rejected request_id=%s kind=%s message=%s", request_id, error.kind, error.message)
        self._emit(request_id, generated_error_payload(error.kind, error.message), True, error.error_kind)

    def _admit_waiting(self) -> None:
        """Resume preempted sequences, then start waiting requests, oldest first, while
        a slot is free and the KV cache has room for the prompt; the first one that does
        not fit waits (and so do the ones behind it)."""
        for seq in sorted(self._parked(), key=lambda q: q.job.order):
            if not self._resume(seq):
                return
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free or len(self._slots) - len(free) >= self._max_running:
                return
            job = self._waiting[0]
            try:
                started = self._start(job, free)
            except RequestError as e:
                self._waiting.popleft()
                job.free_media()
                self._reject_request(job.request_id, e)
                continue
            except Exception as e:  # one request's failure must not stop the loop
                self._waiting.popleft()
                job.free_media()
                logger.exception("request failed to start request_id=%s", job.request_id)
                for slot in self._slots:
                    if slot.seq is not None and slot.seq.job.request_id == job.request_id:
                        self._release(slot)
                text = f"the request failed to start: {type(e).__name__}: {e}"
                self._emit(job.request_id, generated_error_payload(GenerationError.SAMPLER_ERROR, text), True)
                continue
            if not started:
                return
            self._waiting.popleft()

    def _start(self, job: Job, free: list[Slot]) -> bool:
        """Start ``job`` in one of the ``free`` slots; False when the KV cache has no room
        for its prompt yet (nothing changed then, but idle slots' caches may be gone)."""
        slot, shared = pick_slot(job.prompt, free)
        donor, reuse = self._prefix_plan(job.prompt, slot, shared)
        if not self._room_for(job.prompt, slot, donor, reuse):
            return False
        sampler: Sampler | FastSampler
        if not FastSampler.suits(job.params):
            sampler = Sampler(self.model, job.params, job.seed, job.grammar, self.gen.n_ctx_seq)
        elif job.grammar is not None:
            sampler = GrammarSampler(self.model, job.params, job.seed, job.grammar, self.gen.n_ctx_seq)
        else:
            sampler = FastSampler(self.model.n_vocab, job.params, job.seed, self.gen.n_ctx_seq)
        sampler.accept_prompt(job.prompt if job.media is None else [t for t in job.prompt if not is_placeholder(t)])
        self._apply_prefix(slot, donor, reuse)
        classifier = None
        if job.tools is not None:
            classifier = OutputClassifier(tools=bool(job.tools), start_in_reasoning=job.starts_in_reasoning)
        slot.seq = SlotSequence(
            job=job,
            slot=slot.index,
            sampler=sampler,
            pending=job.prompt[reuse:],
            cached=reuse,
            n_past=reuse,
            text=TextStream(job.stops),
            classifier=classifier,
        )
        slot.last_used = time.monotonic()
        slot.prefix_keys = job.prefix_keys
        reused, evaluated = self._prompt_tokens
        self._prompt_tokens = (reused + reuse, evaluated + len(job.prompt) - reuse)
        logger.info(
            "request start request_id=%s slot=%d prompt_tokens=%d cached_tokens=%d",
            job.request_id,
            slot.index,
            len(job.prompt),
            reuse,
        )
        return True

    def _prefix_plan(self, prompt: Sequence[int], slot: Slot, shared: int) -> tuple[Slot | None, int]:
        return prefix_plan(prompt, self._slots, slot, shared)

    def _apply_prefix(self, slot: Slot, donor: Slot | None, reuse: int) -> None:
        if donor is not None:
            self.gen.seq_copy(donor.index, slot.index, reuse)
            self._ledger.share(donor.index, slot.index, reuse)
            slot.tokens = donor.tokens[:reuse]
            logger.debug("prefix shared src_slot=%d dst_slot=%d tokens=%d", donor.index, slot.index, reuse)
        else:
            self._truncate(slot, reuse)

    # -- the shared KV cache ------------------------------------------------------------------

    def _running(self) -> list[SlotSequence]:
        """Sequences that hold KV cells (not preempted), oldest first."""
        running = [s.seq for s in self._slots if s.seq is not None and not s.seq.parked]
        running.sort(key=lambda q: q.job.order)
        return running

    def _parked(self) -> list[SlotSequence]:
        return [s.seq for s in self._slots if s.seq is not None and s.seq.parked]

    def _truncate(self, slot: Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            self.gen.seq_truncate(slot.index, keep)
            self._ledger.truncate(slot.index, keep)
            del slot.tokens[keep:]

    def _append(self, slot: Slot, tokens: Sequence[int]) -> None:
        slot.tokens.extend(tokens)
        self._ledger.extend(slot.index, len(tokens))

    def _room_for(self, tokens: Sequence[int], slot: Slot, donor: Slot | None, reuse: int) -> bool:
        """Whether ``slot`` can evaluate ``tokens`` (keeping ``reuse`` of them cached, from
        itself or copied from ``donor``) and then generate, beside what the running
        sequences still need: their unevaluated tokens and a cell each for their next
        token. Evicts idle slots' cached prefixes, least recently used first, while that
        is not enough (an idle donor keeps the prefix it lends)."""
        ledger = self._ledger
        needed = cells_to_start(len(tokens), reuse, ledger.capacity, self._running())
        own_keep = 0 if donor is not None else reuse

        def fits() -> bool:
            return needed <= ledger.free + ledger.freed_by_truncate(slot.index, own_keep)

        if fits():
            return True
        for other in eviction_order(self._slots, keep=slot):
            self._evict(other, reuse if other is donor else 0)
            if fits():
                return True
        return False

    def _evict(self, slot: Slot, keep: int) -> None:
        """Drop an idle slot's cached tokens beyond ``keep`` (its prefix keys go with them)."""
        if keep < len(slot.tokens):
            logger.debug("cached prefix evicted slot=%d tokens=%d kept=%d", slot.index, len(slot.tokens), keep)
            self._truncate(slot, keep)
            slot.prefix_keys = ()

    def _make_room(self) -> None:
        """Give each generating sequence a cell for this step (or, when none generates, a
        prompt chunk at least one): evict idle slots' cached prefixes, least recently
        used first, then preempt the youngest running sequence (it resumes later by
        re-evaluating its tokens). A sequence alone in a full cache has used it up."""
        ledger = self._ledger
        while True:
            running = self._running()
            if not running:
                return
            needed = max(1, sum(1 for q in running if q.next_token is not None))
            if needed <= ledger.free:
                return
            idle = [s for s in self._slots if s.seq is None and ledger.freed_by_truncate(s.index, 0)]
            if idle:
                self._evict(min(idle, key=lambda s: s.last_used), 0)
            elif len(running) == 1:
                self._context_full(running[0])
            else:
                self._park(running[-1])

    def _park(self, seq: SlotSequence) -> None:
        """Preempt ``seq``: free its cells; it keeps its slot, sampler and output state and
        re-evaluates its prompt and generated tokens when it resumes."""
        slot = self._slots[seq.slot]
        history = slot.tokens + seq.pending
        if seq.next_token is not None:
            history.append(seq.next_token)
        seq.pending, seq.next_token, seq.n_past, seq.parked = history, None, 0, True
        self._truncate(slot, 0)
        slot.prefix_keys = ()
        logger.info(
            "request preempted: the KV cache is full request_id=%s slot=%d tokens=%d generated=%d",
            seq.job.request_id,
            slot.index,
            len(history),
            seq.generated,
        )

    def _resume(self, seq: SlotSequence) -> bool:
        """Resume a preempted sequence when the cache has room for all it held."""
        slot = self._slots[seq.slot]
        history = seq.pending
        donor, reuse = self._prefix_plan(history, slot, 0)
        if not self._room_for(history, slot, donor, reuse):
            return False
        self._apply_prefix(slot, donor, reuse)
        seq.pending, seq.n_past, seq.parked = history[reuse:], reuse, False
        slot.prefix_keys = seq.job.prefix_keys
        logger.info(
            "request resumed request_id=%s slot=%d tokens=%d cached_tokens=%d",
            seq.job.request_id,
            slot.index,
            len(history),
            reuse,
        )
        return True

    # -- one step -----------------------------------------------------------------------------

    def _fill_batch(self) -> list[tuple[SlotSequence, int | None]]:
        batch = self.gen.batch
        batch.clear()
        entries: list[tuple[SlotSequence, int | None]] = []
        log = self._step_log
        log.clear()
        running = self._running()
        for seq in running:
            if seq.next_token is not None:
                token = seq.next_token
                index = batch.add([token], seq.n_past, seq.slot, last_logits=True)
                self._append(self._slots[seq.slot], [token])
                seq.n_past += 1
                seq.next_token = None
                entries.append((seq, index))
                log.append((seq, [token], True))
        budget = min(self.gen.n_batch - batch.n, self._ledger.free)
        for seq in running:
            if not seq.pending or budget <= 0:
                continue
            if is_placeholder(seq.pending[0]):
                if not self._eval_image(seq):
                    continue
                budget = min(budget, self._ledger.free)
                if budget <= 0:
                    continue
            chunk = seq.pending[:budget]
            if seq.job.media is not None:  # text up to the next image only
                cut = next((i for i, t in enumerate(chunk) if is_placeholder(t)), None)
                if cut is not None:
                    chunk = chunk[:cut]
            if not chunk:  # another image follows at once: the next step evaluates it
                continue
            del seq.pending[: len(chunk)]
            last = not seq.pending
            index = batch.add(chunk, seq.n_past, seq.slot, last_logits=last)
            self._append(self._slots[seq.slot], chunk)
            seq.n_past += len(chunk)
            budget -= len(chunk)
            entries.append((seq, index if last else None))
            log.append((seq, chunk, False))
        return entries

    def _eval_image(self, seq: SlotSequence) -> bool:
        """Evaluate the image chunk at the head of ``seq.pending`` (outside the step's
        batch: its text before it is already decoded); False when it did not run (no
        room in the KV cache yet, or it failed and the request ended)."""
        media = seq.job.media
        image: ImageChunk | None = media.images.get(seq.pending[0]) if media is not None else None
        slot = self._slots[seq.slot]
        if image is None or media is None:  # a bug: placeholders of no chunk
            self._emit(
                seq.job.request_id,
                generated_error_payload(GenerationError.MULTIMODAL_INGESTION_FAILED, "an image of the prompt was lost"),
                True,
            )
            self._release(slot)
            self._forget_cache(slot)
            return False
        ledger = self._ledger
        idle = [s for s in self._slots if s.seq is None and ledger.freed_by_truncate(s.index, 0)]
        for other in sorted(idle, key=lambda s: s.last_used):
            if ledger.free >= image.n_pos:
                break
            self._evict(other, 0)
        if ledger.free < image.n_pos:
            return False  # running sequences hold the cache: wait for them
        projector = self.runtime.projector
        started = time.monotonic()
        try:
            if projector is None:
                raise RequestError(GenerationError.MULTIMODAL_NOT_SUPPORTED, "the multimodal projector is not loaded")
            end = projector.eval_image(self.gen.handle, image, seq.n_past, seq.slot, self.gen.n_batch)
        except RequestError as e:
            logger.warning("image evaluation failed request_id=%s error=%s", seq.job.request_id, e.message)
            self._emit(seq.job.request_id, generated_error_payload(e.kind, e.message), True)
            self._release(slot)
            self._forget_cache(slot)
            return False
        placeholders = seq.pending[: image.n_pos]
        del seq.pending[: image.n_pos]
        self._append(slot, placeholders)
        seq.n_past = end
        logger.info(
            "image evaluated request_id=%s slot=%d tokens=%d elapsed_s=%.3f",
            seq.job.request_id,
            seq.slot,
            image.n_tokens,
            time.monotonic() - started,
        )
        return True

    def _undo_step(self) -> None:
        """Take back what _fill_batch added (llama.cpp evaluated none of it)."""
        for seq, tokens, was_next in reversed(self._step_log):
            slot = self._slots[seq.slot]
            self._truncate(slot, len(slot.tokens) - len(tokens))
            seq.n_past -= len(tokens)
            if was_next:
                seq.next_token = tokens[0]
            else:
                seq.pending[0:0] = tokens
        self._step_log.clear()

    def _decode_failed(self, rc: int, entries: list[tuple[SlotSequence, int | None]]) -> None:
        if rc == 1:
            # No room in the KV cache for the batch (the ledger should prevent it; a cache
            # type it does not model, e.g. sliding-window, may not): nothing was
            # evaluated, so undo the step and preempt the youngest sequence.
            logger.warning("llama_decode found no KV cache room sequences=%d used=%d", len(entries), self._ledger.used)
            self._undo_step()
            running = self._running()
            if len(running) == 1:
                self._context_full(running[0])
            elif running:
                self._park(running[-1])
            return
        logger.error("llama_decode failed code=%d sequences=%d", rc, len(entries))
        for seq, _ in entries:
            slot = self._slots[seq.slot]
            if slot.seq is seq:
                self._emit(
                    seq.job.request_id,
                    generated_error_payload(GenerationError.SAMPLER_ERROR, f"llama_decode failed with code {rc}"),
                    True,
                )
                self._release(slot)
                self._forget_cache(slot)

    def _on_logits(self, seq: SlotSequence, index: int) -> None:
        try:
            token = seq.sampler.sample(self.gen.handle, index)
        except RequestError as e:
            self._flush_text(seq)
            self._emit(seq.job.request_id, generated_error_payload(e.kind, e.message), True, e.error_kind)
            self._release(self._slots[seq.slot])
            return
        if self.model.is_eog(token):
            self._finish(seq)
            return
        seq.generated += 1
        self._emit_text(seq, seq.text.push(self.model.piece(token)), count=True)
        if seq.text.stopped or seq.generated >= seq.job.max_tokens:
            self._finish(seq)
        elif seq.n_past >= self.gen.n_ctx_seq:
            self._context_full(seq)
        else:
            seq.next_token = token

    def _emit_text(self, seq: SlotSequence, text: str, *, count: bool) -> None:
        """Emit generated text, classified for conversations, and count the token.

        A token counts as the kind of the first piece it emits. One that emits nothing
        (a tag, or text held back) counts as the kind of the next piece emitted: an
        opening ``<think>`` counts as reasoning, the text it opens.
        """
        rid = seq.job.request_id
        pieces = seq.classifier.feed(text) if seq.classifier is not None and text else []
        if seq.classifier is None:
            if text:
                self._emit(rid, token_payload(text), False)
            pieces = [("ContentToken", text)]
        else:
            for piece_kind, piece_text in pieces:
                self._emit(rid, token_payload(piece_text, piece_kind), False)
        if count:
            seq.uncounted += 1
        if pieces and seq.uncounted:
            self._count(seq, pieces[0][0])

    @staticmethod
    def _count(seq: SlotSequence, kind: str) -> None:
        seq.counts[kind] = seq.counts.get(kind, 0) + seq.uncounted
        seq.uncounted = 0

    def _flush_text(self, seq: SlotSequence) -> None:
        """Emit what the stop-string matcher and the classifier held back, and the
        parsed tool calls."""
        self._emit_text(seq, seq.text.flush(), count=False)
        classifier = seq.classifier
        if classifier is None:
            return
        pieces = classifier.finish()
        for piece_kind, piece_text in pieces:
            self._emit(seq.job.request_id, token_payload(piece_text, piece_kind), False)
        if seq.uncounted:
            self._count(seq, pieces[0][0] if pieces else classifier.last_kind)
        if classifier.saw_tool_call and seq.job.parse_tool_calls:
            outcome = parse_tool_calls(classifier.tool_call_text, seq.job.tools or [])
            self._emit(seq.job.request_id, outcome.payload, False)

    def _finish(self, seq: SlotSequence) -> None:
        self._flush_text(seq)
        rid = seq.job.request_id
        usage = usage_dict(
            prompt_tokens=len(seq.job.prompt),
            cached_prompt_tokens=seq.cached,
            content_tokens=seq.counts.get("ContentToken", 0),
            reasoning_tokens=seq.counts.get("ReasoningToken", 0),
            tool_call_tokens=seq.counts.get("ToolCallToken", 0),
            input_image_tokens=seq.job.image_tokens,
        )
        self._emit(rid, done_payload(usage), True)
        elapsed = time.monotonic() - seq.started
        logger.info(
            "request done request_id=%s slot=%d prompt_tokens=%d cached_tokens=%d generated=%d elapsed_s=%.3f",
            rid,
            seq.slot,
            len(seq.job.prompt),
            seq.cached,
            seq.generated,
            elapsed,
        )
        self._release(self._slots[seq.slot])

    def _context_full(self, seq: SlotSequence) -> None:
        self._flush_text(seq)
        rid = seq.job.request_id
        message = (
            f"context full: the agent's KV cache of {self.gen.n_ctx_seq} tokens was used up "
            f"after {seq.generated} generated tokens"
        )
        logger.info("request context full request_id=%s slot=%d", rid, seq.slot)
        self._emit(rid, generated_error_payload(GenerationError.SAMPLER_ERROR, message), True, ErrorKind.CONTEXT_FULL)
        self._release(self._slots[seq.slot])

    def _release(self, slot: Slot) -> None:
        if slot.seq is not None:
            slot.seq.sampler.free()
            slot.seq.job.free_media()
            slot.seq = None
        slot.last_used = time.monotonic()

    def _forget_cache(self, slot: Slot) -> None:
        self.gen.seq_truncate(slot.index, 0)
        self._ledger.truncate(slot.index, 0)
        slot.tokens.clear()
        slot.prefix_keys = ()

    def _release_samplers(self) -> None:
        for slot in self._slots:
            self._release(slot)

    def _fail_all(self, message: str) -> None:
        for slot in self._slots:
            if slot.seq is not None:
                self._emit(
                    slot.seq.job.request_id, generated_error_payload(GenerationError.SAMPLER_ERROR, message), True
                )
                self._release(slot)
        for job in self._waiting:
            self._emit(job.request_id, generated_error_payload(GenerationError.SAMPLER_ERROR, message), True)
            job.free_media()
        self._waiting.clear()

    def _emit(self, request_id: str, payload: Payload, final: bool, error_kind: ErrorKind | None = None) -> None:
        self._out.append((request_id, payload, final, error_kind))
