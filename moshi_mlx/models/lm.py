"""Kyutai LMs: Moshi = temporal transformer (Helium) + depth transformer (depformer);
Kyutai STT = the temporal transformer alone (dep_q 0) plus optional `extra_heads` (VAD).

Parameter names follow the official MLX checkpoint layout exactly, so a checkpoint loads with
`model.load_weights(..., strict=True)`. Streams: 0 = text, 1..dep_q = Moshi's audio codebooks,
dep_q+1..n_q = the user's audio codebooks (all n_q for STT).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from moshi_mlx.errors import WeightsError
from moshi_mlx.models import lm_layouts
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.modules.norm import RmsNorm
from moshi_mlx.modules.parallel import DEFAULT_MIN_WEIGHTS, split_linears
from moshi_mlx.modules.transformer import Attention, KVCache


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
        tokens, all_logits = self.run(hidden, text_token, sample, self.new_caches(),
                                      range(len(self.slices)))
        return mx.stack(tokens, axis=1), all_logits

    def new_caches(self) -> list[KVCache]:
        """Empty caches for one frame, shared by all its slices."""
        return [KVCache(self.context) for _ in self.slices[0].transformer.layers]

    def run(self, hidden: mx.array, previous: mx.array,
            sample: Callable[[mx.array, int], mx.array], caches: list[KVCache],
            steps: range, feed: Callable[[int, mx.array], mx.array] | None = None
            ) -> tuple[list[mx.array], list[mx.array]]:
        """Slices `steps` of one frame (a frame may run in parts: `caches` carry the earlier
        slices), starting from the token `previous` [B] that the first of them reads ->
        (their tokens [B], their logits [B, card]). `feed(k, token)`: the token slice k + 1
        reads instead of slice k's own (teacher forcing); default: its own."""
        tokens, all_logits = [], []
        for k in steps:
            part = self.slices[k]
            x = part.linear_in(hidden) + part.emb(previous)
            x = part.transformer(x[:, None, :], caches)
            logits = part.linear_out(x[:, 0, :])
            token = sample(logits, k)
            previous = token if feed is None else feed(k, token)
            tokens.append(token)
            all_logits.append(logits)
        return tokens, all_logits

    def teacher_forced(self, hidden: mx.array, inputs: mx.array) -> mx.array:
        """All slices at once for training: hidden [N, dim] (normed temporal output of N
        positions), inputs [N, dep_q] (slice k's input token: the text token for k = 0, audio
        token k-1 after; -1 embeds to 0) -> logits [N, dep_q, card]."""
        num_layers = len(self.slices[0].transformer.layers)
        caches = [KVCache(self.context) for _ in range(num_layers)]  # shared by all slices
        all_logits = []
        for k, part in enumerate(self.slices):
            x = part.linear_in(hidden) + embed_or_zero(part.emb, inputs[:, k])
            x = part.transformer(x[:, None, :], caches)
            all_logits.append(part.linear_out(x[:, 0, :]))
        return mx.stack(all_logits, axis=1)


def _recomputed(layer: TransformerLayer, x: mx.array, context: int) -> mx.array:
    """layer(x) over a whole sequence whose activations the backward pass recomputes (the
    cache is made inside, so the recomputation starts from an empty one too)."""
    def forward(params: dict, x: mx.array) -> mx.array:
        layer.update(params)
        return layer(x, KVCache(context))

    return mx.checkpoint(forward)(layer.trainable_parameters(), x)


