"""LlamaEngine: the agent's slots on llama.cpp (through llama-cpp-python's low-level API).

This is the only module of the project that imports ``llama_cpp``.

Design
------
* **Continuous batching.** One generation context with ``n_seq_max = slots``; the KV
  cache of slot *i* is sequence id *i*. A decode thread runs steps; each step is one
  ``llama_decode`` of a batch that holds one token per generating sequence plus
  prompt chunks of new sequences, bounded by ``n_batch``. ``llama_decode`` releases
  the GIL, so the event loop stays responsive; the payloads of one step reach the
  loop in one ``loop.call_soon_threadsafe``.
* **One KV cache shared by the slots** (Paddler's and llama-server's semantics):
  ``context_size`` is the whole agent's cache (llama.cpp's unified KV), so one long
  conversation may use far more than ``context_size / slots`` while others are short.
  :class:`KvLedger` mirrors which cells each slot holds. A request starts when a slot
  is free and the cache has room for its prompt beside what the running sequences
  still need; otherwise it waits, oldest first. When generation fills the cache, idle
  slots' cached prefixes are evicted (least recently used first), then the youngest
  running sequence is preempted: its cells are freed and it resumes later by
  re-evaluating its prompt and generated tokens, with its sampler and output state
  intact. A prompt longer than the whole cache is refused on arrival; a sequence alone
  in a full cache ends with "context full" (a length stop).
* **Sampling** per sequence with llama.cpp's sampler chain (grammar, penalties,
  top-k, top-p, min-p, temperature, dist; greedy when temperature is 0).
* **Prefix reuse.** A slot keeps its KV cache after a request. A new request goes to
  the free slot whose cached tokens share the longest prefix with its prompt; a longer
  prefix held by another slot (busy or not) is shared with it (the cells get both
  sequence ids); only the rest is evaluated (``cached_prompt_tokens``). The board's ``prefix_hashes`` lists
  the prefix keys (:func:`paddler_core.prefix.request_prefix_keys`) of the requests
  whose KV cache the slots hold, so the balancer can route repeats here.
* **Output classes.** Conversation requests go through the chat template module and
  their output through :class:`paddler_agent.tool_calls.OutputClassifier`
  (content / reasoning / tool-call tokens, parsed tool calls at the end).
* **Embeddings** run in a second context (embeddings on, explicit pooling type) on
  the same decode thread, one batch between generation steps.
* **Model swap.** Download while the old model serves; then ``slots_total = 0``,
  finish in-flight requests, free the old model, load and warm up the new one,
  serve again. Requests that arrive meanwhile are held and started afterwards. A
  model that cannot be loaded becomes an issue on the board and the previous model
  keeps serving.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp.llama_grammar import json_schema_to_gbnf
from pydantic import ValidationError

from paddler_agent.chat_template import ChatTemplateError, TemplateRenderer, compile_chat_template, render_chat
from paddler_agent.engine import Engine, EngineHost, StatusBoard
from paddler_agent.images import DecodedImage, ImageError, decode_images, image_urls, with_image_markers
from paddler_agent.kv_cache import KvLedger
from paddler_agent.model_source import DownloadProgress, ModelAccess, ModelSourceError, resolve_model
from paddler_agent.multimodal import (
    ImageChunk,
    MediaPrompt,
    MultimodalError,
    Projector,
    ProjectorLoadError,
    is_placeholder,
)
from paddler_agent.tool_calls import OutputClassifier, parse_tool_calls, prompt_opens_reasoning
from paddler_core.desired_state import (
    BalancerDesiredState,
    EmbeddingNormalizationMethod,
    InferenceParameters,
    KvCacheDtype,
    ModelSource,
    PoolingType,
)
from paddler_core.inference import (
    ContinueFromConversationHistoryParams,
    ContinueFromRawPromptParams,
    GbnfGrammar,
    GenerateEmbeddingBatchParams,
    GrammarConstraint,
    ImageUrlContentPart,
    Tool,
    done_payload,
    generated_error_payload,
    parse_generation_request,
    token_payload,
    usage_dict,
)
from paddler_core.prefix import request_prefix_keys
from paddler_core.protocol import (
    AgentIssue,
    EmbedMessage,
    GenerateMessage,
    StateApplicationStatus,
)

logger = logging.getLogger(__name__)

MAX_PREFIX_HASHES = 4096
COPY_MIN_TOKENS = 1
"""Share another slot's cached prefix when it holds at least this many more prompt
tokens than the chosen slot (sharing cells of the unified cache costs no memory and
no compute)."""
MAX_SLOTS = 64
"""llama.cpp's LLAMA_MAX_SEQ."""
WARMUP_TOKENS = 4
EMBEDDING_MAX_SEQS = 32
"""Documents per embedding decode (each is one sequence of the embedding context)."""

MODEL_CANNOT_BE_LOADED = "ModelCannotBeLoaded"
"""Agent-issue variant of a model file that llama.cpp refuses to load."""
DECODE_LOOP_STOPPED = "DecodeLoopStopped"
MULTIMODAL_PROJECTION_CANNOT_BE_LOADED = "MultimodalProjectionCannotBeLoaded"
"""Agent-issue variant (Paddler's) of a ``multimodal_projection`` that cannot be resolved
or loaded: the model serves text, image requests are refused."""
"""Agent-issue variant of an inference loop that died (a bug): nothing is served."""

_KV_TYPES: dict[KvCacheDtype, int] = {
    KvCacheDtype.F32: 0,
    KvCacheDtype.F16: 1,
    KvCacheDtype.Q4_0: 2,
    KvCacheDtype.Q4_1: 3,
    KvCacheDtype.Q5_0: 6,
    KvCacheDtype.Q5_1: 7,
    KvCacheDtype.Q8_0: 8,
    KvCacheDtype.IQ4_NL: 20,
    KvCacheDtype.BF16: 30,
}
_QUANTIZED_KV = {
    KvCacheDtype.Q4_0,
    KvCacheDtype.Q4_1,
    KvCacheDtype.Q5_0,
    KvCacheDtype.Q5_1,
    KvCacheDtype.Q8_0,
    KvCacheDtype.IQ4_NL,
}
_POOLING: dict[PoolingType, int] = {
    PoolingType.UNSPECIFIED: -1,
    PoolingType.NONE: 0,
    PoolingType.MEAN: 1,
    PoolingType.CLS: 2,
    PoolingType.LAST: 3,
    PoolingType.RANK: 4,
}

FloatArray = npt.NDArray[np.float32]
Payload = dict[str, Any] | str
Emit = tuple[str, Payload, bool]


