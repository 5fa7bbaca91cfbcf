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

import mlx.core as mx
import mlx.nn as nn

from moshi_mlx.errors import WeightsError
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.modules.parallel import DEFAULT_MIN_WEIGHTS, default_cpu_threads, split_linears
from moshi_mlx.modules.transformer import Attention, KVCache


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
    `depformer` for Moshi's dep_q audio tokens (driven by `moshi_mlx.conversation.lm_gen.LmGen`)."""

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
        on as many CPU streams (bit-identical for quantized layers, float32 rounding for
        float ones; 1 undoes it). Returns how many layers are split. Call before creating an
        `LmGen`: compiled graphs keep the old layers."""
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
# The family interface of `moshi_mlx.loading` (Moshi and STT share this model).

Config = LmConfig
Model = Lm
DESCRIPTION = "Kyutai LM"


def describe(config: LmConfig) -> str:
    return "Kyutai STT LM" if config.is_stt else "Moshi LM"

STORED_DTYPE = "BF16"  # official checkpoints, both layouts
CONFIG_MARKERS = ("text_card", "dep_q", "n_q")  # official config.json keys (no model_type)

# Files and released repos, by model_type (moshi_mlx.loading.families.FamilyFiles).
_MOSHI_REPOS = {voice: {4: f"kyutai/{voice}-mlx-q4", 8: f"kyutai/{voice}-mlx-q8",
                        None: f"kyutai/{voice}-mlx-bf16"} for voice in ("moshiko", "moshika")}
FILES = {
    "moshi": dict(name="Moshi", repos=_MOSHI_REPOS,
                  commands=("moshi_mlx.local", "moshi_mlx.local_web", "weights_convert"),
                  layouts={"mlx": ("depformer.slices.",),
                           "pytorch": ("depformer_in.", "linears.", "depformer."),
                           "transformers": ("depth_decoder.layers.", "decoder.model.layers.")},
                  tokenizer="sentencepiece", tokenizer_name="tokenizer_spm_32k_3.model",
                  codec="mimi"),
    "stt": dict(name="Kyutai STT", commands=("moshi_mlx.stt", "weights_convert"),
                repos={"1b": {None: "kyutai/stt-1b-en_fr-mlx"},
                       "2.6b": {None: "kyutai/stt-2.6b-en-mlx"}},
                layouts={"official": ("transformer.layers.",),
                         "transformers": ("model.embed_tokens.embed_tokens.",)},
                tokenizer="sentencepiece", codec="mimi", needs_config=True),
}

_EXTRA_HEAD_KEY = re.compile(r"extra_heads\.(\d+)\.weight")


def fit_config(config: LmConfig, tensors: dict[str, mx.array]) -> LmConfig:
    """The config with as many extra (VAD) heads as the checkpoint holds: they are optional
    (Kyutai's MLX STT files have none; the PyTorch / -candle files have them)."""
    rows = [v.shape[0] for k, v in tensors.items() if _EXTRA_HEAD_KEY.fullmatch(k)]
    if len(rows) == config.extra_heads_num_heads:
        return config
    if not rows:
        return config.with_overrides(extra_heads_num_heads=0)
    return config.with_overrides(extra_heads_num_heads=len(rows), extra_heads_dim=rows[0])


def quant_predicate(path: str, module: nn.Module) -> bool:
    """Every Linear and Embedding, as in the official MLX files (norm gains stay bf16)."""
    return True


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
    from moshi_mlx.loading.checkpoint import load_model

    model, checkpoint = load_model(weights, config, quantize, dtype,
                                   model_types=("moshi", "stt"))
    if vad_weights is not None:
        attach_extra_heads(model, vad_weights, checkpoint.quantization or (
            None if quantize is None else _quantization(quantize)))
    model.use_cpu_threads(default_cpu_threads() if cpu_threads is None else cpu_threads)
    return model


def _quantization(bits: int):
    from moshi_mlx.loading.quantization import QUANTIZATIONS

    return QUANTIZATIONS[bits]


def attach_extra_heads(model: Lm, weights: str | os.PathLike, quantization) -> None:
    """Give `model` the `extra_heads` of another checkpoint (either layout: the names are the
    same), quantized as `quantization` (the model's own, or None)."""
    from moshi_mlx.loading.hub import model_file
    from moshi_mlx.loading.quantization import quantize_tensors, stored_as
    from moshi_mlx.loading.safetensors import read_safetensors_header, read_tensor

    path = model_file(weights, None)
    header = read_safetensors_header(path)
    names = sorted((k for k in header.tensors if _EXTRA_HEAD_KEY.fullmatch(k)),
                   key=lambda k: int(_EXTRA_HEAD_KEY.fullmatch(k)[1]))
    if not names:
        raise WeightsError(f"{path.name} has no VAD heads (no extra_heads tensors)")
    if [int(_EXTRA_HEAD_KEY.fullmatch(k)[1]) for k in names] != list(range(len(names))):
        raise WeightsError(f"{path.name}: extra_heads are not numbered 0..{len(names) - 1}")
    cfg = model.cfg
    heads: dict[str, mx.array] = {}
    with open(path, "rb") as f:
        for name in names:
            info = header.tensors[name]
            if len(info.shape) != 2 or info.shape[1] != cfg.dim or info.dtype != STORED_DTYPE:
                raise WeightsError(f"{path.name}: {name} is {info.dtype} {info.shape}, expected "
                                   f"{STORED_DTYPE} [heads dim, {cfg.dim}] for this model")
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


# PyTorch layout -> ours (the official MLX layout). Names found only in one layout tell which
# layout a tensor comes from; names the two layouts share map to themselves.
_PYTORCH_ONLY = re.compile(r"(^|\.)(emb\.\d+\.|depformer_in\.|linears\.|depformer_text_emb\."
                           r"|depformer_emb\.|depformer\.layers\.)|\.alpha$|in_proj_weight$")


# transformers layout (MoshiForConditionalGeneration: kmhf/hf-moshiko): every key is under one
# of these prefixes, none of which the other layouts use.
_TRANSFORMERS_ONLY = re.compile(r"^(decoder\.(model|lm_head)\.|depth_decoder\.|embed_tokens\.\d+\."
                                r"|audio_encoder\.)")


# transformers layout (KyutaiSpeechToTextForConditionalGeneration: kyutai/stt-*-trfs): every
# key is under one of these prefixes, none of which the other layouts use.
_TRANSFORMERS_STT_ONLY = re.compile(
    r"^(model\.(embed_tokens|layers|norm)\.|lm_head\.|codec_model\.)")


def sanitize(weights: dict[str, mx.array], config: LmConfig) -> dict[str, mx.array]:
    """Tensors of any supported layout (official PyTorch or MLX, transformers Moshi or STT)
    -> ours, lazily, tensor by tensor. The layout is recognised per key. A transformers q/k/v
    projection becomes one fragment of our fused in_proj (see
    `moshi_mlx.models.layouts.FRAGMENT`)."""
    out: dict[str, mx.array] = {}
    for key, tensor in weights.items():
        if _TRANSFORMERS_ONLY.search(key):
            out.update(transformers_to_mlx(key, tensor, config))
        elif _TRANSFORMERS_STT_ONLY.search(key):
            out.update(transformers_stt_to_mlx(key, tensor, config))
        elif _PYTORCH_ONLY.search(key):
            out.update(pytorch_to_mlx(key, tensor, config.dep_q))
        else:
            out[key] = tensor
    return out


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




# --------------------------------------------------------------------------- transformers layout

_TR_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"embed_tokens\.(\d+)\.weight"), r"audio_embs.\1.weight"),
    (re.compile(r"decoder\.model\.embed_tokens\.weight"), "text_emb.weight"),
    (re.compile(r"decoder\.lm_head\.weight"), "text_linear.weight"),
    (re.compile(r"decoder\.model\.norm\.weight"), "out_norm.weight"),
    (re.compile(r"decoder\.model\.layers\.(\d+)\.self_attn\.o_proj(?:\.linear)?\.weight"),
     r"transformer.layers.\1.self_attn.out_proj.weight"),
    (re.compile(r"decoder\.model\.layers\.(\d+)\.mlp\.fc1\.weight"),
     r"transformer.layers.\1.gating.linear_in.weight"),
    (re.compile(r"decoder\.model\.layers\.(\d+)\.mlp\.fc2\.weight"),
     r"transformer.layers.\1.gating.linear_out.weight"),
    (re.compile(r"decoder\.model\.layers\.(\d+)\.input_layernorm\.weight"),
     r"transformer.layers.\1.norm1.weight"),
    (re.compile(r"decoder\.model\.layers\.(\d+)\.post_attention_layernorm\.weight"),
     r"transformer.layers.\1.norm2.weight"),
    (re.compile(r"depth_decoder\.text_embed_tokens\.weight"), "depformer.slices.0.emb.weight"),
]
_TR_QKV = re.compile(r"decoder\.model\.layers\.(\d+)\.self_attn\.([qkv])_proj(?:\.linear)?\.weight")
_TR_DEP_EMB = re.compile(r"depth_decoder\.embed_tokens\.(\d+)\.weight")
# Depth-decoder tensors stacked over the dep_q slices on dim 0 -> our per-slice name.
_TR_DEP_STACKED: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"depth_decoder\.input_projections\.weight"), "linear_in.weight"),
    (re.compile(r"depth_decoder\.lm_heads\.weight"), "linear_out.weight"),
    (re.compile(r"depth_decoder\.layers\.(\d+)\.self_attn\.o_proj(?:\.linear)?\.weight"),
     r"transformer.layers.\1.self_attn.out_proj.weight"),
    (re.compile(r"depth_decoder\.layers\.(\d+)\.mlp\.fc1\.weight"),
     r"transformer.layers.\1.gating.linear_in.weight"),
    (re.compile(r"depth_decoder\.layers\.(\d+)\.mlp\.fc2\.weight"),
     r"transformer.layers.\1.gating.linear_out.weight"),
]
_TR_DEP_QKV = re.compile(
    r"depth_decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj(?:\.linear)?\.weight")
