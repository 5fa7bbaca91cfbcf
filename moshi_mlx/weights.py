"""Moshi LM weight files: both checkpoint layouts mapped onto the official MLX layout, plus the
affine quantization (4 bits / group 32, 8 bits / group 64) of the official MLX files.

Reading is done by hand from the safetensors format (8-byte little-endian header length, JSON
header, raw tensor bytes) so that every tensor can be read on its own, the header can be
checked before anything is loaded, and a broken file gives one clear line instead of a trace.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from .errors import WeightsError
from .models.lm_config import LmConfig


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


QUANTIZATIONS: dict[int, Quantization] = {4: Quantization(4, 32), 8: Quantization(8, 64)}

# safetensors dtype name -> (MLX dtype, numpy dtype holding the same bytes)
_DTYPES: dict[str, tuple[mx.Dtype, np.dtype]] = {
    "BF16": (mx.bfloat16, np.dtype("<u2")),
    "F16": (mx.float16, np.dtype("<f2")),
    "F32": (mx.float32, np.dtype("<f4")),
    "U32": (mx.uint32, np.dtype("<u4")),
    "I32": (mx.int32, np.dtype("<i4")),
    "U8": (mx.uint8, np.dtype("u1")),
    "I64": (mx.int64, np.dtype("<i8")),
}
SAFETENSORS_DTYPE_NAMES: dict[mx.Dtype, str] = {dt: name for name, (dt, _) in _DTYPES.items()}


def mlx_dtype(safetensors_dtype: str) -> mx.Dtype:
    """MLX dtype of a safetensors dtype name ("BF16" -> mx.bfloat16)."""
    return _DTYPES[safetensors_dtype][0]


_MAX_HEADER_BYTES = 100 * 1024 * 1024
_QUANT_SUFFIXES = ("weight", "scales", "biases")


# --------------------------------------------------------------------------------------------
# safetensors reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_bytes: int  # bytes before the data section (8 + JSON length)
    file_size: int

    def in_file_order(self) -> list[str]:
        return sorted(self.tensors, key=lambda name: self.tensors[name].start)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; WeightsError (one line) for any problem."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size < 8:
        raise WeightsError(f"{path} is not a safetensors file (only {file_size} bytes)")
    with open(path, "rb") as f:
        json_len = int.from_bytes(f.read(8), "little")
        if json_len > min(file_size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(
                f"{path} is not a safetensors file, or is truncated (header length {json_len}, "
                f"file size {file_size})"
            )
        raw = f.read(json_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    data_size = file_size - 8 - json_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_size)
    # The format stores tensors back to back: holes or trailing bytes mean a damaged file.
    position = 0
    for info in sorted(tensors.values(), key=lambda info: info.start):
        if info.start != position:
            raise WeightsError(f"{path} is corrupt: tensor data is not contiguous")
        position = info.end
    if position != data_size:
        raise WeightsError(
            f"{path} is corrupt: {data_size - position} bytes after the last tensor"
        )
    return SafetensorsHeader(path, tensors, metadata, 8 + json_len, file_size)


def _parse_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        message = f"{path} is not a safetensors file (bad header entry {name!r})"
        raise WeightsError(message) from None
    if dtype not in _DTYPES:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    expected = math.prod(shape) * _DTYPES[dtype][1].itemsize
    if any(d < 0 for d in shape) or start < 0 or end - start != expected:
        raise WeightsError(f"{path} is corrupt: tensor {name} has inconsistent size in its header")
    if end > data_size:
        raise WeightsError(
            f"{path} is truncated: tensor {name} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes"
        )
    return TensorInfo(dtype, shape, start, end)


def tensor_from_bytes(raw: bytes | bytearray | memoryview, info: TensorInfo) -> mx.array:
    """Raw little-endian tensor bytes -> MLX array of the tensor's dtype and shape."""
    mx_dtype, np_dtype = _DTYPES[info.dtype]
    host = np.frombuffer(raw, dtype=np_dtype).reshape(info.shape)
    array = mx.array(host)
    return array.view(mx_dtype) if info.dtype == "BF16" else array


