"""A small multimodal projector GGUF for SmolLM2, written here with the ``gguf`` package.

No vision-language model can be fetched on these machines (no Hugging Face; PyPI and
npm ship none; see docs/openai.md, "Images"). This writes a real libmtmd projector
file of SmolVLM's kind (``idefics3``: a SigLIP-style vision transformer, pixel
shuffle, a linear projection into the language model's 576-wide embeddings) with
seeded random weights: 64x64 pixels, 8x8 patches, one layer, 16 image tokens. llama.cpp
loads, preprocesses, encodes and decodes it like SmolVLM's own, so a test drives the
agent's whole image path on real code; the answers prove the image reached the model
(different images, different answers), not that it was understood.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

SMOLLM2_EMBD = 576
IMAGE_SIZE = 64
PATCH = 8
WIDTH = 64
HEADS = 4
FFN = 128
SCALE = 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2


def write_test_projector(path: Path, *, text_embd: int = SMOLLM2_EMBD, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "idefics3")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH)
    writer.add_uint32("clip.vision.embedding_length", WIDTH)
    writer.add_uint32("clip.vision.feed_forward_length", FFN)
    writer.add_uint32("clip.vision.projection_dim", text_embd)
    writer.add_uint32("clip.vision.block_count", 1)
    writer.add_uint32("clip.vision.attention.head_count", HEADS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_uint32("clip.vision.projector.scale_factor", SCALE)
    patches = (IMAGE_SIZE // PATCH) ** 2
    writer.add_tensor("v.patch_embd.weight", weight(WIDTH, 3, PATCH, PATCH))
    writer.add_tensor("v.patch_embd.bias", weight(WIDTH))
    writer.add_tensor("v.position_embd.weight", weight(patches, WIDTH, scale=0.02))
    for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
        writer.add_tensor(f"v.blk.0.{name}.weight", weight(WIDTH, WIDTH))
        writer.add_tensor(f"v.blk.0.{name}.bias", weight(WIDTH, scale=0.02))
    for name in ("ln1", "ln2"):
        writer.add_tensor(f"v.blk.0.{name}.weight", np.ones(WIDTH, dtype=np.float32))
        writer.add_tensor(f"v.blk.0.{name}.bias", np.zeros(WIDTH, dtype=np.float32))
    writer.add_tensor("v.blk.0.ffn_up.weight", weight(FFN, WIDTH))
    writer.add_tensor("v.blk.0.ffn_up.bias", weight(FFN, scale=0.02))
    writer.add_tensor("v.blk.0.ffn_down.weight", weight(WIDTH, FFN))
    writer.add_tensor("v.blk.0.ffn_down.bias", weight(WIDTH, scale=0.02))
    writer.add_tensor("v.post_ln.weight", np.ones(WIDTH, dtype=np.float32))
    writer.add_tensor("v.post_ln.bias", np.zeros(WIDTH, dtype=np.float32))
    writer.add_tensor("mm.model.fc.weight", weight(text_embd, WIDTH * SCALE * SCALE, scale=0.05))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