def embed_or_zero(table: nn.Module, tokens: mx.array) -> mx.array:
    """Embeddings of `tokens`, exactly 0 where a token is -1 (the official "no input" id, as
    padding of a training batch)."""
    vectors = table(mx.maximum(tokens, 0))
    return mx.where((tokens >= 0)[..., None], vectors, mx.zeros((), vectors.dtype))


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

    def forget_compiled(self) -> None:
        """Drop the compiled graphs: they hold the layers they were built with (call after
        replacing layers, e.g. putting LoRA on them)."""
        self._compiled = None

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

    def temporal(self, tokens: mx.array | None, caches: list[KVCache], compiled: bool = False,
                 embedded: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """One temporal step: tokens [B, 1 + n_q] -> (normed hidden [B, dim], text logits).

        embedded: the summed input embedding [B, dim] to read instead of embedding `tokens`
        (a replayed PersonaPlex voice prompt holds these). compiled: run the fixed-shape
        pieces through `mx.compile` (same results, fewer separately dispatched ops);
        compiled graphs are built on first use, so compile only once the weights are
        loaded."""
        if not compiled:
            x = (self.embed(tokens) if embedded is None else embedded)[:, None, :]
            return self.head(self.transformer(x, caches))
        if self._compiled is None:
            self._compiled = _CompiledTemporal(self)
        fast = self._compiled
        x = (fast.embed(tokens) if embedded is None else embedded)[:, None, :]
        for layer, cache, mlp_block in zip(self.transformer.layers, caches, fast.mlp_blocks,
                                           strict=True):
            x = mlp_block(x + layer.self_attn(layer.norm1(x), cache))
        return fast.head(x)

    def sequence(self, tokens: mx.array, checkpoint: bool = False
                 ) -> tuple[mx.array, mx.array]:
        """The temporal transformer over whole sequences at once (training, teacher forced):
        tokens [B, 1 + n_q, T] (-1 embeds to 0) -> (normed hidden [B, T, dim], text logits
        [B, T, text_card]). Fresh caches: a causal mask over the T positions. checkpoint:
        recompute each layer in the backward pass instead of keeping its activations."""
        x = embed_or_zero(self.audio_embs[0], tokens[:, 1])
        for k in range(1, len(self.audio_embs)):
            x = x + embed_or_zero(self.audio_embs[k], tokens[:, k + 1])
        x = x + embed_or_zero(self.text_emb, tokens[:, 0])
        if checkpoint:
            for layer in self.transformer.layers:
                x = _recomputed(layer, x, self.cfg.context)
        else:
            x = self.transformer(x, self.make_cache())
        x = self.out_norm(x)
        return x, self.text_linear(x)

    def text_only(self, tokens: mx.array, caches: list[KVCache]) -> mx.array:
        """The temporal transformer as a text model (transformers' `MoshiForCausalLM`): text
        tokens [B, T] alone, no audio stream -> the text logits [B, text_card] of the last
        position. The caches advance by T (a prompt at once, then one token a step)."""
        x = self.transformer(self.text_emb(tokens), caches)
        return self.head(x[:, -1:, :])[1]

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


# --------------------------------------------------------------------------- family
# The family interface of `moshi_mlx.loading` (Moshi and STT share this model); other
# people's layouts are mapped in `moshi_mlx.models.lm_layouts`.

Config = LmConfig
Model = Lm
DESCRIPTION = "Kyutai LM"


def describe(config: LmConfig) -> str:
    if config.predicts_user:
        return "PersonaPlex LM"
    return "Kyutai STT LM" if config.is_stt else "Moshi LM"


STORED_DTYPE = "BF16"  # official checkpoints, both layouts
CONFIG_MARKERS = ("text_card", "dep_q", "n_q")  # official config.json keys (no model_type)

# Files and released repos, by model_type (moshi_mlx.loading.families.FamilyFiles).
_MOSHI_REPOS = {voice: {4: f"kyutai/{voice}-mlx-q4", 8: f"kyutai/{voice}-mlx-q8",
                        None: f"kyutai/{voice}-mlx-bf16"} for voice in ("moshiko", "moshika")}
# NVIDIA's PersonaPlex (PyTorch layout, bf16, dep_q 16; -q quantizes it while loading): the
# file names of Kyutai's repos (model.safetensors, tokenizer_spm_32k_3.model, Mimi's).
PERSONAPLEX_REPO = "nvidia/personaplex-7b-v1"
_MOSHI_REPOS["personaplex"] = {None: PERSONAPLEX_REPO}
FILES = {
    "moshi": dict(name="Moshi", repos=_MOSHI_REPOS,
                  commands=("moshi_mlx.local", "moshi_mlx.local_web", "weights_convert"),
                  layouts={"mlx": ("depformer.slices.",),
                           "pytorch": ("depformer_in.", "linears.", "depformer."),
                           "transformers": ("depth_decoder.layers.", "decoder.model.layers.")},
                  tokenizer="sentencepiece", tokenizer_name="tokenizer_spm_32k_3.model",
                  codec="mimi", repos_without_config=(PERSONAPLEX_REPO,)),
    "stt": dict(name="Kyutai STT",
                commands=("moshi_mlx.stt", "moshi_mlx.run_inference", "weights_convert"),
                repos={"1b": {None: "kyutai/stt-1b-en_fr-mlx"},
                       "2.6b": {None: "kyutai/stt-2.6b-en-mlx"}},
                layouts={"official": ("transformer.layers.",),
                         "transformers": ("model.embed_tokens.embed_tokens.",)},
                tokenizer="sentencepiece", codec="mimi", needs_config=True),
}

EXTRA_HEAD_KEY = re.compile(r"extra_heads\.(\d+)\.weight")
# The first weight of each depformer slice: PyTorch layout, ours (either may be quantized).
_SLICE_KEY = re.compile(r"depformer_in\.(\d+)\.weight|depformer\.slices\.(\d+)\.linear_in\.weight")


def fit_layout(config: LmConfig, tensor_names, source: str) -> LmConfig:
    """The config fitted to the depformer the checkpoint holds, from its tensor names alone
    (before they are mapped). PersonaPlex ships no usable config.json: a Moshi config meets a
    file with a slice per audio stream (n_q), and becomes PersonaPlex's (`as_personaplex`).
    A PersonaPlex config given a plain Moshi file (its own codebooks only) is one line: the
    user's slices cannot be made up (NVIDIA's loader copies slices 0..7 to 8..15, which has
    no source for depformer_emb.7)."""
    if config.dep_q == 0:
        return config
    found = [int(m[1] or m[2]) for name in tensor_names if (m := _SLICE_KEY.fullmatch(name))]
    slices = max(found) + 1 if found else None
    if slices is None or slices == config.dep_q:
        return config
    if config.predicts_user and slices == config.own_audio_q:
        pytorch = any(name.startswith("depformer_in.") for name in tensor_names)
        missing = (f"depformer_emb.{slices - 1}" if pytorch
                   else f"depformer.slices.{slices}.emb.weight")
        raise WeightsError(f"{source} is a plain Moshi checkpoint ({slices} depformer slices, "
                           f"{missing} missing), not a PersonaPlex one (dep_q {config.dep_q})")
    if not config.predicts_user and slices == config.n_q:
        return config.as_personaplex()
    return config


def fit_config(config: LmConfig, tensors: dict[str, mx.array]) -> LmConfig:
    """The config with as many extra (VAD) heads as the checkpoint holds: they are optional
    (Kyutai's MLX STT files have none; the PyTorch / -candle files have them)."""
    rows = [v.shape[0] for k, v in tensors.items() if EXTRA_HEAD_KEY.fullmatch(k)]
    if len(rows) == config.extra_heads_num_heads:
        return config
    if not rows:
        return config.with_overrides(extra_heads_num_heads=0)
    return config.with_overrides(extra_heads_num_heads=len(rows), extra_heads_dim=rows[0])


def layout_keys(config: LmConfig) -> dict:
    """The config.json keys `fit_layout` decides from the tensors (PersonaPlex's), with this
    config's values; none for any other model. The converter writes them over the source's
    config.json, which may describe a plain Moshi."""
    if not config.predicts_user:
        return {}
    return {"dep_q": config.dep_q, "depformer_context": config.depformer_context,
            "system_prompt_tags": config.system_prompt_tags}


def quant_predicate(path: str, module: nn.Module) -> bool:
    """Every Linear and Embedding, as in the official MLX files (norm gains stay bf16)."""
    return True


def sanitize(weights: dict[str, mx.array], config: LmConfig) -> dict[str, mx.array]:
    """Tensors of any supported layout -> ours (see `lm_layouts.sanitize`)."""
    return lm_layouts.sanitize(weights, config)


def complete_config(data: dict, read_beside: Callable[[str], dict | None]) -> dict:
    """config.json data completed from files beside it (see `lm_layouts.complete_config`)."""
    return lm_layouts.complete_config(data, read_beside)
