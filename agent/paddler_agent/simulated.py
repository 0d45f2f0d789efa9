"""The simulated engine: real agent, no model.

Its slots emit deterministic tokens at a set rate, like a batched engine: every
step (``1 / tokens_per_second`` seconds) each busy slot yields one token. It
serves as soon as it registers. Use it to load-test a balancer without weights;
its metadata reports the most slots it ever had busy, so tests can check the
balancer never over-commits it.

Model swaps behave like the llama engine's, without weights: a new model takes
``load_time`` seconds to "load" (slots_total 0 meanwhile, after the in-flight
requests finish), and once a model is set every reply starts with the model's
file name (``one.gguf: Paddler balances ...``), so a test can tell which model
answered. It reads no weights, so a model path that does not exist is accepted;
a ``LocalToAgent`` file that exists but is not a GGUF (no ``GGUF`` magic) cannot
be loaded: an issue, ``AttemptedAndNotAppliable``, and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from paddler_agent.engine import Engine, EngineHost, StatusBoard
from paddler_core.agent_issues import AgentIssueVariant
from paddler_core.desired_state import BalancerDesiredState, ModelSource
from paddler_core.embeddings import normalize_embedding
from paddler_core.generated_output import TokenCounts, done, embedding, embedding_done, generated_token
from paddler_core.inference import ContinueFromRawPromptParams, GrammarConstraint, JsonSchemaGrammar
from paddler_core.protocol import AgentIssue, EmbedMessage, GenerateMessage, StateApplicationStatus

log = logging.getLogger(__name__)

VOCABULARY = (
    "Paddler",
    " balances",
    " requests",
    " across",
    " agents",
    " with",
    " free",
    " slots",
    " and",
    " buffers",
    " them",
    " while",
    " none",
    " is",
    " free",
    ".",
)
EMBEDDING_DIMENSION = 16


@dataclass(eq=False)
class _Sequence:
    request_id: str
    offset: int
    limit: int
    prompt_tokens: int
    received_ns: int
    model_file: str | None = None
    """The file name of the model serving this request: the reply's first token."""
    produced: int = 0
    first_token_ns: int | None = None
    script: list[str] | None = None
    """Fixed output (a JSON-schema grammar's example value) instead of the vocabulary."""