_TR_DEP_NORM = re.compile(r"depth_decoder\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight")
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def _interleaved_rope_rows(tensor: mx.array, num_heads: int, key: str,
                           layout: str = "Moshi") -> mx.array:
    """Undo transformers' q/k row permutation: its RoPE rotates the two halves of each head
    (rows i and i + head_dim/2), ours (traditional) rotates adjacent rows (2i, 2i + 1)."""
    rows, cols = tensor.shape[0], tensor.shape[-1]
    if tensor.ndim != 2 or rows % (2 * num_heads):
        raise WeightsError(f"tensor {key} of shape {tuple(tensor.shape)} does not hold "
                           f"{num_heads} heads (transformers {layout} layout)")
    half = rows // num_heads // 2
    return (tensor.reshape(num_heads, 2, half, cols).transpose(0, 2, 1, 3)
            .reshape(rows, cols))


def _slices(tensor: mx.array, dep_q: int, key: str) -> list[mx.array]:
    if tensor.ndim != 3 or tensor.shape[0] != dep_q:
        raise WeightsError(f"tensor {key} of shape {tuple(tensor.shape)} does not stack the "
                           f"{dep_q} depformer slices (transformers Moshi layout)")
    return [tensor[k] for k in range(dep_q)]


def transformers_to_mlx(key: str, tensor: mx.array, config: LmConfig
                        ) -> list[tuple[str, mx.array]]:
    """One transformers-layout tensor -> its MLX-layout tensors or fragments (lazy).

    The codec bundled in the file (`audio_encoder.*`) is not part of the LM: dropped here
    (`load_mimi` reads it from the same file). Fused in_proj = [q; k; v] rows: each of
    q_proj / k_proj / v_proj is fragment 0 / 1 / 2 of 3, joined by the loader.
    """
    from moshi_mlx.models.layouts import fragment_name

    if key.startswith("audio_encoder."):
        return []
    for pattern, target in _TR_RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(target, key), tensor)]
    if match := _TR_QKV.fullmatch(key):
        part = _QKV_INDEX[match[2]]
        if part < 2:
            tensor = _interleaved_rope_rows(tensor, config.num_heads, key)
        name = f"transformer.layers.{match[1]}.self_attn.in_proj.weight"
        return [(fragment_name(name, part, 3), tensor)]
    if match := _TR_DEP_EMB.fullmatch(key):
        return [(f"depformer.slices.{int(match[1]) + 1}.emb.weight", tensor)]
    for pattern, target in _TR_DEP_STACKED:
        if pattern.fullmatch(key):
            inner = pattern.sub(target, key)
            return [(f"depformer.slices.{k}.{inner}", part)
                    for k, part in enumerate(_slices(tensor, config.dep_q, key))]
    if match := _TR_DEP_QKV.fullmatch(key):
        name = f"transformer.layers.{match[1]}.self_attn.in_proj.weight"
        return [(fragment_name(f"depformer.slices.{k}.{name}", _QKV_INDEX[match[2]], 3), part)
                for k, part in enumerate(_slices(tensor, config.dep_q, key))]
    if match := _TR_DEP_NORM.fullmatch(key):
        norm = "norm1" if match[2] == "input" else "norm2"
        return [(f"depformer.slices.{k}.transformer.layers.{match[1]}.{norm}.weight", tensor)
                for k in range(config.dep_q)]
    raise WeightsError(f"unexpected tensor {key!r}: not part of a transformers-layout Moshi "
                       "LM (MoshiForConditionalGeneration) checkpoint")



