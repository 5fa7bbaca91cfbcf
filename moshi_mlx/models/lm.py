"""Kyutai LMs: Moshi = temporal transformer (Helium) + depth transformer (depformer);
Kyutai STT = the temporal transformer alone (dep_q 0) plus optional `extra_heads` (VAD).

Parameter names follow the official MLX checkpoint layout exactly, so a checkpoint loads with
`model.load_weights(..., strict=True)`. Streams: 0 = text, 1..dep_q = Moshi's audio codebooks,
dep_q+1..n_q = the user's audio codebooks (all n_q for STT).
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..errors import WeightsError
from ..modules.parallel import DEFAULT_MIN_WEIGHTS, default_cpu_threads, split_linears
from ..modules.transformer import Attention, KVCache
from .lm_config import LmConfig, resolve_config


class RmsNorm(nn.Module):
    """RMSNorm with a learnt gain; `in_float32` computes it in float32 (official rms_norm_f32)."""

    def __init__(self, dim: int, eps: float, in_float32: bool) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps
        self.in_float32 = in_float32

    def __call__(self, x: mx.array) -> mx.array:
        if self.in_float32 and x.dtype != mx.float32:
            y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
            return y.astype(x.dtype)
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class GatedMlp(nn.Module):
    """linear_in -> [silu half, linear half] -> product -> linear_out."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, rope_max_period: float | None,
                 eps: float, norm_in_float32: bool) -> None:
        super().__init__()
        self.norm1 = RmsNorm(dim, eps, norm_in_float32)
        self.self_attn = Attention(dim, num_heads, rope_max_period)
        self.norm2 = RmsNorm(dim, eps, norm_in_float32)
        self.gating = GatedMlp(dim, hidden)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        return self.mlp_block(x + self.self_attn(self.norm1(x), cache))

    def mlp_block(self, x: mx.array) -> mx.array:
        return x + self.gating(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, num_layers: int, **layer_args) -> None:
        super().__init__()
        self.layers = [TransformerLayer(**layer_args) for _ in range(num_layers)]

    def __call__(self, x: mx.array, caches: list[KVCache]) -> mx.array:
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cache)
        return x