@dataclass
class _Counters:
    peak_processing: int = 0
    held_requests: int = 0
    completed: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class SimulatedEngine(Engine):
    def __init__(
        self,
        host: EngineHost,
        board: StatusBoard,
        slots: int,
        *,
        tokens_per_second: float = 100.0,
        max_tokens: int = 100,
        load_time: float = 0.0,
    ) -> None:
        super().__init__(host, board, slots)
        self.step_s = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.max_tokens = max_tokens
        self.load_time = load_time
        self.model_file: str | None = None
        self._loading = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.active: dict[str, _Sequence] = {}
        self.waiting: deque[_Sequence] = deque()
        self.counters = _Counters()
        self._loop_task: asyncio.Task[None] | None = None
        board.slots_total = slots
        board.state_application_status = StateApplicationStatus.APPLIED

    async def apply_desired_state(self, state: BalancerDesiredState) -> None:
        board = self.board
        model_path = None if state.model.is_none else state.model.describe()
        if model_path != board.model_path or self._loading:
            problem = await asyncio.to_thread(_load_problem, state.model)
            if problem is not None:
                log.warning("model cannot be loaded model=%s problem=%s", model_path, problem)
                board.issues = [
                    AgentIssue(variant=AgentIssueVariant.MODEL_CANNOT_BE_LOADED, params={"message": problem})
                ]
                board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
                self._serve()  # the old model keeps serving
                return
            if self.load_time > 0 and model_path is not None:
                self._loading = True
                board.slots_total = 0
                self.host.status_changed()
                log.info("draining before the swap in_flight=%d", len(self.active))
                await self._idle.wait()
                log.info("loading model=%s load_time=%.1fs", model_path, self.load_time)
                await asyncio.sleep(self.load_time)
        board.model_path = model_path
        self.model_file = model_path.rsplit("/", 1)[-1] if model_path is not None else None
        board.issues = []
        board.state_application_status = StateApplicationStatus.APPLIED
        self._serve()
        log.info("model applied model=%s", model_path)

    def _serve(self) -> None:
        self._loading = False
        self.board.slots_total = self.slots
        self.host.status_changed()
        self._admit_waiting()

    def generate(self, message: GenerateMessage) -> None:
        params = message.params
        if isinstance(params, ContinueFromRawPromptParams):
            prompt = params.raw_prompt
        else:
            prompt = str([m.model_dump(mode="json", exclude_defaults=True) for m in params.conversation_history])
        seed = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "big")
        script = _grammar_script(params.grammar)
        limit = max(1, min(params.max_tokens, self.max_tokens))
        seq = _Sequence(
            request_id=message.request_id,
            offset=seed % len(VOCABULARY),
            limit=limit if script is None else min(limit, len(script)),
            prompt_tokens=max(1, len(prompt) // 4),
            received_ns=time.monotonic_ns(),
            script=script,
            model_file=self.model_file,
        )
        if len(self.active) >= self.slots or self._loading:
            # The balancer sent more than our slots: hold it (and count it: a bug upstream).
            self.counters.held_requests += 1
            log.warning("request beyond slots held request_id=%s", message.request_id)
            self.waiting.append(seq)
            return
        self._admit(seq)

    def _admit(self, seq: _Sequence) -> None:
        self.active[seq.request_id] = seq
        self.counters.peak_processing = max(self.counters.peak_processing, len(self.active))
        self._slots_changed()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run_steps(), name="simulated-steps")

    def stop(self, request_id: str) -> None:
        if self.active.pop(request_id, None) is not None:
            self._slots_changed()
            self._admit_waiting()
        else:
            self.waiting = deque(s for s in self.waiting if s.request_id != request_id)

    def embed(self, message: EmbedMessage) -> None:
        params = message.params
        method = params.normalization_method
        for doc in params.input_batch:
            vector = normalize_embedding(_embedding_of(doc.content), method)
            self.host.emit(message.request_id, embedding(doc.id, vector, method, "Mean"), False)
        self.host.emit(message.request_id, embedding_done(), True)

    def model_metadata(self) -> dict[str, str]:
        return {
            "general.name": "simulated",
            "simulated.slots": str(self.slots),
            "simulated.peak_slots_processing": str(self.counters.peak_processing),
            "simulated.requests_beyond_slots": str(self.counters.held_requests),
            "simulated.completed_requests": str(self.counters.completed),
        }

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task

    async def _run_steps(self) -> None:
        next_step = time.monotonic()
        while self.active:
            next_step += self.step_s
            delay = next_step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_step = time.monotonic()
                await asyncio.sleep(0)
            self._step()

    def _step(self) -> None:
        finished = []
        now = time.monotonic_ns()
        for seq in list(self.active.values()):
            if seq.script is not None:
                # A grammar's example value stays valid JSON: no model-file prefix.
                text = seq.script[seq.produced]
            else:
                position = seq.produced - (seq.model_file is not None)
                text = f"{seq.model_file}: " if position < 0 else VOCABULARY[(seq.offset + position) % len(VOCABULARY)]
            seq.produced += 1
            if seq.first_token_ns is None:
                seq.first_token_ns = now
            self.host.emit(seq.request_id, generated_token(text), False)
            if seq.produced >= seq.limit:
                finished.append(seq)
        for seq in finished:
            del self.active[seq.request_id]
            self.counters.completed += 1
            usage = TokenCounts(content=seq.produced).usage(prompt_tokens=seq.prompt_tokens, cached_prompt_tokens=0)
            self.host.emit(seq.request_id, done(usage, _timings(seq)), True)
        if finished:
            self._slots_changed()
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.active) < self.slots and not self._loading:
            self._admit(self.waiting.popleft())

    def _slots_changed(self) -> None:
        self.board.slots_processing = len(self.active)
        if self.active:
            self._idle.clear()
        else:
            self._idle.set()
        self.host.status_changed()


def _load_problem(model: ModelSource) -> str | None:
    """Why the simulated engine cannot "load" ``model`` (a file that is not a GGUF), or None."""
    if model.kind != "LocalToAgent" or model.local_path is None:
        return None
    try:
        with open(model.local_path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        return None  # no weights needed: a path that does not exist is simulated
    except OSError as err:
        return f"{model.local_path} cannot be read: {err}"
    if magic != b"GGUF":
        return f"{model.local_path} is not a GGUF file (no GGUF magic); it cannot be loaded"
    return None


def _timings(seq: _Sequence) -> dict[str, Any]:
    """Agent-side timestamps (CLOCK_MONOTONIC ns, comparable across local processes)."""
    return {"received_ns": seq.received_ns, "first_token_ns": seq.first_token_ns}


def _embedding_of(text: str) -> list[float]:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=EMBEDDING_DIMENSION).digest()
    return [(b - 127.5) / 127.5 for b in digest]


def _grammar_script(grammar: GrammarConstraint | None) -> list[str] | None:
    """A JSON-schema grammar's output as tokens of up to 4 characters: the schema's
    simplest valid value, so forced tool calls and structured output parse."""
    if not isinstance(grammar, JsonSchemaGrammar):
        return None
    try:
        schema = json.loads(grammar.schema_value)
    except json.JSONDecodeError:
        return None
    text = json.dumps(schema_example(schema))
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def schema_example(schema: Any, depth: int = 0) -> Any:
    """The simplest value a JSON schema accepts (const, first enum/anyOf choice, every
    property of an object, one item of an array); bounded in depth."""
    if not isinstance(schema, dict) or depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return schema_example(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0] if kind else None
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        return {name: schema_example(sub, depth + 1) for name, sub in properties.items()}
    if kind == "array":
        return [schema_example(schema.get("items", {"type": "string"}), depth + 1)]
    if kind == "string":
        return "x" * max(1, int(schema.get("minLength", 1)))
    if kind in ("integer", "number"):
        value = schema.get("minimum", 1)
        return min(value, schema["maximum"]) if "maximum" in schema else value
    if kind == "boolean":
        return True
    return None
