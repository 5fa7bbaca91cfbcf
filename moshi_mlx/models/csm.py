"""Sesame CSM (csm-1b): a Llama backbone predicts Mimi codebook 0 of each 80 ms frame, a small
Llama depth decoder predicts codebooks 1..31 from the backbone state.

Our parameter layout keeps Sesame's interleaved-pair RoPE (q/k rows as in the original
checkpoint); `moshi_mlx.models.csm_layouts` maps the original (SesameAILabs/csm), the
transformers (`CsmForConditionalGeneration`) and mlx-audio layouts and configs to ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.errors import WeightsError
from moshi_mlx.models import csm_layouts
from moshi_mlx.modules.norm import RmsNorm
from moshi_mlx.modules.parallel import dequantized_weight, widened
from moshi_mlx.modules.transformer import KVCache

# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RopeScaling:
    """llama3 frequency scaling, in torchtune's parameters (transformers' re-parameterisation
    with a smaller `old_context` and factors divided alike gives the same frequencies)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    old_context: float = 8192.0


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise WeightsError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                               f"{self.num_kv_heads}")
        if self.head_dim % 2:
            raise WeightsError(f"head_dim must be even for RoPE, got {self.head_dim}")


_LM_KEYS = frozenset({"text_card", "dep_q", "depformer_dim", "existing_text_padding_id"})


@dataclass(frozen=True)
class CsmConfig:
    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128256
    audio_vocab_size: int = 2051
    num_codebooks: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> CsmConfig:
        """Any of: our own `to_dict()` (with our converter's metadata keys, model_type csm
        included), the Sesame config.json (`backbone_flavor`...; fixture flavors given as
        `flavors` {name: torchtune llama3_2 kwargs}) or the transformers config.json
        (`model_type` csm), the last two mapped by `moshi_mlx.models.csm_layouts`. A file is
        read by the loader (`moshi_mlx.loading.models.read_csm_config`)."""
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: expected a JSON object")
        if _LM_KEYS & data.keys():
            raise WeightsError(f"{source} is a Moshi/STT LM config, not a CSM (Sesame) config")
        if "backbone" in data and "decoder" in data:
            return _from_ours(data, source)
        return _from_ours(csm_layouts.our_config_form(data, source), source)

    @classmethod
    def default(cls) -> CsmConfig:
        raise WeightsError("no such CSM config file: CSM needs its config.json beside the "
                           "weights (or pass config=)")


def _from_ours(data: dict, source: str) -> CsmConfig:
    csm_layouts.reject_unknown(data, {"backbone", "decoder", "text_vocab_size",
                                      "audio_vocab_size", "num_codebooks"}, source)

    def llama(d: dict) -> LlamaConfig:
        d = dict(d)
        scaling = d.pop("rope_scaling", None)
        try:
            return LlamaConfig(**d, rope_scaling=RopeScaling(**scaling) if scaling else None)
        except TypeError as exc:
            raise WeightsError(f"{source}: {exc}") from None

    sizes = {k: int(data[k]) for k in ("text_vocab_size", "audio_vocab_size", "num_codebooks")
             if k in data}
    return CsmConfig(llama(data["backbone"]), llama(data["decoder"]), **sizes)