# --------------------------------------------------------------------------- transformers STT

_TR_STT_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"model\.norm\.weight"), "out_norm.weight"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.o_proj(?:\.linear)?\.weight"),
     r"transformer.layers.\1.self_attn.out_proj.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.fc1\.weight"),
     r"transformer.layers.\1.gating.linear_in.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.fc2\.weight"),
     r"transformer.layers.\1.gating.linear_out.weight"),
    (re.compile(r"model\.layers\.(\d+)\.input_layernorm\.weight"),
     r"transformer.layers.\1.norm1.weight"),
    (re.compile(r"model\.layers\.(\d+)\.post_attention_layernorm\.weight"),
     r"transformer.layers.\1.norm2.weight"),
]
_TR_STT_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj(?:\.linear)?\.weight")
_TR_STT_EMBEDDINGS = "model.embed_tokens.embed_tokens.weight"
_TR_STT_HEAD = "lm_head.weight"


def _stt_rows(tensor: mx.array, rows: int, key: str) -> mx.array:
    if tensor.ndim != 2 or tensor.shape[0] != rows:
        raise WeightsError(f"tensor {key} of shape {tuple(tensor.shape)} does not have the "
                           f"{rows} rows this config gives it (transformers Kyutai STT layout)")
    return tensor


def transformers_stt_to_mlx(key: str, tensor: mx.array, config: LmConfig
                            ) -> list[tuple[str, mx.array]]:
    """One transformers STT tensor -> its MLX-layout tensors or fragments (lazy).

    - the one embedding table holds text_emb (text_card + 1 rows), then each codebook's
      card + 1 rows, then a zero row (transformers' audio padding id): split back;
    - lm_head has a zero row for the initial text token: dropped;
    - q_proj / k_proj / v_proj: fragments 0 / 1 / 2 of our fused in_proj, q and k rows put
      back in the interleaved-RoPE order;
    - the bundled codec (`codec_model.*`) is not part of the LM: dropped (`load_mimi` reads it
      from the same file). No extra (VAD) heads in this layout (`vad_weights` adds them).

    transformers' conversion script widens the embedding table and lm_head to float32 (it
    concatenates a float32 zero row); their values are the bf16 ones, so they are stored
    back as bf16 (exact), like every float32 tensor of this layout.
    """
    from moshi_mlx.models.layouts import fragment_name

    if key.startswith("codec_model."):
        return []
    if tensor.dtype == mx.float32:
        tensor = tensor.astype(mx.bfloat16)
    if key == _TR_STT_EMBEDDINGS:
        text_rows, audio_rows = config.text_card + 1, config.card + 1
        table = _stt_rows(tensor, text_rows + config.n_q * audio_rows + 1, key)
        out = [("text_emb.weight", table[:text_rows])]
        for k in range(config.n_q):
            start = text_rows + k * audio_rows
            out.append((f"audio_embs.{k}.weight", table[start : start + audio_rows]))
        return out
    if key == _TR_STT_HEAD:
        return [("text_linear.weight",
                 _stt_rows(tensor, config.text_card + 1, key)[: config.text_card])]
    for pattern, target in _TR_STT_RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(target, key), tensor)]
    if match := _TR_STT_QKV.fullmatch(key):
        part = _QKV_INDEX[match[2]]
        if part < 2:
            tensor = _interleaved_rope_rows(tensor, config.num_heads, key, "Kyutai STT")
        name = f"transformer.layers.{match[1]}.self_attn.in_proj.weight"
        return [(fragment_name(name, part, 3), tensor)]
    raise WeightsError(f"unexpected tensor {key!r}: not part of a transformers-layout Kyutai "
                       "STT (KyutaiSpeechToTextForConditionalGeneration) checkpoint")
