"""The tiny Moshi LM and the tiny STT in the transformers layouts (MoshiForConditionalGeneration,
KyutaiSpeechToTextForConditionalGeneration), rebuilt here from tests/fixtures/lm_pytorch.safetensors
and tests/fixtures/stt/stt_pytorch.safetensors with numpy alone, and proven identical to the files
transformers' own conversion scripts made (tools/derive_transformers_layouts.py): every
tensor's dtype, shape and sha256 must equal lm_transformers.manifest.json /
stt/stt_transformers.manifest.json.

The Moshi rebuild follows transformers' conversion: separate q/k/v projections, q and k rows in the
half-split RoPE order, depformer matrices stacked over the 8 slices, RMSNorm gains flat, and a
tiny random MimiModel bundled under `audio_encoder.` (values from a seeded generator per name).
bfloat16 tensors are handled as their raw 16-bit patterns, so the rebuild is bit-exact. The STT
one is at the end of this file.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = FIXTURES / "lm_transformers.manifest.json"
CONFIG = FIXTURES / "lm_transformers_config.json"


def _read_bf16(path: Path) -> dict[str, np.ndarray]:
    """Raw uint16 patterns of a bf16 safetensors file."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        assert entry["dtype"] == "BF16", name
        start, end = (8 + length + offset for offset in entry["data_offsets"])
        out[name] = np.frombuffer(data[start:end], "<u2").reshape(entry["shape"])
    return out