def tensor_buffer(array: mx.array) -> memoryview:
    """MLX array -> a view of its raw little-endian bytes (C order), as stored in safetensors."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(array, copy=False))).cast("B")


def tensor_to_bytes(array: mx.array) -> bytes:
    return bytes(tensor_buffer(array))


def read_tensor(f: BinaryIO, header: SafetensorsHeader, name: str) -> tuple[bytes, mx.array]:
    """Read one tensor from an open file; returns its raw bytes and the MLX array."""
    info = header.tensors[name]
    f.seek(header.header_bytes + info.start)
    raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise WeightsError(f"{header.path} is truncated while reading tensor {name}")
    return raw, tensor_from_bytes(raw, info)


def iter_tensors(header: SafetensorsHeader) -> Iterator[tuple[str, bytes, mx.array]]:
    """Yield (name, raw bytes, array) one tensor at a time, in file order."""
    with open(header.path, "rb") as f:
        for name in header.in_file_order():
            raw, array = read_tensor(f, header, name)
            yield name, raw, array


# --------------------------------------------------------------------------------------------
# key layouts

_NORM_KEY = re.compile(r"(^|\.)(out_norm|norm\d)\.weight$")


def is_quantizable(mlx_key: str) -> bool:
    """True for the `.weight` of every Linear/Embedding in the MLX layout (norms stay bf16)."""
    return mlx_key.endswith(".weight") and not _NORM_KEY.search(mlx_key)


def detect_layout(keys: Iterable[str], source: str = "checkpoint") -> str:
    """'pytorch' or 'mlx' from the tensor names; WeightsError when it is neither."""
    keys = set(keys)
    if "out_norm.alpha" in keys or "emb.0.weight" in keys or "depformer_in.0.weight" in keys:
        return "pytorch"
    if "out_norm.weight" in keys or "audio_embs.0.weight" in keys or "audio_embs.0.scales" in keys:
        return "mlx"
    raise WeightsError(f"{source} is not a Moshi LM checkpoint (no out_norm or audio "
                       "embedding tensors)")


def _norm_gain(tensor: mx.array) -> mx.array:
    return tensor.reshape(-1)


def _chunk(tensor: mx.array, parts: int, key: str) -> list[mx.array]:
    if tensor.ndim != 2 or tensor.shape[0] % parts:
        shape = tuple(tensor.shape)
        raise WeightsError(f"tensor {key} of shape {shape} cannot be split in {parts} slices")
    rows = tensor.shape[0] // parts
    return [tensor[k * rows : (k + 1) * rows] for k in range(parts)]


_PT_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"emb\.(\d+)\.weight"), r"audio_embs.\1.weight"),
    (re.compile(r"text_emb\.weight"), "text_emb.weight"),
    (re.compile(r"text_linear\.weight"), "text_linear.weight"),
    (re.compile(r"transformer\.layers\.(\d+)\.self_attn\.in_proj_weight"),
     r"transformer.layers.\1.self_attn.in_proj.weight"),
    (re.compile(r"transformer\.layers\.(\d+)\.self_attn\.out_proj\.weight"),
     r"transformer.layers.\1.self_attn.out_proj.weight"),
    (re.compile(r"transformer\.layers\.(\d+)\.gating\.(linear_in|linear_out)\.weight"),
     r"transformer.layers.\1.gating.\2.weight"),
    (re.compile(r"depformer_in\.(\d+)\.weight"), r"depformer.slices.\1.linear_in.weight"),
    (re.compile(r"linears\.(\d+)\.weight"), r"depformer.slices.\1.linear_out.weight"),
    (re.compile(r"depformer_text_emb\.weight"), "depformer.slices.0.emb.weight"),
    (re.compile(r"extra_heads\.(\d+)\.weight"), r"extra_heads.\1.weight"),
    (re.compile(r"depformer\.layers\.(\d+)\.gating\.(\d+)\.(linear_in|linear_out)\.weight"),
     r"depformer.slices.\2.transformer.layers.\1.gating.\3.weight"),
]
_PT_NORM = re.compile(r"(transformer\.layers\.\d+\.norm[12]|out_norm)\.alpha")
_PT_DEP_NORM = re.compile(r"depformer\.layers\.(\d+)\.(norm[12])\.alpha")
_PT_DEP_EMB = re.compile(r"depformer_emb\.(\d+)\.weight")
_PT_DEP_ATTN = re.compile(r"depformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight)")


def pytorch_to_mlx(key: str, tensor: mx.array, dep_q: int) -> list[tuple[str, mx.array]]:
    """One PyTorch-layout tensor -> its MLX-layout tensors (lazy; nothing is evaluated).

    The depformer attention matrices hold the `dep_q` per-slice matrices stacked on dim 0 and
    fan out to `depformer.slices.{k}`; its norms are shared by all slices and are copied.
    """
    for pattern, target in _PT_RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(target, key), tensor)]
    if _PT_NORM.fullmatch(key):
        return [(key[: -len("alpha")] + "weight", _norm_gain(tensor))]
    if match := _PT_DEP_EMB.fullmatch(key):
        return [(f"depformer.slices.{int(match[1]) + 1}.emb.weight", tensor)]
    if match := _PT_DEP_NORM.fullmatch(key):
        layer, norm = match[1], match[2]
        gain = _norm_gain(tensor)
        return [
            (f"depformer.slices.{k}.transformer.layers.{layer}.{norm}.weight", gain)
            for k in range(dep_q)
        ]
    if match := _PT_DEP_ATTN.fullmatch(key):
        layer = match[1]
        proj = "in_proj" if match[2] == "in_proj_weight" else "out_proj"
        return [
            (f"depformer.slices.{k}.transformer.layers.{layer}.self_attn.{proj}.weight", part)
            for k, part in enumerate(_chunk(tensor, dep_q, key))
        ]
    raise WeightsError(f"unexpected tensor {key!r}: not part of a Moshi LM checkpoint")


def pytorch_dep_q(keys: Iterable[str]) -> int:
    """Number of depformer slices of a PyTorch-layout checkpoint (its `depformer_in.{k}`);
    0 for a Kyutai STT checkpoint (no depformer)."""
    pattern = re.compile(r"depformer_in\.(\d+)\.weight")
    indices = {int(m[1]) for key in keys if (m := pattern.fullmatch(key))}
    return max(indices) + 1 if indices else 0


# --------------------------------------------------------------------------------------------
# quantization


def quantize_tensor(key: str, tensor: mx.array, q: Quantization) -> list[tuple[str, mx.array]]:
    """One MLX-layout tensor -> itself, or `X.weight`/`X.scales`/`X.biases` when quantizable."""
    if not is_quantizable(key):
        return [(key, tensor)]
    in_dim = tensor.shape[-1]
    if in_dim % q.group_size:
        raise WeightsError(
            f"tensor {key} has {in_dim} columns, not a multiple of the group size {q.group_size}"
        )
    # On the CPU everywhere: the same bytes on any machine (the official files were made there).
    weight, scales, biases = mx.quantize(tensor, group_size=q.group_size, bits=q.bits,
                                         stream=mx.cpu)
    prefix = key[: -len("weight")]
    return [(key, weight), (prefix + "scales", scales), (prefix + "biases", biases)]


def quantize_tensors(tensors: Mapping[str, mx.array], q: Quantization) -> dict[str, mx.array]:
    """bf16 MLX-layout tensors -> the same with every quantizable `X.weight` replaced by
    `X.weight` (uint32), `X.scales`, `X.biases` (bf16), bit-identical to the official files."""
    out: dict[str, mx.array] = {}
    for key, tensor in tensors.items():
        parts = quantize_tensor(key, tensor, q)
        mx.eval([array for _, array in parts])  # evaluate one at a time: bounded memory
        out.update(parts)
    return out


def quantized_shapes(shape: tuple[int, ...], q: Quantization) -> tuple[tuple[int, ...], ...]:
    """Shapes of (weight, scales, biases) for a quantized matrix of `shape`."""
    rows, cols = shape
    return (rows, cols * q.bits // 32), (rows, cols // q.group_size), (rows, cols // q.group_size)


# --------------------------------------------------------------------------------------------
# expected tensors, from an LM config


def as_lm_config(config: Any) -> LmConfig:
    """An LmConfig from an LmConfig or a config.json mapping."""
    if isinstance(config, LmConfig):
        return config
    return LmConfig.from_dict(dict(config))


@dataclass(frozen=True)
class _KeyCounts:
    """Stands in for an LmConfig when only the key names can be checked (no config given)."""

    n_q: int
    dep_q: int
    num_layers: int
    depformer_num_layers: int
    dim: int = 0
    card: int = 0
    text_card: int = 0
    depformer_dim: int = 0
    hidden_dim: int = 0
    depformer_hidden_dim: int = 0
    extra_heads_num_heads: int = 0
    extra_heads_dim: int = 0


def _extra_head_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Kyutai STT's extra heads (same names in both layouts)."""
    return {f"extra_heads.{k}.weight": (cfg.extra_heads_dim, cfg.dim)
            for k in range(cfg.extra_heads_num_heads)}