def default_threads() -> int:
    """``PADDLER_THREADS`` or the machine's CPU count."""
    value = os.environ.get("PADDLER_THREADS", "").strip()
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            logger.warning("ignoring invalid PADDLER_THREADS value=%r", value)
    return max(1, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    root = os.environ.get("PADDLER_CACHE") or os.path.join(Path.home(), ".cache", "paddler")
    return Path(root) / "models"


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left = np.asarray(a[:n], dtype=np.int64)
    right = np.asarray(b[:n], dtype=np.int64)
    mismatch = np.flatnonzero(left != right)
    return int(mismatch[0]) if mismatch.size else n


def normalize_embedding(vector: FloatArray, method: EmbeddingNormalizationMethod) -> FloatArray:
    if method.kind == "L2":
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector
    if method.kind == "RmsNorm":
        eps = method.epsilon if method.epsilon is not None else 1e-6
        rms = float(np.sqrt(np.mean(np.square(vector, dtype=np.float64)) + eps))
        return (vector / rms).astype(np.float32)
    return vector


# ---- llama.cpp logging ----------------------------------------------------------------------

_native_log = logging.getLogger(__name__ + ".native")
_GGML_LOG_WARN = 3
_GGML_LOG_ERROR = 4
_recent_errors = threading.local()


def _forward_native_log(level: int, text: bytes, _user_data: Any) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if not message:
        return
    if level == _GGML_LOG_ERROR:
        errors: deque[str] | None = getattr(_recent_errors, "lines", None)
        if errors is not None:
            errors.append(message)
        _native_log.warning("llama.cpp error=%s", message)
    elif level == _GGML_LOG_WARN:
        _native_log.info("llama.cpp warning=%s", message)
    else:
        _native_log.debug("%s", message)


_LOG_CALLBACK = llama_cpp.llama_log_callback(_forward_native_log)
_backend_lock = threading.Lock()
_backend_ready = False


def _ensure_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@contextlib.contextmanager
def _capture_native_errors() -> Any:
    """Collect llama.cpp error lines logged by this thread inside the block."""
    lines: deque[str] = deque(maxlen=8)
    _recent_errors.lines = lines
    try:
        yield lines
    finally:
        _recent_errors.lines = None


# ---- native model and contexts ---------------------------------------------------------------


class ModelLoadError(Exception):
    """llama.cpp refused the model file or could not create a context."""


@dataclass(frozen=True)
class LoadConfig:
    """What a loaded model depends on; a change of any field means a reload."""

    path: str
    slots: int
    context_size: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    k_cache: KvCacheDtype
    v_cache: KvCacheDtype
    enable_embeddings: bool
    embedding_batch_size: int
    pooling_type: PoolingType
    projector: str | None = None
    """Local path of the multimodal projector GGUF, or None."""

    @classmethod
    def build(
        cls, path: str, slots: int, params: InferenceParameters, threads: int, projector: str | None = None
    ) -> LoadConfig:
        return cls(
            path=path,
            slots=slots,
            context_size=params.context_size,
            n_batch=params.n_batch,
            n_threads=threads,
            n_gpu_layers=params.n_gpu_layers,
            k_cache=params.k_cache_dtype,
            v_cache=params.v_cache_dtype,
            enable_embeddings=params.enable_embeddings,
            embedding_batch_size=params.embedding_batch_size,
            pooling_type=params.pooling_type,
            projector=projector,
        )


class NativeModel:
    """A loaded ``llama_model`` with its vocabulary helpers."""

    def __init__(self, handle: Any, path: str) -> None:
        self.handle = handle
        self.path = path
        self.vocab = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(handle))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(handle))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.metadata = self._read_metadata()

    @classmethod
    def load(cls, path: str, n_gpu_layers: int, *, vocab_only: bool = False) -> NativeModel:
        _ensure_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        progress = _LoadProgress(path) if not vocab_only else None
        if progress is not None:
            params.progress_callback = progress.callback
        with _capture_native_errors() as errors:
            handle = llama_cpp.llama_model_load_from_file(path.encode(), params)
        if not handle:
            detail = "; ".join(errors) or "llama.cpp could not read it"
            raise ModelLoadError(f"llama.cpp cannot load the model file {path}: {detail}")
        return cls(handle, path)

    def free(self) -> None:
        if self.handle:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        count = int(llama_cpp.llama_model_meta_count(self.handle))
        for i in range(count):
            key = _read_string(llama_cpp.llama_model_meta_key_by_index, self.handle, i)
            out[key] = _read_string(llama_cpp.llama_model_meta_val_str_by_index, self.handle, i)
        return out

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.handle, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def token_text(self, token: int) -> str:
        """The token's text with special tokens rendered (for templates: bos/eos strings)."""
        if token < 0:
            return ""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(
                "SamplerError", f"invalid request: the text holds a lone UTF-16 surrogate at character {e.start}"
            ) from None
        capacity = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * capacity)()
            n = int(llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special))
            if n >= 0:
                return list(buf[:n])
            capacity = -n

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._to_piece(token, special=False)
            self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        cached = self._eog.get(token)
        if cached is None:
            cached = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
            self._eog[token] = cached
        return cached

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_token_to_piece(self.vocab, token, buf, size, 0, special))
            if n >= 0:
                return buf.raw[:n]
            size = -n


