"""Load a model of each family from files: the public `load_lm`, `load_mimi`, `load_csm`
(through the one loader of `moshi_mlx.loading.checkpoint`, Mimi through its own), the STT VAD
heads of another checkpoint, and config.json files read into config objects.

The model modules (`moshi_mlx.models`) never read files nor import this package: the loader
reads, and hands them dicts.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.checkpoint import load_model
from moshi_mlx.loading.config import read_config_json, resolve_config
from moshi_mlx.loading.hub import mimi_files, model_file
from moshi_mlx.loading.quantization import (
    QUANTIZATIONS,
    Quantization,
    dequantize_linears,
    quantize_tensors,
    stored_as,
)
from moshi_mlx.loading.safetensors import read_safetensors, read_safetensors_header, read_tensor
from moshi_mlx.models import lm, mimi_layouts
from moshi_mlx.models.csm import Csm, CsmConfig
from moshi_mlx.models.lm import EXTRA_HEAD_KEY, Lm
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.models.mimi import Mimi, MimiConfig
from moshi_mlx.modules.parallel import NARROW_FLOATS, default_cpu_threads, split_linears

LM_TYPES = ("moshi", "stt")
CSM_TYPES = ("csm",)
WIDENED_COPIES_CACHED = 3  # the largest widened weight a layer has (gate, up) and one spare


def read_lm_config(path: str | os.PathLike) -> LmConfig:
    """A Kyutai LM config.json (official, or transformers' with the files beside it) ->
    LmConfig."""
    return resolve_config(Path(path), None, LM_TYPES).config


def read_csm_config(path: str | os.PathLike) -> CsmConfig:
    """A CSM config.json (ours, Sesame's with its flavors.json beside it, or transformers') ->
    CsmConfig."""
    return resolve_config(Path(path), None, CSM_TYPES).config


# ---------------------------------------------------------------------------- Kyutai LMs


def load_lm(
    weights: str | os.PathLike,
    config: LmConfig | str | os.PathLike | dict | None = None,
    quantize: int | None = None,
    dtype: mx.Dtype | str | None = None,
    cpu_threads: int | None = None,
    vad_weights: str | os.PathLike | None = None,
) -> Lm:
    """Load a Kyutai LM (Moshi or STT) from a checkpoint in the official MLX or PyTorch layout.

    weights: a .safetensors file, a model folder, or a Hugging Face repo id (the file is then
    the one `-q` names: model.safetensors / model.q8.safetensors / model.q4.safetensors).
    config: an LmConfig, a config.json mapping or path; default: the config.json beside the
    weights, else the released 7B model's. quantize: None (keep the file as it is), 4 or 8
    (quantize a bf16 file on load, or assert that a pre-quantized file has these bits).
    dtype: compute dtype; None = auto (bf16 on a GPU, float32 on the CPU backend).
    cpu_threads: split large layers over this many CPU threads (`Lm.use_cpu_threads`);
    None: all cores when MLX computes on the CPU, no split on a GPU.
    vad_weights: a checkpoint (file, folder or repo id, either layout, e.g. the `-candle`
    repo's model.safetensors) whose `extra_heads` replace or add the STT VAD heads; Kyutai's MLX
    STT files have none. Without it the model has the heads its file has (possibly none).
    """
    model, checkpoint = load_model(weights, config, quantize, dtype, model_types=LM_TYPES)
    if vad_weights is not None:
        attach_extra_heads(model, vad_weights, checkpoint.quantization or (
            None if quantize is None else QUANTIZATIONS[quantize]))
    model.use_cpu_threads(default_cpu_threads() if cpu_threads is None else cpu_threads)
    return model


def attach_extra_heads(model: Lm, weights: str | os.PathLike,
                       quantization: Quantization | None) -> None:
    """Give `model` the `extra_heads` of another checkpoint (either layout: the names are the
    same), quantized as `quantization` (the model's own, or None)."""
    path = model_file(weights, None)
    header = read_safetensors_header(path)
    names = sorted((k for k in header.tensors if EXTRA_HEAD_KEY.fullmatch(k)),
                   key=lambda k: int(EXTRA_HEAD_KEY.fullmatch(k)[1]))
    if not names:
        raise WeightsError(f"{path.name} has no VAD heads (no extra_heads tensors)")
    if [int(EXTRA_HEAD_KEY.fullmatch(k)[1]) for k in names] != list(range(len(names))):
        raise WeightsError(f"{path.name}: extra_heads are not numbered 0..{len(names) - 1}")
    cfg = model.cfg
    heads: dict[str, mx.array] = {}
    with open(path, "rb") as f:
        for name in names:
            info = header.tensors[name]
            if len(info.shape) != 2 or info.shape[1] != cfg.dim or info.dtype != lm.STORED_DTYPE:
                raise WeightsError(f"{path.name}: {name} is {info.dtype} {info.shape}, expected "
                                   f"{lm.STORED_DTYPE} [heads dim, {cfg.dim}] for this model")
            heads[name] = read_tensor(f, header, name)[1]
    rows = {v.shape[0] for v in heads.values()}
    if len(rows) != 1:
        raise WeightsError(f"{path.name}: its extra_heads differ in size")
    model.cfg = cfg.with_overrides(extra_heads_num_heads=len(heads), extra_heads_dim=rows.pop())
    model.extra_heads = [nn.Linear(cfg.dim, model.cfg.extra_heads_dim, bias=False)
                         for _ in heads]
    if quantization is not None:
        heads = quantize_tensors(heads, frozenset(heads), quantization)
        for k, head in enumerate(model.extra_heads):
            model.extra_heads[k] = nn.QuantizedLinear.from_linear(
                head, group_size=quantization.group_size, bits=quantization.bits)
    compute = model.out_norm.weight.dtype  # every float tensor of a loaded model has it
    linears = frozenset(f"extra_heads.{k}" for k in range(len(heads)))
    if quantization is None:
        linears = frozenset()
    model.load_weights([(k, stored_as(k, v, compute, linears)) for k, v in heads.items()],
                       strict=False)
    mx.eval(model.extra_heads)


# ---------------------------------------------------------------------------- Mimi


def _mimi_config(config_path: Path | None) -> tuple[MimiConfig | None, str]:
    """The MimiConfig a transformers config.json describes (and the tensor prefix of the Mimi
    bundled in a Moshi or STT file), or None for any other config (official LM configs)."""
    if config_path is None:
        return None, ""
    fields, prefix = mimi_layouts.bundled_mimi(read_config_json(config_path), str(config_path))
    return (None if fields is None else MimiConfig(**fields)), prefix


def load_mimi(
    path_or_repo: str | os.PathLike, num_codebooks: int = 8, cfg: MimiConfig | None = None
) -> Mimi:
    """Load Mimi from a local file, folder or Hugging Face repo id, in the official layout
    (tokenizer-e351c8d8-checkpoint125.safetensors) or the transformers one (`MimiModel`:
    config.json + model.safetensors, sharded too, e.g. kyutai/mimi; or the Mimi bundled in a
    transformers Moshi checkpoint, e.g. kmhf/hf-moshiko). cfg: the architecture; default: the
    transformers config.json beside the weights when there is one, else kyutai/mimi's.
    A transformers Kyutai STT checkpoint (kyutai/stt-*-trfs) bundles its Mimi the same way
    (`codec_model.*`, described by `codec_config`)."""
    files, config_path = mimi_files(path_or_repo)
    shown = files[0] if len(files) == 1 else files[0].parent
    found, prefix = _mimi_config(config_path)
    cfg = cfg or found or MimiConfig()
    if not 1 <= num_codebooks <= cfg.max_codebooks:
        raise WeightsError(f"num_codebooks must be in 1..{cfg.max_codebooks}, got {num_codebooks}")
    cfg = replace(cfg, num_codebooks=num_codebooks)
    raw: dict[str, mx.array] = {}
    for path in files:
        raw.update(read_safetensors(path))
    raw = mimi_layouts.unbundle(raw, prefix)
    try:
        weights = mimi_layouts.sanitize(raw, cfg)
    except WeightsError as exc:
        raise WeightsError(f"{shown}: {exc}") from None
    model = Mimi(cfg)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise WeightsError(
            f"{shown}: not a Mimi checkpoint ({len(missing)} expected tensors missing, "
            f"e.g. {missing[0]}){mimi_layouts.layout_hint(raw)}"
        )
    for key, param in expected.items():
        if tuple(weights[key].shape) != tuple(param.shape):
            raise WeightsError(
                f"{shown}: tensor {key} has shape {tuple(weights[key].shape)}, "
                f"expected {tuple(param.shape)}"
            )
    model.load_weights([(k, weights[k].astype(mx.float32)) for k in expected], strict=True)
    for transformer in (model.encoder_transformer, model.decoder_transformer):
        transformer.store_weights_column_major()
    mx.eval(model.parameters())
    model.quantizer.finalize()
    return model


# ---------------------------------------------------------------------------- CSM


def load_csm(weights: str | os.PathLike, config: CsmConfig | str | os.PathLike | None = None,
             quantize: int | None = None, dtype: mx.Dtype | str | None = None,
             cpu_threads: int | None = None, float_decoder_on_cpu: bool = False) -> Csm:
    """Load CSM from a .safetensors file, a folder (config.json beside it) or a hub repo id,
    in the Sesame or the transformers layout (its bundled codec is ignored), through the
    loader every family shares.

    config: a CsmConfig, a config.json path, or None (the config.json beside the weights / in
    the repo). quantize: None, 4 (group 32) or 8 (group 64) for the backbone and decoder
    linears. dtype: None = float32 on the CPU, bfloat16 on a GPU. cpu_threads: split large
    linears over this many CPU streams (as load_lm); None = all cores on the CPU, no split on
    a GPU. float_decoder_on_cpu: when MLX computes on the CPU, run a quantized depth decoder
    from copies of its dequantized weights in the compute dtype (the same values). Off by
    default: for csm-1b q4 it makes a frame about 17% faster (2.47 -> 2.04 s on 2 cores) for
    0.37 GB more, which would put the process above mlx-audio's (benchmarks/tts.py).

    Memory: tensors are read one at a time; the text embedding table stays in the file
    (`csm.ROWS_FROM_FILE`); a bf16 file's other embeddings, heads and backbone linears stay
    bf16 under float32 compute, widened where used (`csm.keeps_stored_dtype`); MLX's buffer
    cache is sized to reuse the widened copies (`keep_widening_buffers`)."""
    model, _ = load_model(weights, config, quantize, dtype, model_types=CSM_TYPES)
    if float_decoder_on_cpu and mx.default_device() == mx.cpu:
        dequantize_linears(model.decoder, model.compute_dtype)
    split_linears(model, default_cpu_threads() if cpu_threads is None else cpu_threads)
    keep_widening_buffers(model)
    mx.clear_cache()  # the loader's freed read buffers
    return model


def keep_widening_buffers(model: Csm) -> None:
    """Raise MLX's buffer-cache limit to hold the float32 copies that narrow-stored linear
    weights (`moshi_mlx.modules.parallel.widened`) are widened into at each product, when the
    model has such weights and computes in float32: freed, they are reused at the next product
    instead of being allocated anew from the system, whose fresh pages cost more than the
    widening itself (MLX's default CPU cache keeps 32 MB)."""
    widest = max((module.weight.size for _, module in model.named_modules()
                  if isinstance(module, nn.Linear) and not isinstance(module, nn.QuantizedLinear)
                  and module.weight.dtype in NARROW_FLOATS), default=0)
    if widest == 0 or mx.default_device() != mx.cpu or model.compute_dtype != mx.float32:
        return
    wanted = WIDENED_COPIES_CACHED * widest * 4
    previous = mx.set_cache_limit(wanted)
    if previous > wanted:
        mx.set_cache_limit(previous)