def _layer_shapes(dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    return {"in_proj": (3 * dim, dim), "out_proj": (dim, dim), "norm1": (dim,), "norm2": (dim,),
            "linear_in": (2 * hidden, dim), "linear_out": (dim, hidden)}


def expected_mlx_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a bf16 MLX-layout checkpoint for this LM config (an
    LmConfig or a config.json mapping)."""
    cfg = config if isinstance(config, _KeyCounts) else as_lm_config(config)
    dim, ddim = cfg.dim, cfg.depformer_dim
    names = {"in_proj": "self_attn.in_proj", "out_proj": "self_attn.out_proj", "norm1": "norm1",
             "norm2": "norm2", "linear_in": "gating.linear_in", "linear_out": "gating.linear_out"}
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(cfg.n_q):
        shapes[f"audio_embs.{k}.weight"] = (cfg.card + 1, dim)
    shapes["text_emb.weight"] = (cfg.text_card + 1, dim)
    shapes["text_linear.weight"] = (cfg.text_card, dim)
    shapes["out_norm.weight"] = (dim,)
    shapes.update(_extra_head_shapes(cfg))
    for layer in range(cfg.num_layers):
        for part, shape in _layer_shapes(dim, cfg.hidden_dim).items():
            shapes[f"transformer.layers.{layer}.{names[part]}.weight"] = shape
    for k in range(cfg.dep_q):
        prefix = f"depformer.slices.{k}"
        shapes[f"{prefix}.linear_in.weight"] = (ddim, dim)
        shapes[f"{prefix}.linear_out.weight"] = (cfg.card, ddim)
        shapes[f"{prefix}.emb.weight"] = ((cfg.text_card if k == 0 else cfg.card) + 1, ddim)
        for layer in range(cfg.depformer_num_layers):
            for part, shape in _layer_shapes(ddim, cfg.depformer_hidden_dim).items():
                shapes[f"{prefix}.transformer.layers.{layer}.{names[part]}.weight"] = shape
    return shapes


def expected_pytorch_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of an official PyTorch-layout checkpoint for this config."""
    cfg = config if isinstance(config, _KeyCounts) else as_lm_config(config)
    dim, ddim, dep_q = cfg.dim, cfg.depformer_dim, cfg.dep_q
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(cfg.n_q):
        shapes[f"emb.{k}.weight"] = (cfg.card + 1, dim)
    shapes["text_emb.weight"] = (cfg.text_card + 1, dim)
    shapes["text_linear.weight"] = (cfg.text_card, dim)
    shapes["out_norm.alpha"] = (1, 1, dim)
    shapes.update(_extra_head_shapes(cfg))
    names = {"in_proj": "self_attn.in_proj_weight", "out_proj": "self_attn.out_proj.weight",
             "norm1": "norm1.alpha", "norm2": "norm2.alpha"}
    for layer in range(cfg.num_layers):
        for part, shape in _layer_shapes(dim, cfg.hidden_dim).items():
            name = names.get(part, f"gating.{part}.weight")
            shapes[f"transformer.layers.{layer}.{name}"] = (1, 1, dim) if "norm" in part else shape
    for k in range(dep_q):
        shapes[f"depformer_in.{k}.weight"] = (ddim, dim)
        shapes[f"linears.{k}.weight"] = (cfg.card, ddim)
    if dep_q:
        shapes["depformer_text_emb.weight"] = (cfg.text_card + 1, ddim)
    for k in range(dep_q - 1):
        shapes[f"depformer_emb.{k}.weight"] = (cfg.card + 1, ddim)
    for layer in range(cfg.depformer_num_layers if dep_q else 0):
        prefix = f"depformer.layers.{layer}"
        per_slice = _layer_shapes(ddim, cfg.depformer_hidden_dim)
        shapes[f"{prefix}.self_attn.in_proj_weight"] = (dep_q * 3 * ddim, ddim)
        shapes[f"{prefix}.self_attn.out_proj.weight"] = (dep_q * ddim, ddim)
        shapes[f"{prefix}.norm1.alpha"] = (1, 1, ddim)
        shapes[f"{prefix}.norm2.alpha"] = (1, 1, ddim)
        for k in range(dep_q):
            for part in ("linear_in", "linear_out"):
                shapes[f"{prefix}.gating.{k}.{part}.weight"] = per_slice[part]
    return shapes


_COUNT_PATTERNS = {
    "pytorch": {
        "n_q": re.compile(r"emb\.(\d+)\."),
        "dep_q": re.compile(r"depformer_in\.(\d+)\."),
        "num_layers": re.compile(r"transformer\.layers\.(\d+)\."),
        "depformer_num_layers": re.compile(r"depformer\.layers\.(\d+)\."),
        "extra_heads_num_heads": re.compile(r"extra_heads\.(\d+)\."),
    },
    "mlx": {
        "n_q": re.compile(r"audio_embs\.(\d+)\."),
        "dep_q": re.compile(r"depformer\.slices\.(\d+)\."),
        "num_layers": re.compile(r"transformer\.layers\.(\d+)\."),
        "depformer_num_layers": re.compile(r"depformer\.slices\.\d+\.transformer\.layers\.(\d+)\."),
        "extra_heads_num_heads": re.compile(r"extra_heads\.(\d+)\."),
    },
}


def _infer_counts(keys: Iterable[str], layout: str) -> _KeyCounts:
    """Layer/slice counts implied by the key names (used when no config is given)."""
    counts = dict.fromkeys(_COUNT_PATTERNS[layout], 0)
    for key in keys:
        for name, pattern in _COUNT_PATTERNS[layout].items():
            if match := pattern.match(key):
                counts[name] = max(counts[name], int(match[1]) + 1)
    return _KeyCounts(**counts)


def _expected_entries(
    layout: str, config: Any, keys: Iterable[str], quantization: Quantization | None
) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """Key -> (safetensors dtype, shape or None when unknown) of a complete checkpoint."""
    shapes_of = expected_pytorch_shapes if layout == "pytorch" else expected_mlx_shapes
    keys = set(keys)
    if config is None:
        base = {key: None for key in shapes_of(_infer_counts(keys, layout))}
    else:
        # STT extra heads are optional (the official MLX files have none): their count comes
        # from the file, their shapes from the config.
        cfg = as_lm_config(config)
        heads = _infer_counts(keys, layout).extra_heads_num_heads
        base = shapes_of(replace(cfg, extra_heads_num_heads=heads))
    expected: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for key, shape in base.items():
        if quantization is not None and is_quantizable(key):
            shapes = quantized_shapes(shape, quantization) if shape else (None, None, None)
            prefix = key[: -len("weight")]
            for suffix, dtype, part_shape in zip(
                _QUANT_SUFFIXES, ("U32", "BF16", "BF16"), shapes, strict=True
            ):
                expected[prefix + suffix] = (dtype, part_shape)
        else:
            expected[key] = ("BF16", shape)
    return expected


def check_tensors(
    found: Mapping[str, TensorInfo],
    expected: Mapping[str, tuple[str, tuple[int, ...] | None]],
    source: str,
) -> None:
    """Names, dtypes and shapes of a file against what its config needs; WeightsError names
    the first problem."""
    missing = [key for key in expected if key not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source} is missing tensor {missing[0]}{more}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise WeightsError(f"{source} has unexpected tensor {unexpected[0]} "
                           "(not part of this Moshi LM)")
    for key, (dtype, shape) in expected.items():
        info = found[key]
        if info.dtype != dtype:
            raise WeightsError(f"{source}: tensor {key} has dtype {info.dtype}, expected {dtype}")
        if shape is not None and info.shape != tuple(shape):
            raise WeightsError(f"{source}: tensor {key} has shape {info.shape}, expected "
                               f"{tuple(shape)} for this config")


def detect_quantization(found: Mapping[str, TensorInfo], source: str = "checkpoint"
                        ) -> Quantization | None:
    """Quantization of an MLX-layout file from its tensors (None for bf16).

    `text_linear` has `dim` input columns (= the size of `out_norm.weight`): its packed width
    gives the bits and its scales width the group size.
    """
    if "text_linear.scales" not in found:
        if any(k.endswith(".scales") for k in found):
            raise WeightsError(f"{source} is partly quantized (text_linear is not)")
        return None
    try:
        (dim,) = found["out_norm.weight"].shape
        packed = found["text_linear.weight"].shape[1]
        groups = found["text_linear.scales"].shape[1]
    except (KeyError, ValueError, IndexError):
        message = f"{source}: not a Moshi LM checkpoint (bad out_norm/text_linear)"
        raise WeightsError(message) from None
    bits, rem = divmod(packed * 32, dim)
    if rem or groups == 0 or dim % groups:
        raise WeightsError(f"{source}: cannot tell the quantization of text_linear")
    quantization = Quantization(bits, dim // groups)
    if quantization not in QUANTIZATIONS.values():
        raise WeightsError(
            f"{source} is quantized with {bits} bits, group size {quantization.group_size}; "
            "only 4 bits/group 32 and 8 bits/group 64 are supported"
        )
    return quantization


def describe_checkpoint(
    path: str | os.PathLike, config: Any = None
) -> tuple[SafetensorsHeader, str, Quantization | None]:
    """Check a checkpoint from its header alone: returns (header, layout, quantization).

    Layout is 'pytorch' or 'mlx'. With a config (LmConfig or config.json mapping) every shape
    is checked; without, the names must form a complete checkpoint and the dtypes be right."""
    header = read_safetensors_header(path)
    source = Path(path).name
    if not header.tensors:
        raise WeightsError(f"{source} holds no tensors: not a Moshi LM checkpoint")
    layout = detect_layout(header.tensors, source)
    quantization = detect_quantization(header.tensors, source) if layout == "mlx" else None
    expected = _expected_entries(layout, config, header.tensors, quantization)
    check_tensors(header.tensors, expected, source)
    return header, layout, quantization


def read_lm_checkpoint(
    path: str | os.PathLike, config: Any = None
) -> tuple[dict[str, mx.array], Quantization | None]:
    """Read a Moshi LM checkpoint in either layout (detected from the keys).

    Returns the tensors in the MLX layout and the quantization found in the file (None for
    bf16). `config` (a config.json mapping or an LmConfig), when given, is checked against the
    shapes. WeightsError with one clear line for a missing/truncated/corrupt file, a file that
    is not a Moshi LM, missing or unexpected tensors, a wrong dtype or shape.
    """
    header, layout, quantization = describe_checkpoint(path, config)
    dep_q = pytorch_dep_q(header.tensors) if layout == "pytorch" else 0
    tensors: dict[str, mx.array] = {}
    for name, _raw, array in iter_tensors(header):
        if layout == "pytorch":
            tensors.update(pytorch_to_mlx(name, array, dep_q))
        else:
            tensors[name] = array
    return tensors, quantization