def _read_string(call: Callable[[Any, int, Any, int], int], handle: Any, index: int) -> str:
    """A string out of a llama.cpp ``f(handle, index, buf, size) -> length`` getter."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = int(call(handle, index, buf, size))
        if n < 0:
            return ""
        if n < size:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = n + 1


class _LoadProgress:
    """Logs model-load progress in quarters (called by llama.cpp in the loading thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.next_mark = 0.25
        self.started = time.monotonic()
        self.callback = llama_cpp.llama_progress_callback(self._on_progress)

    def _on_progress(self, progress: float, _user_data: Any) -> bool:
        if progress >= self.next_mark:
            logger.info(
                "model load progress path=%s percent=%d elapsed_s=%.2f",
                self.path,
                int(progress * 100),
                time.monotonic() - self.started,
            )
            while self.next_mark <= progress:
                self.next_mark += 0.25
        return True


class _Batch:
    """A ``llama_batch`` of single-sequence tokens, filled through numpy views."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0
        self._token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self._pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self._nseq = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        self._seq = self.raw.seq_id
        self._nseq[:] = 1

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], first_pos: int, seq: int, last_logits: bool) -> int:
        """Append ``tokens`` of sequence ``seq``; returns the index of the last one."""
        start, end = self.n, self.n + len(tokens)
        if end > self.capacity:
            raise ValueError(f"batch overflow: {end} > {self.capacity}")
        self._token[start:end] = tokens
        self._pos[start:end] = np.arange(first_pos, first_pos + len(tokens), dtype=np.int32)
        self._logits[start:end] = 0
        if last_logits:
            self._logits[end - 1] = 1
        seq_ids = self._seq
        for i in range(start, end):
            seq_ids[i][0] = seq
        self.n = end
        return end - 1

    def all_logits(self) -> None:
        self._logits[: self.n] = 1

    def decode(self, ctx: Any) -> int:
        self.raw.n_tokens = self.n
        return int(llama_cpp.llama_decode(ctx, self.raw))

    def free(self) -> None:
        if self.raw is not None:
            llama_cpp.llama_batch_free(self.raw)
            self.raw = None


def _context_params(config: LoadConfig, *, embeddings: bool) -> Any:
    params = llama_cpp.llama_context_default_params()
    params.n_threads = config.n_threads
    params.n_threads_batch = config.n_threads
    params.type_k = _KV_TYPES[config.k_cache]
    params.type_v = _KV_TYPES[config.v_cache]
    params.flash_attn = config.v_cache in _QUANTIZED_KV
    params.no_perf = True
    if embeddings:
        size = max(config.embedding_batch_size, min(config.context_size, 4096))
        params.n_ctx = size
        params.n_batch = size
        params.n_ubatch = size
        params.n_seq_max = EMBEDDING_MAX_SEQS
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = _POOLING[config.pooling_type]
    else:
        # Paddler's semantics (and llama-server's -c with --parallel): context_size is the
        # whole KV cache of the agent, one unified cache shared by all slots.
        params.n_ctx = config.context_size
        params.n_batch = config.n_batch
        params.n_ubatch = min(config.n_batch, 512)
        params.n_seq_max = config.slots
        params.kv_unified = True
        params.embeddings = False
    return params


class GenContext:
    """The generation context: one unified KV cache, one sequence id per slot."""

    def __init__(self, model: NativeModel, config: LoadConfig) -> None:
        params = _context_params(config, embeddings=False)
        with _capture_native_errors() as errors:
            self.handle = llama_cpp.llama_init_from_model(model.handle, params)
        if not self.handle:
            raise ModelLoadError(
                "llama.cpp cannot create the generation context: " + ("; ".join(errors) or "unknown error")
            )
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx(self.handle))
        """Cells of the whole KV cache (context_size, padded by llama.cpp): one sequence
        may use all of them."""
        self.n_batch = int(llama_cpp.llama_n_batch(self.handle))
        self.memory = llama_cpp.llama_get_memory(self.handle)
        self.batch = _Batch(self.n_batch + config.slots)

    def seq_truncate(self, seq: int, keep: int) -> None:
        """Drop positions ``>= keep`` of sequence ``seq``."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1)

    def seq_copy(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold positions ``[0, n)`` of ``src``. In the unified cache this
        tags ``src``'s cells with ``dst`` too: the cells are shared, not duplicated."""
        llama_cpp.llama_memory_seq_rm(self.memory, dst, 0, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def free(self) -> None:
        self.batch.free()
        if self.handle:
            llama_cpp.llama_free(self.handle)
            self.handle = None


class EmbedContext:
    """The embedding context: pooled embeddings of up to EMBEDDING_MAX_SEQS documents."""

    def __init__(self, model: NativeModel, config: LoadConfig) -> None:
        params = _context_params(config, embeddings=True)
        with _capture_native_errors() as errors:
            self.handle = llama_cpp.llama_init_from_model(model.handle, params)
        if not self.handle:
            raise ModelLoadError(
                "llama.cpp cannot create the embedding context: " + ("; ".join(errors) or "unknown error")
            )
        self.capacity = int(llama_cpp.llama_n_batch(self.handle))
        self.batch_tokens = config.embedding_batch_size
        self.memory = llama_cpp.llama_get_memory(self.handle)
        self.pooling = int(llama_cpp.llama_pooling_type(self.handle))
        self.n_out = model.n_embd
        if self.pooling == _POOLING[PoolingType.RANK]:
            self.n_out = max(1, int(llama_cpp.llama_model_n_cls_out(model.handle)))
        self.encoder_only = bool(llama_cpp.llama_model_has_encoder(model.handle)) and not bool(
            llama_cpp.llama_model_has_decoder(model.handle)
        )
        self.batch = _Batch(self.capacity)

    def embed(self, documents: Sequence[Sequence[int]]) -> list[FloatArray]:
        """Pooled embeddings of ``documents`` (each fits the context; at most MAX_SEQS)."""
        self.batch.clear()
        spans: list[tuple[int, int]] = []
        for seq, tokens in enumerate(documents):
            start = self.batch.n
            self.batch.add(tokens, 0, seq, last_logits=True)
            spans.append((start, self.batch.n))
        self.batch.all_logits()
        self.batch.raw.n_tokens = self.batch.n
        try:
            if self.encoder_only:
                rc = int(llama_cpp.llama_encode(self.handle, self.batch.raw))
            else:
                rc = int(llama_cpp.llama_decode(self.handle, self.batch.raw))
            if rc != 0:
                raise RuntimeError(f"embedding decode failed with code {rc}")
            return [self._read(seq, span) for seq, span in enumerate(spans)]
        finally:
            llama_cpp.llama_memory_clear(self.memory, True)

    def _read(self, seq: int, span: tuple[int, int]) -> FloatArray:
        if self.pooling != _POOLING[PoolingType.NONE]:
            ptr = llama_cpp.llama_get_embeddings_seq(self.handle, seq)
            if not ptr:
                raise RuntimeError("llama.cpp produced no pooled embedding")
            return np.ctypeslib.as_array(ptr, shape=(self.n_out,)).astype(np.float32)
        rows = [
            np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_ith(self.handle, i), shape=(self.n_out,))
            for i in range(*span)
        ]
        pooled: FloatArray = np.mean(np.stack(rows), axis=0).astype(np.float32)
        return pooled

    def free(self) -> None:
        self.batch.free()
        if self.handle:
            llama_cpp.llama_free(self.handle)
            self.handle = None


@dataclass
class Runtime:
    """A loaded model with its contexts, ready to serve."""

    config: LoadConfig
    model: NativeModel
    gen: GenContext
    emb: EmbedContext | None
    projector: Projector | None = None
    projector_error: str | None = None
    """Why the configured projector did not load (the model serves text only)."""

    @classmethod
    def load(cls, config: LoadConfig) -> Runtime:
        started = time.monotonic()
        logger.info(
            "model load start path=%s slots=%d context_size=%d threads=%d",
            config.path,
            config.slots,
            config.context_size,
            config.n_threads,
        )
        model = NativeModel.load(config.path, config.n_gpu_layers)
        gen: GenContext | None = None
        try:
            gen = GenContext(model, config)
            emb = EmbedContext(model, config) if config.enable_embeddings else None
        except BaseException:
            if gen is not None:
                gen.free()
            model.free()
            raise
        runtime = cls(config, model, gen, emb)
        runtime.warm_up()
        if config.projector is not None:
            try:
                runtime.projector = Projector.load(
                    config.projector, model.handle, config.n_threads, use_gpu=config.n_gpu_layers > 0
                )
                logger.info("multimodal projection loaded path=%s", config.projector)
            except ProjectorLoadError as e:
                logger.warning("multimodal projection not loaded path=%s error=%s", config.projector, e)
                runtime.projector_error = str(e)
        logger.info(
            "model load done path=%s n_vocab=%d n_embd=%d n_ctx_seq=%d elapsed_s=%.2f",
            config.path,
            model.n_vocab,
            model.n_embd,
            gen.n_ctx_seq,
            time.monotonic() - started,
        )
        return runtime

    def warm_up(self) -> None:
        """Decode a few tokens so the first request does not pay for graph set-up."""
        tokens = self.model.tokenize("Hello, world", add_special=True, parse_special=False)
        tokens = (tokens or [max(self.model.bos, 0)])[:WARMUP_TOKENS]
        batch = self.gen.batch
        batch.clear()
        batch.add(tokens, 0, 0, last_logits=True)
        rc = batch.decode(self.gen.handle)
        self.gen.seq_truncate(0, 0)
        if rc != 0:
            self.free()
            raise ModelLoadError(f"warm-up decode failed with code {rc}")
        if self.emb is not None:
            self.emb.embed([tokens])

    def free(self) -> None:
        if self.projector is not None:
            self.projector.free()
        if self.emb is not None:
            self.emb.free()
        self.gen.free()
        self.model.free()


# ---- sampling ---------------------------------------------------------------------------------


class RequestError(Exception):
    """A request that cannot run; ``kind`` is the Paddler GeneratedToken error variant."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def grammar_text(constraint: GrammarConstraint | None) -> tuple[str, str] | None:
    """(GBNF text, root rule) of a request's grammar; raises RequestError."""
    if constraint is None:
        return None
    if isinstance(constraint, GbnfGrammar):
        return constraint.grammar, constraint.root
    try:
        return json_schema_to_gbnf(constraint.schema_value), "root"
    except Exception as e:
        raise RequestError("GrammarSyntaxError", f"invalid JSON schema: {e}") from e


def _refuse_images(params: ContinueFromConversationHistoryParams) -> None:
    """A request whose images the engine did not decode for a projector: an image part
    is refused (Paddler's ``MultimodalNotSupported``) rather than dropped, which would
    let the model invent what the image shows."""
    for index, message in enumerate(params.conversation_history):
        if isinstance(message.content, list) and any(isinstance(p, ImageUrlContentPart) for p in message.content):
            raise RequestError(
                "MultimodalNotSupported",
                f"conversation_history.{index} has an image, but this model has no multimodal projector",
            )


def grammar_failure(grammar: tuple[str, str], errors: list[str]) -> RequestError:
    """Why llama.cpp refused a grammar, under Paddler's names: a grammar that parses
    but cannot be initialised (no rule named as its root, left recursion) is
    ``GrammarInitializationFailed``; anything else is ``GrammarSyntaxError``."""
    text, root = grammar
    detail = "; ".join(errors)
    if not re.search(rf"^\s*{re.escape(root)}\s*::=", text, re.MULTILINE):
        return RequestError("GrammarInitializationFailed", f"the grammar has no rule named {root!r} (its root)")
    if "left recursion" in detail:
        return RequestError("GrammarInitializationFailed", f"the grammar cannot be initialised: {detail}")
    return RequestError("GrammarSyntaxError", f"invalid grammar: {detail or 'llama.cpp could not parse it'}")


def _penalties_neutral(params: InferenceParameters) -> bool:
    return (
        params.penalty_repeat == 1.0 and params.penalty_frequency == 0.0 and params.penalty_presence == 0.0
    ) or params.penalty_last_n == 0


class Sampler:
    """A llama.cpp sampler chain for one sequence."""

    def __init__(
        self,
        model: NativeModel,
        params: InferenceParameters,
        seed: int | None,
        grammar: tuple[str, str] | None,
        n_ctx_seq: int,
    ) -> None:
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self.penalties: Any = None
        try:
            self._build(model, params, seed, grammar, n_ctx_seq)
        except BaseException:
            self.free()
            raise

    def _add(self, sampler: Any) -> Any:
        llama_cpp.llama_sampler_chain_add(self.chain, sampler)
        return sampler

    def _build(
        self,
        model: NativeModel,
        params: InferenceParameters,
        seed: int | None,
        grammar: tuple[str, str] | None,
        n_ctx_seq: int,
    ) -> None:
        if grammar is not None:
            with _capture_native_errors() as errors:
                g = llama_cpp.llama_sampler_init_grammar(
                    model.vocab, grammar[0].encode("utf-8"), grammar[1].encode("utf-8")
                )
            if not g:
                raise grammar_failure(grammar, list(errors))
            self._add(g)
        if not _penalties_neutral(params):
            last_n = n_ctx_seq if params.penalty_last_n < 0 else params.penalty_last_n
            self.penalties = self._add(
                llama_cpp.llama_sampler_init_penalties(
                    last_n, params.penalty_repeat, params.penalty_frequency, params.penalty_presence
                )
            )
        if params.temperature <= 0.0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
        self._add(
            llama_cpp.llama_sampler_init_dist(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed & 0xFFFFFFFF)
        )

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Feed prompt tokens to the penalties (not to the grammar), as llama-server does."""
        if self.penalties is None:
            return
        for token in tokens:
            llama_cpp.llama_sampler_accept(self.penalties, token)

    def sample(self, ctx: Any, index: int) -> int:
        return int(llama_cpp.llama_sampler_sample(self.chain, ctx, index))

    def free(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


class FastSampler:
    """Sampling in numpy over the logits row, for requests without a grammar.

    Same steps and order as llama.cpp's chain (penalties, top-k, top-p, min-p,
    temperature, dist; greedy = argmax after penalties), but it reads the row in
    place instead of building a 49k-entry candidate array per token: measured on
    SmolLM2, 7 us instead of 310 us for greedy and 120 us instead of 430 us for
    Paddler's default sampling (bench/engine_vs_llama_server.py --sampling).
    """

    MAX_TOP_K = 1000
    """Above this (or top_k = 0, all tokens) the chain's partial sort is cheaper."""

    def __init__(self, n_vocab: int, params: InferenceParameters, seed: int | None, n_ctx_seq: int) -> None:
        self.n_vocab = n_vocab
        self.params = params
        self.rng = np.random.default_rng(None if seed is None else seed & 0xFFFFFFFFFFFFFFFF)
        self.penalize = not _penalties_neutral(params)
        last_n = n_ctx_seq if params.penalty_last_n < 0 else params.penalty_last_n
        self.window: deque[int] = deque(maxlen=max(last_n, 1))
        self.counts: dict[int, int] = {}

    @classmethod
    def suits(cls, params: InferenceParameters) -> bool:
        return params.temperature <= 0.0 or 0 < params.top_k <= cls.MAX_TOP_K

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        if self.penalize:
            for token in tokens[-(self.window.maxlen or 1) :]:
                self._accept(token)

    def _accept(self, token: int) -> None:
        window = self.window
        if len(window) == window.maxlen:
            old = window[0]
            left = self.counts[old] - 1
            if left:
                self.counts[old] = left
            else:
                del self.counts[old]
        window.append(token)
        self.counts[token] = self.counts.get(token, 0) + 1

    def sample(self, ctx: Any, index: int) -> int:
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        if self.penalize and self.counts:
            self._apply_penalties(row)
        token = self._pick(row)
        if self.penalize:
            self._accept(token)
        return token

    def _pick(self, row: FloatArray) -> int:
        return self._greedy(row) if self.params.temperature <= 0.0 else self._draw(row)

    def _apply_penalties(self, row: FloatArray) -> None:
        p = self.params
        ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
        counts = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
        logits = row[ids]
        logits = np.where(logits <= 0, logits * p.penalty_repeat, logits / p.penalty_repeat)
        row[ids] = logits - counts * p.penalty_frequency - p.penalty_presence

    @staticmethod
    def _greedy(row: FloatArray) -> int:
        return int(row.argmax())

    def _draw(self, row: FloatArray) -> int:
        p = self.params
        k = min(p.top_k, self.n_vocab)
        ids = np.argpartition(row, -k)[-k:]
        order = np.argsort(-row[ids], kind="stable")
        ids = ids[order]
        logits = row[ids].astype(np.float64)
        if p.top_p < 1.0:
            probs = np.exp(logits - logits[0])
            cumulative = np.cumsum(probs / probs.sum())
            keep = int(np.searchsorted(cumulative, p.top_p)) + 1
            ids, logits = ids[:keep], logits[:keep]
        if p.min_p > 0.0:
            mask = logits >= logits[0] + np.log(p.min_p)
            ids, logits = ids[mask], logits[mask]
        weights = np.exp((logits - logits[0]) / p.temperature)
        choice = self.rng.choice(len(ids), p=weights / weights.sum())
        return int(ids[choice])

    def free(self) -> None:
        pass


_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")], align=True)


class GrammarSampler(FastSampler):
    """The numpy path plus a llama.cpp grammar, checked lazily as llama.cpp's common
    sampler does: pick a token from the raw row, ask the grammar about that one token,
    and only when it is rejected mask the whole row with the grammar and pick again.
    Greedy picks are identical to masking first; it avoids a grammar pass over all
    49k tokens on most steps (80 -> ~120 tok/s on a GBNF request)."""

    def __init__(
        self,
        model: NativeModel,
        params: InferenceParameters,
        seed: int | None,
        grammar: tuple[str, str],
        n_ctx_seq: int,
    ) -> None:
        super().__init__(model.n_vocab, params, seed, n_ctx_seq)
        with _capture_native_errors() as errors:
            self.grammar = llama_cpp.llama_sampler_init_grammar(
                model.vocab, grammar[0].encode("utf-8"), grammar[1].encode("utf-8")
            )
        if not self.grammar:
            raise grammar_failure(grammar, list(errors))
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._all = np.zeros(model.n_vocab, dtype=_TOKEN_DATA)
        self._all["id"] = np.arange(model.n_vocab, dtype=np.int32)

    def _apply_grammar(self, data: npt.NDArray[np.void]) -> None:
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(self.grammar, ctypes.byref(array))

    def _pick(self, row: FloatArray) -> int:
        token = super()._pick(row)
        one = self._one
        one["id"][0] = token
        one["logit"][0] = row[token]
        self._apply_grammar(one)
        if not np.isfinite(one["logit"][0]):
            everything = self._all
            everything["logit"] = row
            self._apply_grammar(everything)
            row[:] = everything["logit"]
            if not np.isfinite(row.max()):
                raise RequestError("GrammarRejectedModelOutput", "the grammar allows no next token")
            token = super()._pick(row)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def free(self) -> None:
        if self.grammar:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


# ---- text streaming ---------------------------------------------------------------------------


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


# ---- requests inside the decode thread ---------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a request is prepared with: group defaults and the chat template."""

    defaults: InferenceParameters
    chat_template_override: str | None = None


@dataclass
class Job:
    """A generation request, prepared (rendered, tokenized, sampler settings resolved)."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    params: InferenceParameters
    seed: int | None
    stops: list[str]
    grammar: tuple[str, str] | None
    prefix_keys: tuple[str, ...] = ()
    tools: list[Tool] | None = None
    """Set for conversation requests: their output is classified (tools may be empty)."""
    starts_in_reasoning: bool = False
    parse_tool_calls: bool = True
    order: int = 0
    """Arrival order: older requests go first and are preempted last."""
    media: MediaPrompt | None = None
    """The image chunks of a prompt with images; ``prompt`` holds their placeholders."""
    image_tokens: int = 0
    """Tokens of ``prompt`` that stand for images."""

    def free_media(self) -> None:
        if self.media is not None:
            self.media.free()
            self.media = None


@dataclass
class Sequence_:
    """A job running in a slot."""

    job: Job
    slot: int
    sampler: Sampler | FastSampler
    pending: list[int]
    cached: int
    n_past: int
    text: TextStream
    classifier: OutputClassifier | None
    next_token: int | None = None
    generated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Generated tokens per kind (ContentToken, ReasoningToken, ToolCallToken)."""
    uncounted: int = 0
    """Generated tokens whose kind is not known yet (they emitted nothing so far)."""
    started: float = field(default_factory=time.monotonic)
    parked: bool = False
    """Preempted because the KV cache was full: its cells were freed and ``pending``
    holds everything to re-evaluate (prompt, generated tokens) when it resumes."""


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)
    """Tokens the slot's KV cache holds, in order."""
    seq: Sequence_ | None = None
    last_used: float = 0.0
    prefix_keys: tuple[str, ...] = ()
    """Prefix keys of the request whose KV cache the slot holds."""


