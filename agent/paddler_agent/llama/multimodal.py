"""The multimodal projector (``multimodal_projection``) on llama.cpp's libmtmd, through
llama-cpp-python's ``mtmd_cpp`` bindings.

Part of :mod:`paddler_agent.llama`, the only subpackage that imports ``llama_cpp``
(the layering test checks it). Everything here runs on the model's
native thread (load, tokenize, encode), like the rest of llama.cpp.

A prompt with images is tokenized by libmtmd into chunks: text tokens and image
chunks (the projector's embeddings of one image, ``n_tokens`` KV cells, ``n_pos``
positions). The engine keeps one token list per prompt, as for text, in which an
image chunk stands as ``n_tokens`` *placeholder* tokens: negative ids, unique to the
request, so the KV cache bookkeeping (cells, prefix reuse, preemption) needs no
second kind of entry, and no other request's prompt can ever share cells past an
image. The placeholders never reach a ``llama_batch``: the engine evaluates the chunk
they stand for with :meth:`Projector.eval_image` instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
from llama_cpp import mtmd_cpp

from paddler_agent.images import DecodedImage
from paddler_agent.llama.errors import RequestError, prompt_bytes
from paddler_core.inference import GenerationError

logger = logging.getLogger(__name__)

_GGML_LOG_LEVEL_ERROR = 4

_lib = mtmd_cpp._libmtmd
_lib.mtmd_input_chunk_get_n_pos.argtypes = [ctypes.c_void_p]
_lib.mtmd_input_chunk_get_n_pos.restype = ctypes.c_int32
_lib.mtmd_decode_use_non_causal.argtypes = [ctypes.c_void_p]
_lib.mtmd_decode_use_non_causal.restype = ctypes.c_bool
_lib.mtmd_decode_use_mrope.argtypes = [ctypes.c_void_p]
_lib.mtmd_decode_use_mrope.restype = ctypes.c_bool


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


# ggml's GGUF reader (beside libmtmd in llama-cpp-python's lib folder): libmtmd reads a
# projector's tensors without checking that the file holds them all.
_ggml = ctypes.CDLL(os.path.join(os.path.dirname(mtmd_cpp.__file__), "lib", "libggml-base.so"))
_ggml.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
_ggml.gguf_init_from_file.restype = ctypes.c_void_p
_ggml.gguf_free.argtypes = [ctypes.c_void_p]
_ggml.gguf_free.restype = None
_ggml.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
_ggml.gguf_get_data_offset.restype = ctypes.c_size_t
_ggml.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
_ggml.gguf_get_n_tensors.restype = ctypes.c_int64
_ggml.gguf_get_tensor_offset.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_ggml.gguf_get_tensor_offset.restype = ctypes.c_size_t
_ggml.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
_ggml.gguf_get_tensor_size.restype = ctypes.c_size_t


def check_gguf_complete(path: str) -> None:
    """Raise ProjectorLoadError unless ``path`` is a GGUF file that holds all the tensor
    data its header declares (a truncated download would load with garbage weights)."""
    handle = _ggml.gguf_init_from_file(path.encode(), _GgufInitParams(True, None))
    if not handle:
        raise ProjectorLoadError(f"the multimodal projection {path} is not a GGUF file")
    try:
        base = int(_ggml.gguf_get_data_offset(handle))
        end = base
        for i in range(int(_ggml.gguf_get_n_tensors(handle))):
            end = max(
                end, base + int(_ggml.gguf_get_tensor_offset(handle, i)) + int(_ggml.gguf_get_tensor_size(handle, i))
            )
    finally:
        _ggml.gguf_free(handle)
    size = os.path.getsize(path)
    if size < end:
        raise ProjectorLoadError(f"the multimodal projection {path} is truncated: {size} bytes, its tensors need {end}")


class ProjectorLoadError(Exception):
    """libmtmd refused the projector file (not a projector GGUF, truncated, or made for
    a language model of another embedding size)."""


@dataclass
class ImageChunk:
    """One image of a prompt: ``n_tokens`` cells of the KV cache, ``n_pos`` positions."""

    handle: Any
    n_tokens: int
    n_pos: int


@dataclass
class MediaPrompt:
    """A tokenized prompt with images: ``tokens`` with placeholders, and the image chunk
    each run of placeholders stands for (keyed by the run's first placeholder)."""

    tokens: list[int]
    images: dict[int, ImageChunk] = field(default_factory=dict)
    _chunks: Any = None

    def free(self) -> None:
        if self._chunks:
            mtmd_cpp.mtmd_input_chunks_free(self._chunks)
            self._chunks = None
            self.images.clear()


def is_placeholder(token: int) -> bool:
    return token < 0


class Projector:
    """A loaded projector bound to the loaded language model."""

    def __init__(self, handle: Any, path: str) -> None:
        self.handle = handle
        self.path = path
        self.marker = ""
        self.non_causal = bool(_lib.mtmd_decode_use_non_causal(handle))
        self.mrope = bool(_lib.mtmd_decode_use_mrope(handle))

    @classmethod
    def load(cls, path: str, model: Any, n_threads: int, use_gpu: bool) -> Projector:
        """Load ``path`` for the language model ``model`` (a ``llama_model``); raises
        ProjectorLoadError."""
        check_gguf_complete(path)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.n_threads = n_threads
        params.verbosity = _GGML_LOG_LEVEL_ERROR
        # A marker no client can guess: text that happens to hold libmtmd's default
        # marker (<__media__>) must stay text, not become a missing image.
        marker = f"<__paddler_image_{secrets.token_hex(8)}__>"
        marker_bytes = marker.encode()
        params.media_marker = marker_bytes
        handle = mtmd_cpp.mtmd_init_from_file(path.encode(), model, params)
        if not handle:
            raise ProjectorLoadError(
                f"llama.cpp cannot load the multimodal projection {path}: not a multimodal projector GGUF "
                "for this model (see the agent log)"
            )
        if not mtmd_cpp.mtmd_support_vision(handle):
            mtmd_cpp.mtmd_free(handle)
            raise ProjectorLoadError(f"the multimodal projection {path} has no vision encoder (audio only?)")
        projector = cls(handle, path)
        projector.marker = marker
        return projector

    def free(self) -> None:
        if self.handle:
            mtmd_cpp.mtmd_free(self.handle)
            self.handle = None

    def tokenize(
        self,
        text: str,
        images: Sequence[DecodedImage],
        *,
        add_special: bool,
        next_placeholder: int,
    ) -> MediaPrompt:
        """Tokens and image chunks of ``text`` whose markers stand for ``images``;
        placeholders count down from ``next_placeholder`` (negative). Raises
        RequestError."""
        bitmaps = [self._bitmap(image) for image in images]
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        try:
            data = prompt_bytes(text)
            source = mtmd_cpp.mtmd_input_text(data, add_special, True)
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            rc = int(mtmd_cpp.mtmd_tokenize(self.handle, chunks, ctypes.byref(source), array, len(bitmaps)))
            if rc == 1:
                raise RequestError(
                    GenerationError.MULTIMODAL_TOKENIZATION_FAILED,
                    f"the prompt has a different number of image places than its {len(bitmaps)} images",
                )
            if rc != 0:
                raise RequestError(
                    GenerationError.MULTIMODAL_TOKENIZATION_FAILED,
                    f"the projector could not preprocess the images (code {rc})",
                )
            prompt = MediaPrompt(tokens=[], _chunks=chunks)
            chunks = None
            self._fill(prompt, next_placeholder)
            return prompt
        finally:
            if chunks:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)

    @staticmethod
    def _bitmap(image: DecodedImage) -> Any:
        pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
        bitmap = mtmd_cpp.mtmd_bitmap_init(image.width, image.height, pixels)
        if not bitmap:
            raise RequestError(
                GenerationError.IMAGE_DECODING_FAILED, f"libmtmd refused a {image.width}x{image.height} image"
            )
        return bitmap

    def _fill(self, prompt: MediaPrompt, next_placeholder: int) -> None:
        chunks = prompt._chunks
        placeholder = next_placeholder
        for i in range(int(mtmd_cpp.mtmd_input_chunks_size(chunks))):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            kind = int(mtmd_cpp.mtmd_input_chunk_get_type(chunk))
            if kind == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                if ptr:
                    prompt.tokens.extend(ptr[k] for k in range(n.value))
                continue
            if kind != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                raise RequestError(
                    GenerationError.MULTIMODAL_TOKENIZATION_FAILED, "the prompt holds media other than images"
                )
            n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(_lib.mtmd_input_chunk_get_n_pos(chunk))
            prompt.images[placeholder] = ImageChunk(chunk, n_tokens, n_pos)
            prompt.tokens.extend(range(placeholder, placeholder - n_tokens, -1))
            placeholder -= n_tokens

    def eval_image(self, ctx: Any, image: ImageChunk, n_past: int, seq: int, n_batch: int) -> int:
        """Encode ``image`` and decode its embeddings into sequence ``seq`` from position
        ``n_past``; the position after it. Raises RequestError."""
        new_n_past = llama_cpp.llama_pos(n_past)
        rc = int(
            mtmd_cpp.mtmd_helper_eval_chunk_single(
                self.handle, ctx, image.handle, n_past, seq, n_batch, False, ctypes.byref(new_n_past)
            )
        )
        if rc != 0:
            raise RequestError(
                GenerationError.MULTIMODAL_INGESTION_FAILED, f"the projector could not evaluate an image (code {rc})"
            )
        return int(new_n_past.value)