def _write_bf16(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        blob = np.ascontiguousarray(tensors[name], "<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch's .to(bfloat16))."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")


def tiny_mimi_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def half_split_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Our interleaved q/k rows (2i, 2i+1 rotate together) -> transformers' (i, i + d/2)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _temporal_layers(pt: dict[str, np.ndarray], lm: dict, heads: int, prefix: str,
                     out: dict[str, np.ndarray]) -> None:
    """The temporal transformer's layers as transformers names them (under `prefix`): q/k/v
    split, q/k rows in rotate-half order, norms as flat gains."""
    for layer in range(lm["num_layers"]):
        src, dst = f"transformer.layers.{layer}.", f"{prefix}.{layer}."
        q, k, v = np.split(pt[src + "self_attn.in_proj_weight"], 3)
        out[dst + "self_attn.q_proj.linear.weight"] = half_split_rope_rows(q, heads)
        out[dst + "self_attn.k_proj.linear.weight"] = half_split_rope_rows(k, heads)
        out[dst + "self_attn.v_proj.linear.weight"] = v
        out[dst + "self_attn.o_proj.linear.weight"] = pt[src + "self_attn.out_proj.weight"]
        out[dst + "mlp.fc1.weight"] = pt[src + "gating.linear_in.weight"]
        out[dst + "mlp.fc2.weight"] = pt[src + "gating.linear_out.weight"]
        out[dst + "input_layernorm.weight"] = pt[src + "norm1.alpha"].reshape(-1)
        out[dst + "post_attention_layernorm.weight"] = pt[src + "norm2.alpha"].reshape(-1)


def rebuild(names_and_shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    pt = _read_bf16(FIXTURES / "lm_pytorch.safetensors")
    lm = json.loads((FIXTURES / "lm_config.json").read_text())
    heads, dep_q = lm["num_heads"], lm["dep_q"]
    out: dict[str, np.ndarray] = {}
    for k in range(lm["n_q"]):
        out[f"embed_tokens.{k}.weight"] = pt[f"emb.{k}.weight"]
    out["decoder.model.embed_tokens.weight"] = pt["text_emb.weight"]
    out["decoder.lm_head.weight"] = pt["text_linear.weight"]
    out["decoder.model.norm.weight"] = pt["out_norm.alpha"].reshape(-1)
    _temporal_layers(pt, lm, heads, "decoder.model.layers", out)
    out["depth_decoder.text_embed_tokens.weight"] = pt["depformer_text_emb.weight"]
    for k in range(dep_q - 1):
        out[f"depth_decoder.embed_tokens.{k}.weight"] = pt[f"depformer_emb.{k}.weight"]
    out["depth_decoder.input_projections.weight"] = np.stack(
        [pt[f"depformer_in.{k}.weight"] for k in range(dep_q)])
    out["depth_decoder.lm_heads.weight"] = np.stack(
        [pt[f"linears.{k}.weight"] for k in range(dep_q)])
    for layer in range(lm["depformer_num_layers"]):
        src, dst = f"depformer.layers.{layer}.", f"depth_decoder.layers.{layer}."
        in_proj = pt[src + "self_attn.in_proj_weight"]
        q, k, v = np.split(in_proj.reshape(dep_q, -1, in_proj.shape[-1]), 3, axis=1)
        out[dst + "self_attn.q_proj.linear.weight"] = q
        out[dst + "self_attn.k_proj.linear.weight"] = k
        out[dst + "self_attn.v_proj.linear.weight"] = v
        out_proj = pt[src + "self_attn.out_proj.weight"]
        out[dst + "self_attn.o_proj.linear.weight"] = out_proj.reshape(dep_q, -1,
                                                                       out_proj.shape[-1])
        for part, fc in (("linear_in", "fc1"), ("linear_out", "fc2")):
            out[dst + f"mlp.{fc}.weight"] = np.stack(
                [pt[src + f"gating.{k}.{part}.weight"] for k in range(dep_q)])
        out[dst + "input_layernorm.weight"] = pt[src + "norm1.alpha"].reshape(-1)
        out[dst + "post_attention_layernorm.weight"] = pt[src + "norm2.alpha"].reshape(-1)
    for name, shape in names_and_shapes.items():
        if name.startswith("audio_encoder."):
            out[name] = _bf16(tiny_mimi_value(name[len("audio_encoder."):], tuple(shape)))
    return out


def _ensure_folder(folder: Path, manifest_path: Path, write, files: dict[str, Path]) -> Path:
    """`folder`/model.safetensors rebuilt once by `write(path, names_and_shapes)`, `files`
    copied beside it, and the weights checked against the manifest every time."""
    from references import assert_matches_manifest

    manifest = json.loads(manifest_path.read_text())["tensors"]
    weights = folder / "model.safetensors"
    if not weights.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "model.safetensors.partial"
        write(partial, {k: v["shape"] for k, v in manifest.items()})
        partial.replace(weights)
    for name, source in files.items():
        shutil.copy(source, folder / name)
    assert_matches_manifest(weights, manifest, "against transformers' file")
    return folder


def ensure_transformers_moshi(cache_dir: Path) -> Path:
    """A folder like kmhf/hf-moshiko's (config.json + model.safetensors) holding the tiny LM;
    rebuilt once into `cache_dir`, checked against the manifest every time."""
    return _ensure_folder(cache_dir / "lm_transformers", MANIFEST,
                          lambda path, shapes: _write_bf16(path, rebuild(shapes)),
                          {"config.json": CONFIG})


# ---------------------------------------------------------------------------- Kyutai STT

STT_FIXTURES = FIXTURES / "stt"
STT_MANIFEST = STT_FIXTURES / "stt_transformers.manifest.json"
STT_CONFIG = STT_FIXTURES / "stt_transformers_config.json"
STT_PREPROCESSOR = STT_FIXTURES / "stt_transformers_preprocessor_config.json"
CODEC_PREFIX = "codec_model."


def _bf16_as_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> the float32 of the same value (what torch.cat with a float32
    tensor widens them to)."""
    return (bits.astype(np.uint32) << 16).view("<f4")


def rebuild_stt(names_and_shapes: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The tiny STT as transformers' conversion script writes it: text_emb, the 32 audio
    tables and a zero row in one float32 embedding table; text_linear plus a zero row as a
    float32 lm_head; q/k rows in the half-split RoPE order; gains flat; no extra heads; the
    tiny Mimi (float32) under `codec_model.`. Raw bit patterns: bf16 as uint16, float32 as
    float32."""
    pt = _read_bf16(STT_FIXTURES / "stt_pytorch.safetensors")
    lm = json.loads((STT_FIXTURES / "stt_config.json").read_text())
    heads, dim = lm["num_heads"], lm["dim"]
    zero_row = np.zeros((1, dim), np.float32)
    out: dict[str, np.ndarray] = {}
    tables = [pt["text_emb.weight"]] + [pt[f"emb.{k}.weight"] for k in range(lm["n_q"])]
    out["model.embed_tokens.embed_tokens.weight"] = np.concatenate(
        [_bf16_as_f32(t) for t in tables] + [zero_row])
    out["lm_head.weight"] = np.concatenate([_bf16_as_f32(pt["text_linear.weight"]), zero_row])
    out["model.norm.weight"] = pt["out_norm.alpha"].reshape(-1)
    _temporal_layers(pt, lm, heads, "model.layers", out)
    for name, shape in names_and_shapes.items():
        if name.startswith(CODEC_PREFIX):
            out[name] = tiny_mimi_value(name[len(CODEC_PREFIX):], tuple(shape))
    return out


def _write_mixed(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors with uint16 arrays stored as BF16 and float32 ones as F32."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        array = tensors[name]
        dtype = "BF16" if array.dtype == np.uint16 else "F32"
        blob = np.ascontiguousarray(array, "<u2" if dtype == "BF16" else "<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def ensure_transformers_stt(cache_dir: Path) -> Path:
    """A folder like kyutai/stt-*-trfs (config.json, preprocessor_config.json,
    model.safetensors) holding the tiny STT; rebuilt once into `cache_dir`, checked against
    the manifest every time."""
    return _ensure_folder(cache_dir / "stt_transformers", STT_MANIFEST,
                          lambda path, shapes: _write_mixed(path, rebuild_stt(shapes)),
                          {"config.json": STT_CONFIG,
                           "preprocessor_config.json": STT_PREPROCESSOR})
