"""A tiny random PersonaPlex-shaped LM (Moshi with `dep_q` 16) in the PyTorch layout that
NVIDIA's loader reads: bf16 safetensors, written from seeded numpy alone, so that the golden
tool (tools/derive_personaplex_golden.py, NVIDIA's venv) and the tests (ours) build the same
file byte for byte; the golden stores its sha256.

Imports numpy only (no torch, no mlx, nothing of the package).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

SEED = 1619
# Official config.json keys (LmConfig); NVIDIA's LMModel takes the same names (and ignores
# depformer_context: 15 is what its depformer cache gives, see LmConfig.as_personaplex).
# Every linear input is a multiple of 64, so that q4 (group 32) and q8 (group 64) apply.
CONFIG: dict = {
    "dim": 64, "text_card": 1000, "existing_text_padding_id": 3, "n_q": 16, "dep_q": 16,
    "card": 2048, "num_heads": 4, "num_layers": 2, "hidden_scale": 4.5, "causal": True,
    "layer_scale": None, "context": 3000, "max_period": 10000, "gating": "silu",
    "norm": "rms_norm_f32", "positional_embedding": "rope", "depformer_dim": 64,
    "depformer_dim_feedforward": 192, "depformer_num_heads": 2, "depformer_num_layers": 2,
    "depformer_layer_scale": None, "depformer_multi_linear": True, "depformer_context": 15,
    "depformer_max_period": 10000, "depformer_gating": "silu", "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}


def plain_moshi_config() -> dict:
    """The same sizes as a plain Moshi config.json (dep_q 8): what a config that does not know
    PersonaPlex says (the loader finds dep_q 16 in the tensors)."""
    return {**CONFIG, "dep_q": 8, "depformer_context": 8}


def _gated_hidden(dim: int, feed_forward: int) -> int:
    return 21 * dim // 8 if feed_forward == 4 * dim else 2 * feed_forward // 3


def tensors(config: dict = CONFIG, seed: int = SEED) -> dict[str, np.ndarray]:
    """Every tensor, float32 values, in a fixed order."""
    rng = np.random.default_rng(seed)
    dim, ddim, card, text = (config["dim"], config["depformer_dim"], config["card"],
                             config["text_card"])
    slices, n_q = config["dep_q"], config["n_q"]
    hidden = _gated_hidden(dim, int(config["hidden_scale"] * dim))
    dhidden = _gated_hidden(ddim, config["depformer_dim_feedforward"])

    def linear(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def embedding(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32)

    def gain(size: int) -> np.ndarray:
        return (1 + 0.2 * rng.uniform(-1, 1, (1, 1, size))).astype(np.float32)

    out: dict[str, np.ndarray] = {}
    for k in range(n_q):
        out[f"emb.{k}.weight"] = embedding(card + 1, dim)
    out["text_emb.weight"] = embedding(text + 1, dim)
    out["text_linear.weight"] = linear(text, dim)
    out["out_norm.alpha"] = gain(dim)
    for layer in range(config["num_layers"]):
        prefix = f"transformer.layers.{layer}."
        out[prefix + "self_attn.in_proj_weight"] = linear(3 * dim, dim)
        out[prefix + "self_attn.out_proj.weight"] = linear(dim, dim)
        out[prefix + "norm1.alpha"] = gain(dim)
        out[prefix + "norm2.alpha"] = gain(dim)
        out[prefix + "gating.linear_in.weight"] = linear(2 * hidden, dim)
        out[prefix + "gating.linear_out.weight"] = linear(dim, hidden)
    for k in range(slices):
        out[f"depformer_in.{k}.weight"] = linear(ddim, dim)
        out[f"linears.{k}.weight"] = linear(card, ddim)
    out["depformer_text_emb.weight"] = embedding(text + 1, ddim)
    for k in range(slices - 1):
        out[f"depformer_emb.{k}.weight"] = embedding(card + 1, ddim)
    for layer in range(config["depformer_num_layers"]):
        prefix = f"depformer.layers.{layer}."
        out[prefix + "self_attn.in_proj_weight"] = linear(slices * 3 * ddim, ddim)
        out[prefix + "self_attn.out_proj.weight"] = linear(slices * ddim, ddim)
        out[prefix + "norm1.alpha"] = gain(ddim)
        out[prefix + "norm2.alpha"] = gain(ddim)
        for k in range(slices):
            out[prefix + f"gating.{k}.linear_in.weight"] = linear(2 * dhidden, ddim)
            out[prefix + f"gating.{k}.linear_out.weight"] = linear(ddim, dhidden)
    return out


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(values: np.ndarray) -> np.ndarray:
    """The float32 values a bf16 file holds for `values`."""
    return (bf16_bits(values).astype(np.uint32) << 16).view(np.float32)


def write(path: Path, config: dict = CONFIG, seed: int = SEED) -> str:
    """Write the checkpoint (bf16, metadata {"format": "pt"}); returns its sha256."""
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, value in tensors(config, seed).items():
        blob = bf16_bits(value).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