class DepformerSlice(nn.Module):
    """Weights of one depformer step (one of Moshi's audio codebooks)."""

    def __init__(self, cfg: LmConfig, input_vocab: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(cfg.dim, cfg.depformer_dim, bias=False)
        self.emb = nn.Embedding(input_vocab, cfg.depformer_dim)
        self.transformer = Transformer(
            cfg.depformer_num_layers,
            dim=cfg.depformer_dim,
            num_heads=cfg.depformer_num_heads,
            hidden=cfg.depformer_hidden_dim,
            rope_max_period=(
                cfg.depformer_max_period if cfg.depformer_pos_emb == "rope" else None
            ),
            eps=cfg.norm_eps,
            norm_in_float32=cfg.norm_in_float32,
        )
        self.linear_out = nn.Linear(cfg.depformer_dim, cfg.card, bias=False)


class Depformer(nn.Module):
    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self.context = cfg.depformer_context
        # Slice 0 reads the text token just sampled, slice k the audio token of slice k-1.
        self.slices = [
            DepformerSlice(cfg, cfg.text_card + 1 if k == 0 else cfg.card + 1)
            for k in range(cfg.dep_q)
        ]

    def __call__(self, hidden: mx.array, text_token: mx.array,
                 sample: Callable[[mx.array, int], mx.array]) -> tuple[mx.array, list[mx.array]]:
        """hidden [B, dim] (normed temporal output), text_token [B] -> audio tokens [B, dep_q]
        and the logits [B, card] of each slice. `sample(logits, k)` picks slice k's token."""
        num_layers = len(self.slices[0].transformer.layers)
        caches = [KVCache(self.context) for _ in range(num_layers)]  # shared by all slices
        previous = text_token
        tokens, all_logits = [], []
        for k, part in enumerate(self.slices):
            x = part.linear_in(hidden) + part.emb(previous)
            x = part.transformer(x[:, None, :], caches)
            logits = part.linear_out(x[:, 0, :])
            previous = sample(logits, k)
            tokens.append(previous)
            all_logits.append(logits)
        return mx.stack(tokens, axis=1), all_logits


class Lm(nn.Module):
    """Moshi LM: per 80 ms frame, one `temporal` step over the 1 + n_q token streams, then the
    `depformer` for Moshi's dep_q audio tokens (driven by `moshi_mlx.generate.LmGen`)."""

    def __init__(self, cfg: LmConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.audio_embs = [nn.Embedding(cfg.card + 1, cfg.dim) for _ in range(cfg.n_q)]
        self.text_emb = nn.Embedding(cfg.text_card + 1, cfg.dim)
        self.transformer = Transformer(
            cfg.num_layers,
            dim=cfg.dim,
            num_heads=cfg.num_heads,
            hidden=cfg.hidden_dim,
            rope_max_period=cfg.max_period if cfg.positional_embedding == "rope" else None,
            eps=cfg.norm_eps,
            norm_in_float32=cfg.norm_in_float32,
        )
        self.out_norm = RmsNorm(cfg.dim, cfg.norm_eps, cfg.norm_in_float32)
        self.text_linear = nn.Linear(cfg.dim, cfg.text_card, bias=False)
        self.depformer = Depformer(cfg) if cfg.dep_q else None
        self.extra_heads = [nn.Linear(cfg.dim, cfg.extra_heads_dim, bias=False)
                            for _ in range(cfg.extra_heads_num_heads)]
        self._compiled: _CompiledTemporal | None = None

    def load_weights(self, *args, **kwargs):
        self._compiled = None  # compiled graphs hold the old weights
        return super().load_weights(*args, **kwargs)

    def use_cpu_threads(self, threads: int, min_weights: int = DEFAULT_MIN_WEIGHTS) -> int:
        """Split the large linear layers into `threads` row blocks computed at the same time
        on as many CPU streams (bit-identical results; 1 undoes it). Returns how many layers
        are split. Call before creating an `LmGen`: compiled graphs keep the old layers."""
        self._compiled = None
        return split_linears(self, threads, min_weights)

    def make_cache(self) -> list[KVCache]:
        return [KVCache(self.cfg.context) for _ in self.transformer.layers]

    def embed(self, tokens: mx.array) -> mx.array:
        """tokens [B, 1 + n_q] (stream 0 = text, all >= 0) -> summed input embedding [B, dim].

        Streaming generation always feeds real or initial tokens, never the official
        "not generated" id -1, so no zero-masking is spent here."""
        total = self.audio_embs[0](tokens[:, 1])
        for k in range(1, len(self.audio_embs)):
            total = total + self.audio_embs[k](tokens[:, k + 1])
        return total + self.text_emb(tokens[:, 0])

    def temporal(self, tokens: mx.array, caches: list[KVCache], compiled: bool = False
                 ) -> tuple[mx.array, mx.array]:
        """One temporal step: tokens [B, 1 + n_q] -> (normed hidden [B, dim], text logits).

        compiled: run the fixed-shape pieces through `mx.compile` (same results, fewer
        separately dispatched ops); compiled graphs are built on first use, so compile only
        once the weights are loaded."""
        if not compiled:
            x = self.embed(tokens)[:, None, :]
            return self.head(self.transformer(x, caches))
        if self._compiled is None:
            self._compiled = _CompiledTemporal(self)
        fast = self._compiled
        x = fast.embed(tokens)[:, None, :]
        for layer, cache, mlp_block in zip(self.transformer.layers, caches, fast.mlp_blocks,
                                           strict=True):
            x = mlp_block(x + layer.self_attn(layer.norm1(x), cache))
        return fast.head(x)

    def extra_head_probs(self, hidden: mx.array) -> mx.array:
        """Normed hidden [B, dim] -> softmax of every extra head [B, heads, classes] (float32).
        For Kyutai STT these are the semantic VAD heads: class 0 = no voice activity over the
        head's horizon."""
        logits = mx.stack([head(hidden) for head in self.extra_heads], axis=1)
        return mx.softmax(logits.astype(mx.float32), axis=-1)

    def head(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Temporal transformer output [B, 1, dim] -> (normed hidden [B, dim], text logits)."""
        x = self.out_norm(x)[:, 0, :]
        return x, self.text_linear(x)


class _CompiledTemporal:
    """`mx.compile`d pieces of a temporal step whose shapes never change (embedding sum, MLP
    blocks, head). Attention stays eager: its cache length and RoPE offset change each step."""

    def __init__(self, lm: Lm) -> None:
        # `lm` holds this object: a strong reference back from a compiled function would be a
        # cycle that only the garbage collector frees, keeping a dropped model's GBs alive.
        model = weakref.ref(lm)
        self.embed = mx.compile(lambda tokens: model().embed(tokens))
        self.mlp_blocks = [mx.compile(layer.mlp_block) for layer in lm.transformer.layers]
        self.head = mx.compile(lambda x: model().head(x))


# --------------------------------------------------------------------------- loading

_REPO_FILES = {None: "model.safetensors", 8: "model.q8.safetensors", 4: "model.q4.safetensors"}


def load_lm(
    weights: str | os.PathLike,
    config: LmConfig | str | os.PathLike | None = None,
    quantize: int | None = None,
    dtype: mx.Dtype = mx.bfloat16,
    cpu_threads: int | None = None,
    vad_weights: str | os.PathLike | None = None,
) -> Lm:
    """Load a Kyutai LM (Moshi or STT) from a checkpoint in the official MLX or PyTorch layout.

    weights: a .safetensors file, a folder, or a Hugging Face repo id (the file is then picked
    by `quantize`: model.safetensors / model.q8.safetensors / model.q4.safetensors).
    quantize: None (keep the file as it is), 4 or 8 (quantize a bf16 file on load, or assert
    that a pre-quantized file has these bits). dtype: compute dtype (bf16 or float32).
    cpu_threads: split large layers over this many CPU threads (`Lm.use_cpu_threads`);
    None: all cores when MLX computes on the CPU, no split on a GPU.
    vad_weights: a checkpoint (either layout, e.g. the `-candle` repo's model.safetensors or
    a repo id) whose `extra_heads` replace or add the STT VAD heads; the official MLX STT files
    have none. Without it the model has the heads its file has (possibly none).
    """
    from ..weights import QUANTIZATIONS, quantize_tensors, read_lm_checkpoint

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise WeightsError(f"quantize must be one of {sorted(QUANTIZATIONS)} or None, "
                           f"got {quantize}")
    if dtype not in (mx.bfloat16, mx.float32, mx.float16):
        raise WeightsError(f"unsupported compute dtype {dtype}")
    path = _weights_file(weights, quantize)
    cfg = resolve_config(config, path)
    tensors, file_quant = read_lm_checkpoint(path, cfg)
    if vad_weights is not None:
        heads = read_extra_heads(vad_weights, cfg)
        if file_quant is not None:  # quantized like the rest of the file
            heads = quantize_tensors(heads, file_quant)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("extra_heads.")}
        tensors.update(heads)
    cfg = _with_file_extra_heads(cfg, tensors)
    model = build_lm(cfg, tensors, file_quant, quantize=quantize, dtype=dtype, name=path.name)
    model.use_cpu_threads(default_cpu_threads() if cpu_threads is None else cpu_threads)
    return model


_EXTRA_HEAD_KEY = re.compile(r"extra_heads\.(\d+)\.weight")


def read_extra_heads(weights: str | os.PathLike, cfg: LmConfig) -> dict[str, mx.array]:
    """The `extra_heads.{i}.weight` tensors (bf16, [extra_heads_dim, dim]) of a checkpoint in
    either layout (the names are the same); WeightsError when it has none or they do not fit."""
    from ..hub import resolve_file
    from ..weights import read_safetensors_header, read_tensor

    path = resolve_file(weights, _REPO_FILES[None])
    header = read_safetensors_header(path)
    names = sorted((k for k in header.tensors if _EXTRA_HEAD_KEY.fullmatch(k)),
                   key=lambda k: int(_EXTRA_HEAD_KEY.fullmatch(k)[1]))
    if not names:
        raise WeightsError(f"{path.name} has no VAD heads (no extra_heads tensors)")
    if [int(_EXTRA_HEAD_KEY.fullmatch(k)[1]) for k in names] != list(range(len(names))):
        raise WeightsError(f"{path.name}: extra_heads are not numbered 0..{len(names) - 1}")
    if cfg.extra_heads_num_heads and len(names) != cfg.extra_heads_num_heads:
        raise WeightsError(f"{path.name} has {len(names)} VAD heads, the config "
                           f"{cfg.extra_heads_num_heads}")
    heads = {}
    with open(path, "rb") as f:
        for name in names:
            info = header.tensors[name]
            if len(info.shape) != 2 or info.shape[1] != cfg.dim or info.dtype != "BF16":
                raise WeightsError(f"{path.name}: {name} is {info.dtype} {info.shape}, expected "
                                   f"BF16 [{cfg.extra_heads_dim}, {cfg.dim}] for this model")
            heads[name] = read_tensor(f, header, name)[1]
    return heads


def _with_file_extra_heads(cfg: LmConfig, tensors: dict[str, mx.array]) -> LmConfig:
    """The config with as many extra heads as the checkpoint holds (they are optional)."""
    rows = [v.shape[0] for k, v in tensors.items() if _EXTRA_HEAD_KEY.fullmatch(k)]
    if len(rows) == cfg.extra_heads_num_heads:
        return cfg
    if not rows:
        return cfg.with_overrides(extra_heads_num_heads=0)
    return cfg.with_overrides(extra_heads_num_heads=len(rows), extra_heads_dim=rows[0])


def _weights_file(weights: str | os.PathLike, quantize: int | None) -> Path:
    """The checkpoint to read: the file itself, or the one `quantize` names in a folder or
    repo. A local folder without that file falls back to what it has: its bf16
    model.safetensors when quantizing on load, its quantized file when quantize is None."""
    from ..hub import resolve_file

    wanted = _REPO_FILES[quantize]
    folder = Path(weights).expanduser()
    if folder.is_dir() and not (folder / wanted).is_file():
        others = [_REPO_FILES[None]] if quantize is not None else [_REPO_FILES[8], _REPO_FILES[4]]
        for name in others:
            if (folder / name).is_file():
                return folder / name
    return resolve_file(weights, wanted)


def build_lm(cfg: LmConfig, tensors: dict[str, mx.array], file_quant, quantize: int | None = None,
             dtype: mx.Dtype = mx.bfloat16, name: str = "checkpoint") -> Lm:
    """Build an `Lm` from MLX-layout tensors (`file_quant`: the file's Quantization or None)."""
    from ..weights import QUANTIZATIONS, is_quantizable, quantize_tensors

    if file_quant is not None and quantize is not None and file_quant.bits != quantize:
        raise WeightsError(f"{name} is {file_quant.bits}-bit quantized, but -q {quantize} "
                           "was asked")
    quant = file_quant
    if file_quant is None and quantize is not None:
        quant = QUANTIZATIONS[quantize]
        _check_shapes(cfg, tensors, None, name)  # before quantizing, for a clear message
        tensors = quantize_tensors(tensors, quant)
    model = Lm(cfg)
    if quant is not None:
        nn.quantize(
            model, group_size=quant.group_size, bits=quant.bits,
            class_predicate=lambda path, module: (
                hasattr(module, "to_quantized") and is_quantizable(f"{path}.weight")
            ),
        )
    _check_shapes(cfg, tensors, model, name)
    linears = quantized_linear_paths(model)
    model.load_weights([(k, as_stored(k, v, dtype, linears)) for k, v in tensors.items()],
                       strict=True)
    mx.eval(model.parameters())
    return model


def quantized_linear_paths(model: nn.Module) -> frozenset[str]:
    return frozenset(path for path, m in model.named_modules()
                     if isinstance(m, nn.QuantizedLinear))


def as_stored(key: str, value: mx.array, dtype: mx.Dtype,
              quantized_linears: frozenset[str]) -> mx.array:
    """The tensor as the model keeps it. Quantized weights stay packed uint32. A quantized
    linear layer's bf16 scales and biases stay bf16 under float32 activations too: its matmul
    widens them exactly (scales·q + biases in float32, as a float32 copy would) at the same
    speed, and the 7B q4 model is 0.9 GB smaller. (Quantized embeddings return the scales'
    dtype, so theirs follow the compute dtype.) Every other float tensor takes the compute
    dtype."""
    if value.dtype == mx.uint32:
        return value
    if (key.endswith((".scales", ".biases")) and value.dtype == mx.bfloat16
            and dtype in (mx.float32, mx.bfloat16)
            and key.rsplit(".", 1)[0] in quantized_linears):
        return value
    return value.astype(dtype)


def _check_shapes(cfg: LmConfig, tensors: dict[str, mx.array], model: Lm | None,
                  name: str) -> None:
    from mlx.utils import tree_flatten

    # Parameters of a fresh model are lazy: nothing is allocated for their shapes.
    expected = dict(tree_flatten((model or Lm(cfg)).parameters()))
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        raise WeightsError(f"{name} does not match the LM config "
                           f"({cfg.num_layers} layers, dim {cfg.dim}): {', '.join(detail)}")
    for key, want in expected.items():
        have = tensors[key]
        if tuple(have.shape) != tuple(want.shape):
            raise WeightsError(f"{name} does not match the LM config: {key} has shape "
                               f"{tuple(have.shape)}, the config expects {tuple(want.shape)}")
