"""llama.cpp's native side: backend and log forwarding, the loaded model, its generation and
embedding contexts, and :class:`Runtime` (what one loaded model holds)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from paddler_agent.llama.errors import prompt_bytes
from paddler_agent.llama.multimodal import (
    Projector,
    ProjectorLoadError,
)
from paddler_core.desired_state import (
    InferenceParameters,
    KvCacheDtype,
    PoolingType,
)

logger = logging.getLogger(__name__)


MAX_SLOTS = 64
"""llama.cpp's LLAMA_MAX_SEQ."""
WARMUP_TOKENS = 4
EMBEDDING_MAX_SEQS = 32
"""Documents per embedding decode (each is one sequence of the embedding context)."""


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


# ---- llama.cpp logging ----------------------------------------------------------------------

_native_log = logging.getLogger("paddler_agent.llama.llama_cpp")
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
def capture_native_errors() -> Any:
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


CACHED_SEQUENCES_PER_SLOT = 4
"""Cached sequences (running or idle) per slot: an agent keeps up to this many
conversations per slot in its KV cache, least recently used evicted first."""
MAX_CACHED_SEQUENCES = 64
"""llama.cpp's smallest LLAMA_MAX_SEQ across the versions we build."""


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

    @property
    def sequences(self) -> int:
        """Sequence ids of the generation context: more than the slots, so idle
        conversations stay cached in the same unified KV cache (``context_size`` cells,
        as many as with one id per slot) until a running slot needs their room."""
        return max(self.slots, min(MAX_CACHED_SEQUENCES, self.slots * CACHED_SEQUENCES_PER_SLOT))

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
        with capture_native_errors() as errors:
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
        data = prompt_bytes(text)
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
        params.n_seq_max = config.sequences
        params.kv_unified = True
        params.embeddings = False
    return params


class GenContext:
    """The generation context: one unified KV cache, ``config.sequences`` sequence ids
    (running slots and cached idle conversations)."""

    def __init__(self, model: NativeModel, config: LoadConfig) -> None:
        params = _context_params(config, embeddings=False)
        with capture_native_errors() as errors:
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
        with capture_native_errors() as errors:
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
