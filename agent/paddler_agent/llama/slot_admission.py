"""Admission and slot assignment: requests are prepared as they arrive, wait in arrival
order, and start in a free slot (reusing the longest cached prefix) once the KV cache
has room for their prompt; preempted sequences resume before anything new starts."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence
from enum import Enum

from paddler_agent.llama.commands import Generate
from paddler_agent.llama.errors import RequestError
from paddler_agent.llama.jobs import Job, Settings, Slot, SlotSequence, decode_log
from paddler_agent.llama.kv_policy import pick_slot
from paddler_agent.llama.multimodal import is_placeholder
from paddler_agent.llama.native import Runtime
from paddler_agent.llama.outbox import Outbox
from paddler_agent.llama.prompts import JobPreparer
from paddler_agent.llama.sampling import FastSampler, GrammarSampler, Sampler
from paddler_agent.llama.slot_cache import SlotCache
from paddler_agent.llama.text_stream import TextStream
from paddler_agent.tool_calls import OutputClassifier
from paddler_core.desired_state import InferenceParameters
from paddler_core.inference import GenerationError


class SamplerKind(Enum):
    """Which sampler a request gets: the fast one where its parameters allow, with a
    grammar on top when it has one; llama.cpp's full chain otherwise."""

    FAST = "fast"
    GRAMMAR = "grammar"
    FULL = "full"


def sampler_kind(params: InferenceParameters, grammar: tuple[str, str] | None) -> SamplerKind:
    if not FastSampler.suits(params):
        return SamplerKind.FULL
    if grammar is not None:
        return SamplerKind.GRAMMAR
    return SamplerKind.FAST


def sampled_prompt(prompt: Sequence[int]) -> list[int]:
    """The prompt tokens a sampler's penalties see: the text, not the images' placeholders."""
    return [t for t in prompt if not is_placeholder(t)]


class StartOutcome(Enum):
    STARTED = "started"
    NO_ROOM = "no_room"
    """The KV cache has no room for the prompt yet: it waits (and so do those behind it)."""
    FAILED = "failed"
    """The request could not start and was answered with an error."""


class Admission:
    """The waiting requests of one decode thread, and their start in a slot."""

    def __init__(self, runtime: Runtime, settings: Settings, cache: SlotCache, outbox: Outbox) -> None:
        self.runtime = runtime
        self.preparer = JobPreparer(runtime, settings)
        self.cache = cache
        self.outbox = outbox
        self.max_running = runtime.config.slots
        self.waiting: deque[Job] = deque()
        self._arrivals = itertools.count()
        self.prompt_tokens = (0, 0)
        """(reused, evaluated) prompt tokens of requests started since the last status delta."""

    def queue(self, command: Generate) -> None:
        """Prepare a request when it arrives, so one that can never run (a prompt longer
        than the whole KV cache, a broken template) is answered before it waits."""
        message = command.message
        try:
            job = self.preparer.prepare(message, command.rendered, command.images)
        except RequestError as e:
            self.reject(message.request_id, e)
            return
        except Exception as e:  # one request's failure must not stop the loop
            self._failed_to_start(message.request_id, e)
            return
        job.order = next(self._arrivals)
        self.waiting.append(job)

    def reject(self, request_id: str, error: RequestError) -> None:
        decode_log.info("request rejected request_id=%s kind=%s message=%s", request_id, error.kind, error.message)
        self.outbox.error(request_id, error.kind, error.message, error.error_kind)

    def cancel(self, request_id: str) -> None:
        for job in self.waiting:
            if job.request_id == request_id:
                job.free_media()
        self.waiting = deque(m for m in self.waiting if m.request_id != request_id)

    def fail_all(self, message: str) -> None:
        for job in self.waiting:
            self.outbox.error(job.request_id, GenerationError.SAMPLER_ERROR, message)
            job.free_media()
        self.waiting.clear()

    def admit(self) -> None:
        """Resume preempted sequences, then start waiting requests, oldest first, while
        a slot is free and the KV cache has room for the prompt; the first one that does
        not fit waits (and so do the ones behind it)."""
        for seq in self.cache.parked():
            if not self.cache.resume(seq):
                return
        while self.waiting:
            free = self.cache.free()
            if not free or len(self.cache.slots) - len(free) >= self.max_running:
                return
            if self._try_start(self.waiting[0], free) is StartOutcome.NO_ROOM:
                return
            self.waiting.popleft()

    def _try_start(self, job: Job, free: list[Slot]) -> StartOutcome:
        try:
            return self._start(job, free)
        except RequestError as e:
            job.free_media()
            self.reject(job.request_id, e)
        except Exception as e:  # one request's failure must not stop the loop
            job.free_media()
            for slot in self.cache.slots:
                if slot.seq is not None and slot.seq.job.request_id == job.request_id:
                    self.cache.release(slot)
            self._failed_to_start(job.request_id, e)
        return StartOutcome.FAILED

    def _failed_to_start(self, request_id: str, error: Exception) -> None:
        """Answer a request that met a bug (not a RequestError): logged with its traceback."""
        decode_log.exception("request failed to start request_id=%s", request_id)
        text = f"the request failed to start: {type(error).__name__}: {error}"
        self.outbox.error(request_id, GenerationError.SAMPLER_ERROR, text)

    def _start(self, job: Job, free: list[Slot]) -> StartOutcome:
        """Start ``job`` in one of the ``free`` slots (nothing changes when the KV cache
        has no room for its prompt yet, but idle slots' caches may be gone)."""
        cache = self.cache
        slot, shared = pick_slot(job.prompt, free)
        donor, reuse = cache.plan(job.prompt, slot, shared)
        if not cache.room_for(job.prompt, slot, donor, reuse):
            return StartOutcome.NO_ROOM
        sampler = self._sampler(job)
        cache.apply_prefix(slot, donor, reuse)
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
        reused, evaluated = self.prompt_tokens
        self.prompt_tokens = (reused + reuse, evaluated + len(job.prompt) - reuse)
        decode_log.info(
            "request start request_id=%s slot=%d prompt_tokens=%d cached_tokens=%d",
            job.request_id,
            slot.index,
            len(job.prompt),
            reuse,
        )
        return StartOutcome.STARTED

    def _sampler(self, job: Job) -> Sampler | FastSampler:
        model = self.runtime.model
        n_ctx = self.runtime.gen.n_ctx_seq
        sampler: Sampler | FastSampler
        match sampler_kind(job.params, job.grammar):
            case SamplerKind.FULL:
                sampler = Sampler(model, job.params, job.seed, job.grammar, n_ctx)
            case SamplerKind.GRAMMAR:
                assert job.grammar is not None  # the kind of a request with a grammar
                sampler = GrammarSampler(model, job.params, job.seed, job.grammar, n_ctx)
            case SamplerKind.FAST:
                sampler = FastSampler(model.n_vocab, job.params, job.seed, n_ctx)
        sampler.accept_prompt(job.prompt if job.media is None else sampled_prompt(job.prompt))
        return sampler