# ---------------------------------------------------------------------------- model


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] of llama3-scaled RoPE (float64 math, float32 out)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv.astype(np.float32)
    low_wavelen = scaling.old_context / scaling.low_freq_factor
    high_wavelen = scaling.old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = ((scaling.old_context / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wavelen < high_wavelen, inv,
                   np.where(wavelen > low_wavelen, inv / scaling.factor, blended))
    return out.astype(np.float32)


class RopeTable:
    """Interleaved-pair RoPE from precomputed cos/sin rows (float64 angles): for static
    positions. MLX's `fast.rope` with custom frequencies is one opaque op on the CPU backend
    (~85 us a call in a compiled graph); these elementwise ops fuse (~48 us), and a depth frame
    calls RoPE 31 times a decoder layer. Not an `nn.Module`: the tables are not parameters."""

    def __init__(self, inv_freq: np.ndarray, positions: int) -> None:
        angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.cos = mx.array(np.cos(angles).astype(np.float32))  # [positions, head_dim / 2]
        self.sin = mx.array(np.sin(angles).astype(np.float32))

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        """x [B, H, T, D] at positions offset .. offset+T-1."""
        batch, heads, steps, dim = x.shape
        cos, sin = self.cos[offset : offset + steps], self.sin[offset : offset + steps]
        even, odd = x[..., 0::2], x[..., 1::2]
        rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
        return rotated.reshape(batch, heads, steps, dim).astype(x.dtype)


@lru_cache(maxsize=8)
def _rope_of(cfg: LlamaConfig) -> tuple[mx.array, RopeTable]:
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return mx.array(1.0 / inv_freq), RopeTable(inv_freq, cfg.max_seq_len)


# Inputs with more rows than this (a prompt) go through quantized layers as a float matmul on
# the dequantized weights when MLX computes on the CPU: its CPU quantized matmul is a
# row-by-row kernel on one core (a 101-row csm-1b q4 prefill: 104 s on 2 cores), BLAS is not.
DEQUANTIZED_ROWS = 8


def runs_dequantized(layer: nn.Module, rows: int) -> bool:
    """Whether `rows` input rows go through `layer` as a float matmul (see DEQUANTIZED_ROWS)."""
    return (isinstance(layer, nn.QuantizedLinear) and rows > DEQUANTIZED_ROWS
            and mx.default_device() == mx.cpu)


# A dequantized product (see DEQUANTIZED_ROWS) dequantizes this many weight elements at a
# time (8 MB of float32), each block once the previous block's product is done: a whole csm-1b
# MLP matrix would be 67 MB, and MLX's dequantize peaks at twice its output.
DEQUANTIZED_BLOCK = 1 << 21


def dequantized_product(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """x @ the layer's dequantized weight .T (no bias), the weight dequantized a block of
    output rows at a time: the same dot products, with one block of float weights alive
    instead of the matrix (equal to float32 rounding: a BLAS may sum a narrower product in
    another order). `mx.depends` orders the blocks (MLX would otherwise dequantize every
    independent block first) and starts the first after x."""
    rows = layer.weight.shape[0]
    step = max(1, DEQUANTIZED_BLOCK // (layer.weight.shape[1] * 32 // layer.bits))
    parts, previous = [], x
    for start in range(0, rows, step):
        stop = start + step
        packed = mx.depends([layer.weight[start:stop], layer.scales[start:stop],
                             layer.biases[start:stop]], previous)
        previous = x @ dequantized_weight(layer, x.dtype, tuple(packed)).T
        parts.append(previous)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def apply_linear(layer: nn.Module, x: mx.array) -> mx.array:
    """A linear layer (float, quantized or row-split) on x; a float weight stored narrower
    than x (`keeps_stored_dtype`) is widened as `widened` says."""
    if type(layer) is nn.Linear:
        out = x @ widened(layer.weight, x.dtype).T
    elif runs_dequantized(layer, x.shape[-2]):
        out = dequantized_product(layer, x)
    else:
        return layer(x)
    return out + layer.bias if "bias" in layer else out


class LlamaAttention(nn.Module):
    """Grouped-query attention with interleaved-pair (traditional) RoPE at given periods."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        # q, k and v rows in one matrix: one matmul and one RoPE call instead of three and two
        # (a depth step is dispatch-bound on small models: 20% of a fixture frame).
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim,
                                  bias=False)
        self.out_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
        # MLX's rope takes periods (1 / inverse frequency): on a GPU, and for positions given
        # as an array (the backbone's compiled step); static positions on the CPU read the
        # table. Not parameters; one pair for all the layers of a config.
        self._periods, self._rope_table = _rope_of(cfg)

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        """Normed input [B, T, dim] at positions offset.. -> q, k, v [B, heads, T, head_dim]
        with RoPE applied to q and k."""
        batch, steps, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = apply_linear(self.qkv_proj, x).reshape(batch, steps, heads + 2 * kv_heads, -1)
        qkv = qkv.transpose(0, 2, 1, 3)
        qk = qkv[:, : heads + kv_heads]
        if isinstance(offset, int) and mx.default_device() == mx.cpu:
            qk = self._rope_table(qk, offset)
        else:
            qk = mx.fast.rope(qk, self.head_dim, traditional=True, base=None, scale=1.0,
                              offset=offset, freqs=self._periods)
        return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: KVCache) -> mx.array:
        """Store k, v in the cache, attend -> heads merged [B, T, heads * head_dim]."""
        keys, values, mask = cache.update(k, v)
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.head_dim**-0.5,
                                                   mask=mask)
        batch, _, steps, _ = q.shape
        return out.transpose(0, 2, 1, 3).reshape(batch, steps, -1)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        return apply_linear(self.out_proj, self.attend(*self.project(x, cache.offset), cache))


class SwiGlu(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        hidden = nn.silu(apply_linear(self.gate_proj, x)) * apply_linear(self.up_proj, x)
        return apply_linear(self.down_proj, hidden)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RmsNorm(cfg.dim, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RmsNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGlu(cfg.dim, cfg.hidden_dim)

    def __call__(self, x: mx.array, cache: KVCache) -> mx.array:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))

    def pre_attention(self, x: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
        return self.attn.project(self.attn_norm(x), offset)

    def post_attention(self, x: mx.array, attended: mx.array) -> mx.array:
        x = x + apply_linear(self.attn.out_proj, attended)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder layers + final norm (no token embedding, no output head)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.layers = [LlamaLayer(cfg) for _ in range(cfg.num_layers)]
        self.norm = RmsNorm(cfg.dim, cfg.norm_eps)
        self._compiled: list | None = None

    def __call__(self, x: mx.array, caches: list[KVCache], compiled: bool = False) -> mx.array:
        """compiled: run each layer's fixed-shape parts (norm, projections, RoPE / output
        projection, MLP) through `mx.compile`d functions; attention over the cache stays
        eager. For steps of a recurring length (one generated frame, one depth step): a new
        length traces anew. Built on first use: compile only once the weights are loaded."""
        if not compiled:
            for layer, cache in zip(self.layers, caches, strict=True):
                x = layer(x, cache)
            return self.norm(x)
        if self._compiled is None:
            self._compiled = [(mx.compile(layer.pre_attention), mx.compile(layer.post_attention))
                              for layer in self.layers]
        for layer, cache, (pre, post) in zip(self.layers, caches, self._compiled, strict=True):
            q, k, v = pre(x, mx.array(cache.offset, dtype=mx.int32))
            x = post(x, layer.attn.attend(q, k, v, cache))
        return self.norm(x)

    def forget_compiled(self) -> None:
        self._compiled = None  # compiled graphs hold the weights they were traced with


class FrameGraphs:
    """A few compiled frame functions, newest kept (not a dict: `nn.Module` would take a dict
    attribute for parameters)."""

    KEPT = 4

    def __init__(self) -> None:
        self._graphs: dict[Hashable, Callable] = {}

    def get(self, key: Hashable, build: Callable[[], Callable]) -> Callable:
        graph = self._graphs.pop(key, None)
        if graph is None:
            graph = mx.compile(build())
        self._graphs[key] = graph
        while len(self._graphs) > self.KEPT:
            self._graphs.pop(next(iter(self._graphs)))
        return graph


class Csm(nn.Module):
    """Backbone + depth decoder. Frame rows are [..., num_codebooks + 1] ints (audio codebooks,
    then the text token) with a same-shaped bool mask of the columns to sum."""

    def __init__(self, cfg: CsmConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Llama(cfg.backbone)
        self.decoder = Llama(cfg.decoder)
        self.text_embeddings = nn.Embedding(cfg.text_vocab_size, cfg.backbone.dim)
        self.audio_embeddings = nn.Embedding(cfg.audio_vocab_size * cfg.num_codebooks,
                                             cfg.backbone.dim)
        self.projection = nn.Linear(cfg.backbone.dim, cfg.decoder.dim, bias=False)
        self.codebook0_head = nn.Linear(cfg.backbone.dim, cfg.audio_vocab_size, bias=False)
        self.audio_head = mx.zeros((cfg.num_codebooks - 1, cfg.decoder.dim,
                                    cfg.audio_vocab_size))
        self._frame_graphs = FrameGraphs()

    def backbone_cache(self) -> list[KVCache]:
        return [KVCache(self.cfg.backbone.max_seq_len) for _ in self.backbone.layers]

    def decoder_cache(self) -> list[KVCache]:
        return [KVCache(self.cfg.num_codebooks, grow_step=self.cfg.num_codebooks)
                for _ in self.decoder.layers]

    @property
    def compute_dtype(self) -> mx.Dtype:
        """The activations' dtype (the norms' gains have it); embeddings may be stored narrower
        (`keeps_stored_dtype`): their looked-up rows are widened to it."""
        return self.backbone.norm.weight.dtype

    def audio_embedding(self, codebook: int, codes: mx.array) -> mx.array:
        rows = self.audio_embeddings(codes + codebook * self.cfg.audio_vocab_size)
        return rows.astype(self.compute_dtype)

    def embed_frames(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """tokens, mask [B, S, K + 1] -> summed input embeddings [B, S, backbone dim]."""
        k = self.cfg.num_codebooks
        offsets = mx.arange(k, dtype=mx.int32) * self.cfg.audio_vocab_size
        dtype = self.compute_dtype
        audio = self.audio_embeddings(tokens[..., :k] + offsets).astype(dtype)  # [B, S, K, dim]
        audio = (audio * mask[..., :k, None].astype(dtype)).sum(axis=-2)
        text = self.text_embeddings(tokens[..., k]).astype(dtype) * mask[..., k, None].astype(dtype)
        return audio + text

    def embed_audio_frame(self, codes: mx.array) -> mx.array:
        """codes [B, K] of one generated frame -> backbone input [B, 1, dim]."""
        offsets = mx.arange(self.cfg.num_codebooks, dtype=mx.int32) * self.cfg.audio_vocab_size
        rows = self.audio_embeddings(codes + offsets).astype(self.compute_dtype)
        return rows.sum(axis=-2)[:, None, :]

    def load_weights(self, *args, **kwargs):
        self.forget_compiled()
        return super().load_weights(*args, **kwargs)

    def forget_compiled(self) -> None:
        """Drop the compiled graphs: they keep the arrays and layers they were traced with
        (new weights, LoRA layers put in)."""
        self.backbone.forget_compiled()
        self.decoder.forget_compiled()
        self._frame_graphs = FrameGraphs()

    def frame_graph(self, key: Hashable, build: Callable[[], Callable]) -> Callable:
        """The `mx.compile`d `build()` kept under `key` (e.g. the sampling settings), so the
        next generation with the same settings skips the trace. Dropped when weights load:
        a compiled graph keeps the arrays it was traced with."""
        return self._frame_graphs.get(key, build)

    def backbone_step(self, x: mx.array, caches: list[KVCache], compiled: bool = False
                      ) -> mx.array:
        """Input embeddings [B, S, dim] -> normed hidden state at the last position [B, dim]."""
        return self.backbone(x, caches, compiled)[:, -1, :]

    def depth_logits(self, x: mx.array, caches: list[KVCache], codebook: int) -> mx.array:
        """Decoder on projected inputs x [B, S, backbone dim] -> logits [B, V] of `codebook`."""
        h = self.decoder(apply_linear(self.projection, x), caches)[:, -1, :]
        return h @ widened(self.audio_head[codebook - 1], h.dtype)

    def frame(self, h: mx.array, pick: Callable[[mx.array, int], mx.array]
              ) -> tuple[mx.array, mx.array, mx.array]:
        """One frame from the backbone's hidden state h [B, dim]: codebook 0 from its head, then
        codebooks 1..K-1 from the depth decoder (a fresh cache per frame: positions h, code 0,
        code 1, ...), each token chosen by `pick(logits, codebook)`.

        Returns codes [B, K], codebook-0 logits [B, V] and depth logits [B, K-1, V]. A pure
        function of h (and of what `pick` reads): the generator compiles it whole."""
        c0_logits = apply_linear(self.codebook0_head, h)
        code = pick(c0_logits, 0)
        codes, depth = [code], []
        caches = self.decoder_cache()
        x = mx.stack([h, self.audio_embedding(0, code)], axis=1)  # positions 0, 1
        for i in range(1, self.cfg.num_codebooks):
            logits = self.depth_logits(x, caches, i)
            depth.append(logits)
            code = pick(logits, i)
            codes.append(code)
            x = self.audio_embedding(i, code)[:, None, :]
        return mx.stack(codes, axis=1), c0_logits, mx.stack(depth, axis=1)


# ---------------------------------------------------------------------------- weights

def sanitize(weights: dict[str, mx.array], config: CsmConfig) -> dict[str, mx.array]:
    """Tensors of any supported layout -> ours (see `csm_layouts.sanitize`)."""
    return csm_layouts.sanitize(weights, config)


def complete_config(data: dict, read_beside: Callable[[str], dict | None]) -> dict:
    """config.json data completed from files beside it (see `csm_layouts.complete_config`)."""
    return csm_layouts.complete_config(data, read_beside)


def quant_predicate(path: str, module: nn.Module) -> bool:
    """Linears inside the backbone and depth decoder layers. Embeddings, heads and the
    projection stay exact. A linear whose input width is not a multiple of 64 (the largest
    group size of q4/q8) is kept too (only tiny test models have those)."""
    return (isinstance(module, nn.Linear) and path.startswith(("backbone.layers.",
                                                               "decoder.layers."))
            and module.weight.shape[-1] % 64 == 0)


def keeps_stored_dtype(key: str) -> bool:
    """Tensors a bf16 / f16 file keeps as stored under float32 activations (see
    `moshi_mlx.loading.quantization.stored_as`): every matrix but the depth decoder's. The
    embeddings widen only the rows they look up; linears and heads widen their weight at each
    product (`apply_linear`): float32 copies would double csm-1b's 3.1 GB. The depth decoder
    runs 31 products a frame on its weights, where widening them each time costs more than
    their float32 copies' 0.2 GB (csm-1b). The norms' gains take the compute dtype too (they
    tell the model its activations' dtype: `Csm.compute_dtype`)."""
    return not key.endswith("norm.weight") and not key.startswith("decoder.")


# The text embedding table (0.5 GB of csm-1b in bf16, 1 GB in float32) embeds only a prompt's
# tokens: the loader leaves it in the file and reads the rows a prompt looks up
# (`moshi_mlx.loading.file_rows`), the same values as the loaded table's.
ROWS_FROM_FILE = ("text_embeddings.weight",)


# ---------------------------------------------------------------------------- family
# The family interface of `moshi_mlx.loading`; other people's layouts are mapped in
# `moshi_mlx.models.csm_layouts`.

Config = CsmConfig
Model = Csm
DESCRIPTION = "Sesame CSM"
STORED_DTYPE = None  # Sesame's file is float32, transformers' bf16 or float32
CONFIG_MARKERS = ("backbone_flavor", "depth_decoder_config", "backbone")
# Its files and released repo (moshi_mlx.loading.families.FamilyFiles); Sesame's repos hold no
# Mimi: Kyutai's released one is used unless the model's own folder has one.
FILES = {"csm": dict(name="Sesame CSM", commands=("moshi_mlx.tts", "weights_convert"),
                     repos={"csm-1b": {None: "sesame/csm-1b"}},
                     layouts={"sesame": ("backbone.layers.",),
                              "transformers": ("backbone_model.",),
                              "mlx-audio": ("model.backbone.",)},
                     tokenizer="huggingface", codec="mimi", codec_in_repos=False,
                     needs_config=True)}