@dataclass
class EmbedJob:
    request_id: str
    documents: list[tuple[str, list[int]]]
    normalization: EmbeddingNormalizationMethod
    pooling_label: str
    next_index: int = 0


def template_for(params: ContinueFromConversationHistoryParams, settings: Settings, model: NativeModel) -> str:
    """The chat template to render ``params`` with; raises RequestError."""
    if params.grammar is not None and params.enable_thinking:
        raise RequestError(
            "GrammarIncompatibleWithThinking",
            "a grammar cannot be combined with enable_thinking; disable thinking to use it",
        )
    template = settings.chat_template_override or model.chat_template()
    if not template:
        raise RequestError("ChatTemplateError", "the model has no chat template and no chat template override is set")
    return template


@dataclass
class StatusDelta:
    slots_processing: int | None = None
    prefix_hashes: list[str] | None = None
    loop_stopped: str | None = None
    """The decode loop died with this error: the engine reports it as an issue."""
    kv_cache_tokens_used: int | None = None


Deliver = Callable[[list[Emit], StatusDelta | None], None]


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
            self._resolve(None, e)
            return
        self.worker = worker
        self._resolve(runtime, None)
        try:
            worker.run()
        finally:
            runtime.free()
            logger.info("model freed path=%s", self.config.path)

    def _resolve(self, runtime: Runtime | None, error: BaseException | None) -> None:
        def settle() -> None:
            if self._ready.done():
                return
            if error is not None:
                self._ready.set_exception(error)
            else:
                self._ready.set_result(runtime)  # type: ignore[arg-type]

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
        self.settings = settings
        self._loop = loop
        self._deliver = deliver
        self._slots = [Slot(i) for i in range(runtime.config.slots)]
        self._ledger = KvLedger(self.gen.n_ctx_seq, runtime.config.slots)
        self._waiting: deque[Job] = deque()
        self._arrivals = itertools.count()
        self._step_log: list[tuple[Sequence_, list[int], bool]] = []
        """What this step's batch added per sequence (tokens, from next_token), to undo
        it when llama.cpp finds no room for the batch."""
        self._empty_steps = 0
        self._stalled = False
        """Two steps in a row could do nothing: sleep until a command arrives (a guard
        against spinning; admission always has room once nothing runs)."""
        self._embeds: deque[EmbedJob | EmbedMessage] = deque()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._out: list[Emit] = []
        self._busy_reported = 0
        self._hashes_reported: list[str] = []
        self._rendered: dict[str, tuple[str, list[DecodedImage] | None]] = {}
        self._kv_reported = 0
        self._next_placeholder = -1
        """The next placeholder token of an image chunk (counts down, never reused)."""
        self.steps = 0

    # -- called from the event loop -----------------------------------------------------------

    def submit(
        self,
        message: GenerateMessage | EmbedMessage,
        rendered: str | None = None,
        images: list[DecodedImage] | None = None,
    ) -> None:
        """Queue a request; ``rendered`` is a conversation's prompt, rendered beforehand
        (templates never run on this thread), with its decoded ``images`` in the order
        of the projector's markers in it."""
        if rendered is not None:
            self._post("rendered", (message.request_id, (rendered, images)))
        self._post("embed" if isinstance(message, EmbedMessage) else "generate", message)

    def cancel(self, request_id: str) -> None:
        self._post("cancel", request_id)

    def request_stop(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()

    def _post(self, kind: str, item: Any) -> None:
        with self._wake:
            self._inbox.append((kind, item))
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
                self._wake.wait()
            if self._closing:
                return False
            inbox = list(self._inbox)
            self._inbox.clear()
        if inbox:
            self._stalled = False
            self._empty_steps = 0
        for kind, item in inbox:
            self._handle_command(kind, item)
        return True

    def _has_work(self) -> bool:
        if self._stalled:
            return False
        return bool(self._embeds) or bool(self._waiting) or any(s.seq is not None for s in self._slots)

    def _handle_command(self, kind: str, item: Any) -> None:
        if kind == "generate":
            self._queue(item)
        elif kind == "rendered":
            request_id, text = item
            self._rendered[request_id] = text
        elif kind == "embed":
            self._embeds.append(item)
        elif kind == "cancel":
            self._cancel(item)

    def _cancel(self, request_id: str) -> None:
        self._rendered.pop(request_id, None)
        for job in self._waiting:
            if job.request_id == request_id:
                job.free_media()
        self._waiting = deque(m for m in self._waiting if m.request_id != request_id)
        self._embeds = deque(e for e in self._embeds if e.request_id != request_id)
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
            self._embed_one_batch()
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
        if delta.slots_processing is None and delta.prefix_hashes is None and delta.kv_cache_tokens_used is None:
            return None
        return delta

    def _prefix_hashes(self) -> list[str]:
        keys = {k for slot in self._slots for k in slot.prefix_keys}
        return sorted(keys)[:MAX_PREFIX_HASHES]

    # -- admission ----------------------------------------------------------------------------

    def _queue(self, message: GenerateMessage) -> None:
        """Prepare a request when it arrives, so one that can never run (a prompt longer
        than the whole KV cache, a broken template) is answered before it waits."""
        try:
            job = self._prepare(message)
        except RequestError as e:
            self._reject_request(message.request_id, e)
            return
        except Exception as e:  # one request's failure must not stop the loop
            logger.exception("request failed to start request_id=%s", message.request_id)
            text = f"the request failed to start: {type(e).__name__}: {e}"
            self._emit(message.request_id, generated_error_payload("SamplerError", text), True)
            return
        job.order = next(self._arrivals)
        self._waiting.append(job)

    def _reject_request(self, request_id: str, error: RequestError) -> None:
        logger.info("request rejected request_id=%s kind=%s message=%s", request_id, error.kind, error.message)
        self._emit(request_id, generated_error_payload(error.kind, error.message), True)

    def _admit_waiting(self) -> None:
        """Resume preempted sequences, then start waiting requests, oldest first, while
        a slot is free and the KV cache has room for the prompt; the first one that does
        not fit waits (and so do the ones behind it)."""
        for seq in sorted(self._parked(), key=lambda q: q.job.order):
            if not self._resume(seq):
                return
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
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
                self._emit(job.request_id, generated_error_payload("SamplerError", text), True)
                continue
            if not started:
                return
            self._waiting.popleft()

    def _prepare(self, message: GenerateMessage) -> Job:
        try:
            params = parse_generation_request(message.variant, message.params)
        except (ValidationError, ValueError) as e:
            raise RequestError("SamplerError", f"invalid request: {e}") from e
        overrides = message.overrides
        sampling = overrides.apply(self.settings.defaults) if overrides else self.settings.defaults
        tools: list[Tool] | None = None
        rendered, images = self._rendered.pop(message.request_id, (None, None))
        parse_calls = True
        if isinstance(params, ContinueFromRawPromptParams):
            text = params.raw_prompt
        else:
            if not images:
                _refuse_images(params)
            text = rendered if rendered is not None else self._render(params)
            tools = list(params.tools)
            parse_calls = params.parse_tool_calls
        grammar = grammar_text(params.grammar)
        media = self._tokenize_media(text, images) if images else None
        return Job(
            request_id=message.request_id,
            prompt=media.tokens if media is not None else self._tokenize_prompt(text),
            max_tokens=params.max_tokens,
            params=sampling,
            seed=overrides.seed if overrides else None,
            stops=list(overrides.stop or []) if overrides else [],
            grammar=grammar,
            prefix_keys=request_prefix_keys(message.variant, message.params),
            tools=tools,
            starts_in_reasoning=tools is not None and prompt_opens_reasoning(text),
            parse_tool_calls=parse_calls,
            media=media,
            image_tokens=sum(i.n_pos for i in media.images.values()) if media is not None else 0,
        )

    def _render(self, params: ContinueFromConversationHistoryParams) -> str:
        """In-thread rendering: only for a request the engine did not render first."""
        template = template_for(params, self.settings, self.model)
        try:
            return render_chat(
                template,
                params.conversation_history,
                add_generation_prompt=params.add_generation_prompt,
                enable_thinking=params.enable_thinking,
                tools=params.tools,
                bos_token=self.model.token_text(self.model.bos),
                eos_token=self.model.token_text(self.model.eos),
            )
        except ChatTemplateError as e:
            raise RequestError("ChatTemplateError", str(e)) from e

    def _tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a prompt; special-token text (``<|im_start|>``...) becomes the token."""
        bos_text = self.model.token_text(self.model.bos)
        add_special = not (bos_text and text.startswith(bos_text))
        tokens = self.model.tokenize(text, add_special=add_special, parse_special=True)
        if not tokens:
            if self.model.bos < 0:
                raise RequestError("SamplerError", "the prompt is empty")
            tokens = [self.model.bos]
        if len(tokens) >= self.gen.n_ctx_seq:
            raise RequestError(
                "SamplerError",
                f"context full: the prompt has {len(tokens)} tokens and the agent's KV cache "
                f"(context_size, shared by its slots) holds {self.gen.n_ctx_seq}",
            )
        return tokens

    def _tokenize_media(self, text: str, images: list[DecodedImage]) -> MediaPrompt:
        """Tokens and image chunks of a prompt with images; raises RequestError."""
        projector = self.runtime.projector
        if projector is None:
            raise RequestError("MultimodalNotSupported", "this model has no multimodal projector")
        bos_text = self.model.token_text(self.model.bos)
        add_special = not (bos_text and text.startswith(bos_text))
        try:
            media = projector.tokenize(text, images, add_special=add_special, next_placeholder=self._next_placeholder)
        except MultimodalError as e:
            raise RequestError(e.kind, e.message) from None
        self._next_placeholder -= sum(image.n_pos for image in media.images.values())
        try:
            self._check_media(media, projector)
        except RequestError:
            media.free()
            raise
        return media

    def _check_media(self, media: MediaPrompt, projector: Projector) -> None:
        tokens = media.tokens
        if not tokens or is_placeholder(tokens[-1]):
            raise RequestError(
                "MultimodalTokenizationFailed", "the prompt ends with an image; text must follow it (a question)"
            )
        if len(tokens) >= self.gen.n_ctx_seq:
            raise RequestError(
                "SamplerError",
                f"context full: the prompt has {len(tokens)} tokens (images included) and the agent's KV cache "
                f"(context_size, shared by its slots) holds {self.gen.n_ctx_seq}",
            )
        n_ubatch = int(llama_cpp.llama_n_ubatch(self.gen.handle))
        for image in media.images.values():
            if projector.non_causal and image.n_tokens > n_ubatch:
                raise RequestError(
                    "MediaExceedsMicroBatch",
                    f"an image takes {image.n_tokens} tokens; this model decodes an image in one micro-batch "
                    f"of at most {n_ubatch} (raise n_batch or lower image_resize_to_fit)",
                )

    def _start(self, job: Job, free: list[Slot]) -> bool:
        """Start ``job`` in one of the ``free`` slots; False when the KV cache has no room
        for its prompt yet (nothing changed then, but idle slots' caches may be gone)."""
        slot, shared = self._pick_slot(job.prompt, free)
        donor, reuse = self._prefix_plan(job.prompt, slot, shared)
        if not self._room_for(job.prompt, slot, donor, reuse):
            return False
        sampler: Sampler | FastSampler
        if FastSampler.suits(job.params) and job.grammar is not None:
            sampler = GrammarSampler(self.model, job.params, job.seed, job.grammar, self.gen.n_ctx_seq)
        elif FastSampler.suits(job.params):
            sampler = FastSampler(self.model.n_vocab, job.params, job.seed, self.gen.n_ctx_seq)
        else:
            sampler = Sampler(self.model, job.params, job.seed, job.grammar, self.gen.n_ctx_seq)
        sampler.accept_prompt(job.prompt if job.media is None else [t for t in job.prompt if not is_placeholder(t)])
        self._apply_prefix(slot, donor, reuse)
        classifier = None
        if job.tools is not None:
            classifier = OutputClassifier(tools=bool(job.tools), start_in_reasoning=job.starts_in_reasoning)
        slot.seq = Sequence_(
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
        logger.info(
            "request start request_id=%s slot=%d prompt_tokens=%d cached_tokens=%d",
            job.request_id,
            slot.index,
            len(job.prompt),
            reuse,
        )
        return True

    def _prefix_plan(self, prompt: Sequence[int], slot: Slot, shared: int) -> tuple[Slot | None, int]:
        """(donor, reuse): keep the longest cached prefix of ``prompt`` for ``slot``: its
        own (``shared`` tokens), or another slot's (busy or not) when that is longer by
        COPY_MIN_TOKENS; ``reuse`` prompt tokens need no evaluation (at least one is
        always evaluated)."""
        donor = max(
            (s for s in self._slots if s is not slot),
            key=lambda s: common_prefix_length(s.tokens, prompt),
            default=None,
        )
        if donor is not None:
            donor_shared = min(common_prefix_length(donor.tokens, prompt), len(prompt) - 1)
            if donor_shared >= shared + COPY_MIN_TOKENS:
                return donor, donor_shared
        return None, min(shared, len(prompt) - 1)

    def _apply_prefix(self, slot: Slot, donor: Slot | None, reuse: int) -> None:
        if donor is not None:
            self.gen.seq_copy(donor.index, slot.index, reuse)
            self._ledger.share(donor.index, slot.index, reuse)
            slot.tokens = donor.tokens[:reuse]
            logger.debug("prefix shared src_slot=%d dst_slot=%d tokens=%d", donor.index, slot.index, reuse)
        else:
            self._truncate(slot, reuse)

    # -- the shared KV cache ------------------------------------------------------------------

    def _running(self) -> list[Sequence_]:
        """Sequences that hold KV cells (not preempted), oldest first."""
        running = [s.seq for s in self._slots if s.seq is not None and not s.seq.parked]
        running.sort(key=lambda q: q.job.order)
        return running

    def _parked(self) -> list[Sequence_]:
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
        headroom = 1 if len(tokens) < ledger.capacity else 0
        needed = len(tokens) - reuse + headroom + sum(len(q.pending) + 1 for q in self._running())
        own_keep = 0 if donor is not None else reuse

        def fits() -> bool:
            return needed <= ledger.free + ledger.freed_by_truncate(slot.index, own_keep)

        if fits():
            return True
        idle = [s for s in self._slots if s.seq is None and s is not slot and s.tokens]
        for other in sorted(idle, key=lambda s: s.last_used):
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

    def _park(self, seq: Sequence_) -> None:
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

    def _resume(self, seq: Sequence_) -> bool:
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

    @staticmethod
    def _pick_slot(prompt: Sequence[int], free: list[Slot]) -> tuple[Slot, int]:
        best = max(free, key=lambda s: (common_prefix_length(s.tokens, prompt), -s.last_used))
        return best, common_prefix_length(best.tokens, prompt)

    # -- one step -----------------------------------------------------------------------------

    def _fill_batch(self) -> list[tuple[Sequence_, int | None]]:
        batch = self.gen.batch
        batch.clear()
        entries: list[tuple[Sequence_, int | None]] = []
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

    def _eval_image(self, seq: Sequence_) -> bool:
        """Evaluate the image chunk at the head of ``seq.pending`` (outside the step's
        batch: its text before it is already decoded); False when it did not run (no
        room in the KV cache yet, or it failed and the request ended)."""
        media = seq.job.media
        image: ImageChunk | None = media.images.get(seq.pending[0]) if media is not None else None
        slot = self._slots[seq.slot]
        if image is None or media is None:  # a bug: placeholders of no chunk
            self._emit(
                seq.job.request_id,
                generated_error_payload("MultimodalIngestionFailed", "an image of the prompt was lost"),
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
                raise MultimodalError("MultimodalNotSupported", "the multimodal projector is not loaded")
            end = projector.eval_image(self.gen.handle, image, seq.n_past, seq.slot, self.gen.n_batch)
        except MultimodalError as e:
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

    def _decode_failed(self, rc: int, entries: list[tuple[Sequence_, int | None]]) -> None:
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
                    generated_error_payload("SamplerError", f"llama_decode failed with code {rc}"),
                    True,
                )
                self._release(slot)
                self._forget_cache(slot)

    def _on_logits(self, seq: Sequence_, index: int) -> None:
        try:
            token = seq.sampler.sample(self.gen.handle, index)
        except RequestError as e:
            self._flush_text(seq)
            self._emit(seq.job.request_id, generated_error_payload(e.kind, e.message), True)
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

    def _emit_text(self, seq: Sequence_, text: str, *, count: bool) -> None:
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
    def _count(seq: Sequence_, kind: str) -> None:
        seq.counts[kind] = seq.counts.get(kind, 0) + seq.uncounted
        seq.uncounted = 0

    def _flush_text(self, seq: Sequence_) -> None:
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

    def _finish(self, seq: Sequence_) -> None:
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

    def _context_full(self, seq: Sequence_) -> None:
        self._flush_text(seq)
        rid = seq.job.request_id
        message = (
            f"context full: the agent's KV cache of {self.gen.n_ctx_seq} tokens was used up "
            f"after {seq.generated} generated tokens"
        )
        logger.info("request context full request_id=%s slot=%d", rid, seq.slot)
        self._emit(rid, generated_error_payload("SamplerError", message), True)
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
                self._emit(slot.seq.job.request_id, generated_error_payload("SamplerError", message), True)
                self._release(slot)
        for job in self._waiting:
            self._emit(job.request_id, generated_error_payload("SamplerError", message), True)
            job.free_media()
        self._waiting.clear()

    def _emit(self, request_id: str, payload: Payload, final: bool) -> None:
        self._out.append((request_id, payload, final))

    # -- embeddings ---------------------------------------------------------------------------

    def _embed_one_batch(self) -> None:
        item = self._embeds[0]
        emb = self.runtime.emb
        try:
            if emb is None:
                raise RequestError(
                    "Embedding",
                    "embeddings are not enabled for this model; set enable_embeddings in the inference parameters",
                )
            job = item if isinstance(item, EmbedJob) else self._prepare_embed(item, emb)
            self._embeds[0] = job
            self._run_embed_batch(job, emb)
        except (RequestError, RuntimeError, ValidationError) as e:
            text = e.message if isinstance(e, RequestError) else str(e)
            logger.info("embedding failed request_id=%s error=%s", item.request_id, text)
            self._emit(item.request_id, {"Embedding": {"Error": text}}, True)
            self._embeds.popleft()

    def _prepare_embed(self, message: EmbedMessage, emb: EmbedContext) -> EmbedJob:
        """Tokenize the batch. A document over ``n_batch`` tokens is reported on its own
        (Paddler 4.1's ``DocumentExceedsBatchSize``) and the others are embedded."""
        params = GenerateEmbeddingBatchParams.model_validate(message.params)
        limit = min(emb.capacity, self.runtime.config.n_batch)
        documents: list[tuple[str, list[int]]] = []
        for doc in params.input_batch:
            tokens = self.model.tokenize(doc.content, add_special=True, parse_special=False)
            if not tokens:
                tokens = [max(self.model.bos, 0)]
            if len(tokens) > limit:
                logger.info(
                    "embedding document exceeds n_batch request_id=%s document=%s tokens=%d n_batch=%d",
                    message.request_id,
                    doc.id,
                    len(tokens),
                    limit,
                )
                oversized = {"document_tokens": len(tokens), "n_batch": limit, "source_document_id": doc.id}
                self._emit(message.request_id, {"Embedding": {"DocumentExceedsBatchSize": oversized}}, False)
                continue
            documents.append((doc.id, tokens))
        pooling = self.runtime.config.pooling_type
        return EmbedJob(message.request_id, documents, params.normalization_method, pooling.value)

    def _run_embed_batch(self, job: EmbedJob, emb: EmbedContext) -> None:
        if not job.documents:  # every document was oversized (each already reported)
            self._emit(job.request_id, {"Embedding": "Done"}, True)
            self._embeds.popleft()
            return
        group: list[tuple[str, list[int]]] = []
        total = 0
        for doc_id, tokens in job.documents[job.next_index :]:
            if group and (total + len(tokens) > emb.batch_tokens or len(group) >= EMBEDDING_MAX_SEQS):
                break
            group.append((doc_id, tokens))
            total += len(tokens)
        vectors = emb.embed([tokens for _, tokens in group])
        normalization = job.normalization.model_dump(mode="json")
        for (doc_id, _), vector in zip(group, vectors, strict=True):
            values = normalize_embedding(vector, job.normalization)
            self._emit(
                job.request_id,
                {
                    "Embedding": {
                        "Embedding": {
                            "embedding": values.tolist(),
                            "normalization_method": normalization,
                            "pooling_type": job.pooling_label,
                            "source_document_id": doc_id,
                        }
                    }
                },
                False,
            )
        job.next_index += len(group)
        if job.next_index >= len(job.documents):
            self._emit(job.request_id, {"Embedding": "Done"}, True)
            self._embeds.popleft()


# ---- the engine -------------------------------------------------------------------------------


class LlamaEngine(Engine):
    """Slots on llama.cpp; see the module docstring."""

    publishes_prefix_hashes = True

    def __init__(
        self,
        host: EngineHost,
        board: StatusBoard,
        slots: int,
        *,
        model_cache_dir: Path | None = None,
        n_threads: int | None = None,
        model_access: ModelAccess | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        super().__init__(host, board, slots)
        self.cache_dir = model_cache_dir or default_cache_dir()
        self.n_threads = n_threads or default_threads()
        self.model_access = model_access
        self._runtime: Runtime | None = None
        self._native: NativeThread | None = None
        self._settings = Settings(InferenceParameters())
        self._serving = False
        self._applying = False
        """A desired state is being applied: requests that cannot run yet are held."""
        self._held: deque[GenerateMessage | EmbedMessage] = deque()
        self._inflight: set[str] = set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._swap_task: asyncio.Task[None] | None = None
        self._issue_variants: set[str] = set()
        self._projector_issue: AgentIssue | None = None
        """MultimodalProjectionCannotBeLoaded of the state being applied, or None."""
        self._loop_dead = False
        """The decode loop of the loaded model died; requests are refused until a reload."""
        self._renderer = TemplateRenderer()
        self._rendering: dict[str, asyncio.Task[None]] = {}
        """Conversation requests whose prompt is being rendered (before the decode thread)."""
        if slots > MAX_SLOTS:
            # Paddler 4.1: the agent registers and reports it instead of exiting.
            board.issues.append(slot_cannot_start(slots))

    # -- requests -----------------------------------------------------------------------------

    def generate(self, message: GenerateMessage) -> None:
        self._submit(message)

    def embed(self, message: EmbedMessage) -> None:
        self._submit(message)

    def _submit(
        self,
        message: GenerateMessage | EmbedMessage,
        rendered: str | None = None,
        images: list[DecodedImage] | None = None,
    ) -> None:
        rid = message.request_id
        if self._native is not None and (self._loop_dead or not self._native.alive):
            self._reject(message, "the engine's decode loop stopped after an error; see the agent log")
        elif self._worker is not None and self._serving:
            self._inflight.add(rid)
            self._drained.clear()
            if (
                rendered is None
                and isinstance(message, GenerateMessage)
                and message.variant == "ContinueFromConversationHistory"
            ):
                task = asyncio.get_running_loop().create_task(self._render_then_submit(message), name=f"render-{rid}")
                self._rendering[rid] = task
                task.add_done_callback(lambda _t: self._rendering.pop(rid, None))
                return
            self._worker.submit(message, rendered, images)
        elif self._applying or self._native is not None:
            logger.info("request held while the model is not serving request_id=%s", rid)
            self._held.append(message)
        else:
            self._reject_unserved(message)

    async def _render_then_submit(self, message: GenerateMessage) -> None:
        """Render a conversation's prompt in the renderer process (time, memory and size
        limited), then queue it for the decode thread; a template failure fails this
        request only."""
        rid = message.request_id
        runtime = self._runtime
        try:
            params = parse_generation_request(message.variant, message.params)
        except (ValidationError, ValueError):
            params = None  # the decode thread reports it, as for any invalid request
        text: str | None = None
        images: list[DecodedImage] | None = None
        if isinstance(params, ContinueFromConversationHistoryParams) and runtime is not None:
            model = runtime.model
            try:
                template = template_for(params, self._settings, model)
                messages = params.conversation_history
                urls = image_urls(messages)
                if urls:
                    images = await self._decode_images(runtime, urls)
                    assert runtime.projector is not None
                    messages = with_image_markers(messages, runtime.projector.marker)
                text = await self._renderer.render(
                    template,
                    messages,
                    add_generation_prompt=params.add_generation_prompt,
                    enable_thinking=params.enable_thinking,
                    tools=params.tools,
                    bos_token=model.token_text(model.bos),
                    eos_token=model.token_text(model.eos),
                )
            except (RequestError, ChatTemplateError) as e:
                kind, text_ = (e.kind, e.message) if isinstance(e, RequestError) else ("ChatTemplateError", str(e))
                logger.info("request rejected request_id=%s kind=%s message=%s", rid, kind, text_)
                self._deliver([(rid, generated_error_payload(kind, text_), True)], None)
                return
        if rid not in self._inflight:
            return  # stopped while rendering
        if text is None:  # invalid parameters: the decode thread answers them like any request
            if self._worker is not None and self._serving:
                self._worker.submit(message)
                return
            self._inflight.discard(rid)
            if not self._inflight:
                self._drained.set()
            self._submit(message)
            return
        self._inflight.discard(rid)
        if not self._inflight:
            self._drained.set()
        self._submit(message, text, images)

    async def _decode_images(self, runtime: Runtime, urls: list[str]) -> list[DecodedImage]:
        """The request's images, decoded off the event loop; raises RequestError when the
        model takes no images or one cannot be decoded."""
        if runtime.projector is None:
            problem = self._projector_problem(runtime.config.path)
            if problem is not None:
                reason = f"its multimodal projection could not be loaded ({problem.message})"
            else:
                reason = "it has no multimodal projector (set multimodal_projection in the desired state)"
            raise RequestError(
                "MultimodalNotSupported",
                f"the request has {len(urls)} image(s), but this model takes no images: {reason}",
            )
        try:
            return await asyncio.to_thread(decode_images, urls, self._settings.defaults.image_resize_to_fit)
        except ImageError as e:
            raise RequestError(e.kind, e.message) from None

    def _reject_unserved(self, message: GenerateMessage | EmbedMessage) -> None:
        self._reject(message, "no model is loaded on this agent")

    def _reject(self, message: GenerateMessage | EmbedMessage, text: str) -> None:
        if isinstance(message, EmbedMessage):
            self.host.emit(message.request_id, {"Embedding": {"Error": text}}, True)
        else:
            self.host.emit(message.request_id, generated_error_payload("SamplerError", text), True)

    def stop(self, request_id: str) -> None:
        before = len(self._held)
        self._held = deque(m for m in self._held if m.request_id != request_id)
        if len(self._held) != before:
            return
        if request_id in self._inflight:
            self._inflight.discard(request_id)
            rendering = self._rendering.pop(request_id, None)
            if rendering is not None:
                rendering.cancel()
            elif self._worker is not None:
                self._worker.cancel(request_id)
            if not self._inflight:
                self._drained.set()

    def _deliver(self, out: list[Emit], delta: StatusDelta | None) -> None:
        for rid, payload, final in out:
            if rid not in self._inflight:
                continue
            if final:
                self._inflight.discard(rid)
            self.host.emit(rid, payload, final)
        if delta is not None and delta.loop_stopped is not None:
            self._loop_stopped(delta.loop_stopped)
        if delta is not None:
            if delta.kv_cache_tokens_used is not None and self._native is not None:
                # Changes every step: the runtime's periodic snapshot carries it.
                self.board.kv_cache_tokens_used = delta.kv_cache_tokens_used
            if delta.slots_processing is not None:
                self.board.slots_processing = delta.slots_processing
            if delta.prefix_hashes is not None:
                self.board.prefix_hashes = delta.prefix_hashes
            if delta.slots_processing is not None or delta.prefix_hashes is not None:
                self.host.status_changed()
        if not self._inflight:
            self._drained.set()

    def model_metadata(self) -> dict[str, str] | None:
        return dict(self._runtime.model.metadata) if self._runtime is not None else None

    def _loop_stopped(self, error: str) -> None:
        """The decode loop died: say so (an issue, not Applied, no slots) instead of
        taking requests it can only fail. A new desired state reloads the model."""
        logger.error("decode loop stopped; the agent serves nothing until the model is reloaded error=%s", error)
        self._fail(
            DECODE_LOOP_STOPPED,
            f"The inference loop stopped after an error ({error}); apply the desired state again to reload the model.",
        )
        self._serving = False
        self._loop_dead = True
        self.board.slots_total = 0
        self.board.state_application_status = StateApplicationStatus.STUCK
        self.host.status_changed()

    # -- desired state ------------------------------------------------------------------------

    async def apply_desired_state(self, state: BalancerDesiredState) -> None:
        """Resolving and downloading can be cancelled (a newer state supersedes this
        one); unloading and swapping cannot: they run shielded, and the next call
        waits for them to finish."""
        previous = self._swap_task
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        await self._apply(state)

    async def _shielded(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._swap_task = task
        await asyncio.shield(task)

    async def _apply(self, state: BalancerDesiredState) -> None:
        self._applying = True  # stays set when cancelled: a newer state is on its way
        try:
            await self._apply_unguarded(state)
        except Exception as e:
            logger.exception("applying desired state failed")
            self._fail("StateApplicationFailed", f"Applying the desired state failed: {e}")
        self._applying = False
        self._answer_held_if_nothing_serves()

    async def _apply_unguarded(self, state: BalancerDesiredState) -> None:
        settings = _settings_of(state)
        if self.slots > MAX_SLOTS and not state.model.is_none:
            logger.warning("desired state not appliable: %d slots, llama.cpp runs at most %d", self.slots, MAX_SLOTS)
            self.board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
            self.board.slots_total = 0
            self.host.status_changed()
            self._answer_held_if_nothing_serves()
            return
        if state.model.is_none:
            await self._shielded(self._unload())
            self._settings = settings
            self._set_applied(None, settings)
            return
        try:
            path = await resolve_model(state.model, self.cache_dir, self._on_download, access=self.model_access)
        except ModelSourceError as e:
            self._fail(e.variant, e.message, **e.details)
            self._answer_held_if_nothing_serves()
            return
        projector = await self._resolve_projector(state.multimodal_projection)
        config = LoadConfig.build(str(path), self.slots, state.inference_parameters, self.n_threads, projector)
        if self._runtime is not None and self._runtime.config == config and self._native_alive():
            self._update_settings(settings)
            self._set_applied(config.path, settings)
            return
        if not await self._probe(config):
            self._answer_held_if_nothing_serves()
            return
        await self._shielded(self._swap(config, settings))

    async def _resolve_projector(self, source: ModelSource) -> str | None:
        """The local path of the desired state's ``multimodal_projection`` (resolved,
        downloaded and cached like the model), or None: none is set, or it cannot be had,
        which is Paddler's ``MultimodalProjectionCannotBeLoaded`` (the model still serves
        text)."""
        self._projector_issue = None
        if source.is_none:
            return None
        try:
            path = await resolve_model(source, self.cache_dir, self._on_download, access=self.model_access)
        except ModelSourceError as e:
            self._projector_issue = projector_issue(source.describe(), f"{e.variant}: {e.message}")
            return None
        return str(path)

    def _answer_held_if_nothing_serves(self) -> None:
        """No model will serve held requests (the first one failed): end them."""
        if self._native is None:
            self._flush_held_with_error()

    async def _probe(self, config: LoadConfig) -> bool:
        """Check that llama.cpp can read the file (vocabulary only) before unloading."""
        try:
            await asyncio.to_thread(_probe_model_file, config.path)
        except ModelLoadError as e:
            self._fail(MODEL_CANNOT_BE_LOADED, str(e), path=config.path)
            return False
        return True

    async def _swap(self, config: LoadConfig, settings: Settings) -> None:
        old_config = self._runtime.config if self._runtime is not None else None
        await self._stop_serving()
        try:
            await self._load(config, settings)
        except ModelLoadError as e:
            self._fail(MODEL_CANNOT_BE_LOADED, str(e), path=config.path)
            if old_config is not None:
                await self._restore(old_config)
            return
        self._set_applied(config.path, settings)

    async def _load(self, config: LoadConfig, settings: Settings) -> None:
        """Load on a new native thread and serve from it; raises ModelLoadError."""
        native = NativeThread(config, settings, asyncio.get_running_loop(), self._deliver)
        native.start()
        try:
            runtime = await native.ready()
        finally:
            if not native.alive or native.worker is None:
                await asyncio.to_thread(native.shutdown)
        self._settings = settings
        self._serve(native, runtime)

    async def _restore(self, config: LoadConfig) -> None:
        logger.warning("reloading the previous model path=%s", config.path)
        try:
            await self._load(config, self._settings)
        except ModelLoadError:
            logger.exception("the previous model cannot be reloaded path=%s", config.path)
            self._flush_held_with_error()
            return
        self.board.model_path = config.path

    async def _stop_serving(self) -> None:
        """slots_total = 0, finish in-flight requests, free the loaded model."""
        self._serving = False
        if self.board.slots_total != 0:
            self.board.slots_total = 0
            self.host.status_changed()
        if self._native is None:
            return
        logger.info("draining in-flight requests count=%d", len(self._inflight))
        await self._drained.wait()
        native, runtime = self._native, self._runtime
        self._native, self._runtime = None, None
        await asyncio.to_thread(native.shutdown)
        self.board.slots_processing = 0
        self.board.prefix_hashes = []
        self.board.kv_cache_tokens_used = 0
        self.board.kv_cache_tokens_total = 0
        logger.info("model unloaded path=%s", runtime.config.path if runtime else None)

    def _native_alive(self) -> bool:
        return self._native is not None and self._native.alive and not self._loop_dead

    @property
    def _worker(self) -> DecodeWorker | None:
        return self._native.worker if self._native is not None else None

    def _serve(self, native: NativeThread, runtime: Runtime) -> None:
        self._native = native
        self._runtime = runtime
        self._serving = True
        self._loop_dead = False
        self.board.slots_total = self.slots
        self.board.kv_cache_tokens_used = 0
        self.board.kv_cache_tokens_total = runtime.gen.n_ctx_seq
        held, self._held = list(self._held), deque()
        for message in held:
            self._submit(message)

    async def _unload(self) -> None:
        await self._stop_serving()
        self._flush_held_with_error()

    def _flush_held_with_error(self) -> None:
        held, self._held = list(self._held), deque()
        for message in held:
            self._reject_unserved(message)

    def _update_settings(self, settings: Settings) -> None:
        self._settings = settings
        if self._worker is not None:
            self._worker.settings = settings

    def _on_download(self, event: DownloadProgress) -> None:
        board = self.board
        board.download_filename = event.filename
        board.download_current = event.current
        board.download_total = event.total
        board.download_indeterminate = event.indeterminate
        self.host.status_changed()

    def _set_applied(self, path: str | None, settings: Settings) -> None:
        board = self.board
        board.issues = [i for i in board.issues if i.variant not in self._issue_variants]
        self._issue_variants.clear()
        template_issue = _template_issue(settings.chat_template_override, path)
        if template_issue is not None:  # reported when applied; a good template clears it
            board.issues.append(template_issue)
            self._issue_variants.add(template_issue.variant)
        board.model_path = path
        board.uses_chat_template_override = settings.chat_template_override is not None
        board.state_application_status = StateApplicationStatus.APPLIED
        projector_problem = self._projector_problem(path)
        if projector_problem is not None:
            # Paddler 4.1 reports the state as not appliable; the model serves text.
            board.issues.append(projector_problem)
            self._issue_variants.add(projector_problem.variant)
            board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        if path is None:
            board.slots_total = 0
        self.host.status_changed()
        logger.info("desired state applied model_path=%s slots_total=%d", path, board.slots_total)

    def _projector_problem(self, path: str | None) -> AgentIssue | None:
        if path is None:
            return None
        if self._projector_issue is not None:
            return self._projector_issue
        runtime = self._runtime
        if runtime is not None and runtime.config.projector is not None and runtime.projector_error is not None:
            return projector_issue(runtime.config.projector, runtime.projector_error)
        return None

    def _fail(self, variant: str, message: str, **details: str) -> None:
        logger.warning("desired state not appliable issue=%s message=%s", variant, message)
        board = self.board
        issue = ModelSourceError(variant, message, **details).to_issue()
        board.issues = [i for i in board.issues if i.variant not in self._issue_variants]
        board.issues.append(issue)
        self._issue_variants = {variant}
        board.state_application_status = StateApplicationStatus.ATTEMPTED_AND_NOT_APPLIABLE
        if self._worker is not None and not self._serving:
            self._serving = True
        board.slots_total = self.slots if self._serving else 0
        self.host.status_changed()

    async def close(self) -> None:
        task = self._swap_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._serving = False
        for rid in list(self._inflight):
            self.stop(rid)
        for rendering in list(self._rendering.values()):
            rendering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rendering
        await self._renderer.close()
        native = self._native
        self._native, self._runtime = None, None
        if native is not None:
            await asyncio.to_thread(native.shutdown)


def projector_issue(model_path: str, message: str) -> AgentIssue:
    """Paddler 4.1's ``MultimodalProjectionCannotBeLoaded {model_path}`` (and our
    ``message``)."""
    return AgentIssue(
        variant=MULTIMODAL_PROJECTION_CANNOT_BE_LOADED,
        params={"model_path": model_path, "message": f"The multimodal projection cannot be loaded: {message}"},
    )


def slot_cannot_start(slots: int) -> AgentIssue:
    """Paddler 4.1's ``SlotCannotStart {error, slot_index}``: the first slot beyond
    llama.cpp's sequence limit."""
    error = f"llama.cpp runs at most {MAX_SLOTS} sequences per context; this agent was started with {slots} slots"
    return AgentIssue(variant="SlotCannotStart", params={"error": error, "slot_index": MAX_SLOTS})


def _template_issue(template: str | None, model_path: str | None) -> AgentIssue | None:
    """Paddler 4.1's ``ChatTemplateDoesNotCompile`` for an override that does not
    compile (requests then fail with ChatTemplateError), or None."""
    if template is None:
        return None
    try:
        compile_chat_template(template)
    except ChatTemplateError as e:
        logger.warning("chat template override does not compile: %s", e)
        params = {"error": str(e), "model_path": {"model_path": model_path or ""}, "template_content": template}
        return AgentIssue(variant="ChatTemplateDoesNotCompile", params=params)
    return None


def _probe_model_file(path: str) -> None:
    """Load the vocabulary and metadata only, then free them (one call: nothing leaks
    when the caller is cancelled). Runs no compute, so it may use any thread."""
    NativeModel.load(path, 0, vocab_only=True).free()


def _settings_of(state: BalancerDesiredState) -> Settings:
    override = state.chat_template_override
    use = state.use_chat_template_override and override is not None
    return Settings(
        defaults=state.inference_parameters,
        chat_template_override=override.content if use and override is not None else None,
    )
