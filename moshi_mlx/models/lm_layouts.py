"""Other people's layouts of the Kyutai LMs (Moshi, Kyutai STT) -> ours.

Tensors: the official PyTorch layout, transformers' `MoshiForConditionalGeneration`
(kmhf/hf-moshiko) and `KyutaiSpeechToTextForConditionalGeneration` (kyutai/stt-*-trfs); ours is
the official MLX layout. Configs: transformers' `MoshiConfig` and `KyutaiSpeechToTextConfig`
-> the official config.json keys that `LmConfig` mirrors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from moshi_mlx.errors import WeightsError
from moshi_mlx.models.layouts import fragment_name, rope_rows_to_interleaved

if TYPE_CHECKING:
    from moshi_mlx.models.lm_config import LmConfig


def gating_hidden(dim: int, dim_feedforward: int) -> int:
    """The gated MLP width of a feed-forward size (the official implementation's rule):
    4·dim uses 21/8·dim, anything else 2/3 of dim_feedforward."""
    if dim_feedforward == 4 * dim:
        return 21 * dim // 8
    return 2 * dim_feedforward // 3


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
    (re.compile(r"depth_decoder\.text_embed_tokens\.weight"), "depformer.slices.0.emb.weight"),
]
_TR_LAYER = re.compile(r"decoder\.model\.layers\.(\d+)\.(.+)")
_TR_DEP_LAYER = re.compile(r"depth_decoder\.layers\.(\d+)\.(.+)")
_TR_DEP_EMB = re.compile(r"depth_decoder\.embed_tokens\.(\d+)\.weight")
# Depth-decoder tensors stacked over the dep_q slices on dim 0 -> our per-slice name.
_TR_DEP_STACKED = {"depth_decoder.input_projections.weight": "linear_in.weight",
                   "depth_decoder.lm_heads.weight": "linear_out.weight"}
# A transformers decoder layer's tensors (after `layers.N.`) -> ours (after
# `transformer.layers.N.`): the same in Moshi's temporal and depth decoders and in Kyutai STT's.
_TR_LAYER_PARTS = {
    "self_attn.o_proj.weight": "self_attn.out_proj.weight",
    "self_attn.o_proj.linear.weight": "self_attn.out_proj.weight",
    "mlp.fc1.weight": "gating.linear_in.weight",
    "mlp.fc2.weight": "gating.linear_out.weight",
    "input_layernorm.weight": "norm1.weight",
    "post_attention_layernorm.weight": "norm2.weight",
}
_TR_LAYER_QKV = re.compile(r"self_attn\.([qkv])_proj(?:\.linear)?\.weight")
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def _layer_part(layer: str, part: str) -> tuple[str, int | None] | None:
    """A transformers decoder layer's tensor (layer number, name after `layers.N.`) -> (our
    name, its index among the q/k/v fragments of our fused in_proj, or None); None for a name
    that is not a layer tensor."""
    prefix = f"transformer.layers.{layer}."
    if part in _TR_LAYER_PARTS:
        return prefix + _TR_LAYER_PARTS[part], None
    if match := _TR_LAYER_QKV.fullmatch(part):
        return prefix + "self_attn.in_proj.weight", _QKV_INDEX[match[1]]
    return None


def _rope_layer(match: re.Match[str], tensor: mx.array, num_heads: int, key: str,
                layout: str) -> list[tuple[str, mx.array]] | None:
    """One tensor of a transformers decoder layer with RoPE (the temporal transformer) ->
    ours, q and k rows put back in the interleaved-RoPE order; None: not a layer tensor."""
    found = _layer_part(match[1], match[2])
    if found is None:
        return None
    name, index = found
    if index is None:
        return [(name, tensor)]
    if index < 2:
        tensor = rope_rows_to_interleaved(tensor, num_heads, key, layout)
    return [(fragment_name(name, index, 3), tensor)]


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
    if key.startswith("audio_encoder."):
        return []
    for pattern, target in _TR_RENAMES:
        if pattern.fullmatch(key):
            return [(pattern.sub(target, key), tensor)]
    if (match := _TR_LAYER.fullmatch(key)) and (
            out := _rope_layer(match, tensor, config.num_heads, key, "transformers Moshi")):
        return out
    if match := _TR_DEP_EMB.fullmatch(key):
        return [(f"depformer.slices.{int(match[1]) + 1}.emb.weight", tensor)]
    if key in _TR_DEP_STACKED:
        return [(f"depformer.slices.{k}.{_TR_DEP_STACKED[key]}", part)
                for k, part in enumerate(_slices(tensor, config.dep_q, key))]
    if (match := _TR_DEP_LAYER.fullmatch(key)) and (found := _layer_part(match[1], match[2])):
        name, index = found  # no RoPE in the depformer: q/k rows as they are
        if index is not None:
            name = fragment_name(name, index, 3)
        # its norms are one for all slices, the other tensors stack the slices' own
        parts = ([tensor] * config.dep_q if name.endswith(("norm1.weight", "norm2.weight"))
                 else _slices(tensor, config.dep_q, key))
        return [(f"depformer.slices.{k}.{name}", part) for k, part in enumerate(parts)]
    raise WeightsError(f"unexpected tensor {key!r}: not part of a transformers-layout Moshi "
                       "LM (MoshiForConditionalGeneration) checkpoint")


# --------------------------------------------------------------------------- transformers STT

_TR_STT_NORM = "model.norm.weight"
_TR_STT_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
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
    if key == _TR_STT_NORM:
        return [("out_norm.weight", tensor)]
    if (match := _TR_STT_LAYER.fullmatch(key)) and (
            out := _rope_layer(match, tensor, config.num_heads, key, "transformers Kyutai STT")):
        return out
    raise WeightsError(f"unexpected tensor {key!r}: not part of a transformers-layout Kyutai "
                       "STT (KyutaiSpeechToTextForConditionalGeneration) checkpoint")


# --------------------------------------------------------------------------- transformers config

# Keys of a transformers config that carry no architecture (or only what is checked below).
_TRANSFORMERS_METADATA = frozenset(
    {"architectures", "dtype", "torch_dtype", "transformers_version", "initializer_range",
     "use_cache", "attention_dropout", "tie_word_embeddings", "pad_token_id", "bos_token_id",
     "eos_token_id", "max_position_embeddings", "audio_encoder_config", "model_type",
     "input_size", "audio_vocab_size", "vocab_size", "num_codebooks", "_name_or_path",
     "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder"}
)
_TRANSFORMERS_MAIN = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window", "rope_theta",
     "rope_parameters", "rope_scaling", "depth_decoder_config"}
)
_TRANSFORMERS_DEPTH = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window"}
)


class _TransformersConfig:
    """Reads a transformers config.json mapping of one layout ("Moshi", "Kyutai STT"): a
    missing key or a value our model does not implement is a one-line error."""

    def __init__(self, source: str, layout: str) -> None:
        self.source, self.layout = source, layout

    def get(self, part: dict, key: str, default: Any = None) -> Any:
        value = part.get(key, default)
        if value is None:
            raise WeightsError(f"{self.source}: transformers {self.layout} config lacks {key}")
        return value

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            raise WeightsError(f"{self.source}: {message} (transformers {self.layout} layout)")

    def check_transformer(self, part: dict, where: str = "") -> tuple[int, int, int]:
        """One transformer's keys (`where`: their prefix in messages): our attention (no
        grouped queries), SiLU gating, float32 RMSNorm -> (dim, heads, gated MLP hidden)."""
        dim = int(self.get(part, "hidden_size"))
        heads = int(self.get(part, "num_attention_heads"))
        self.check(part.get("num_key_value_heads") in (None, heads),
                   f"{where}num_key_value_heads must equal num_attention_heads (no grouped "
                   "queries)")
        self.check(part.get("head_dim") in (None, dim // heads),
                   f"{where}head_dim must be hidden_size / num_attention_heads")
        self.check(part.get("hidden_act", "silu") == "silu", f"{where}hidden_act must be silu")
        self.check(float(part.get("rms_norm_eps", 1e-8)) == 1e-8,
                   f"{where}rms_norm_eps must be 1e-8 (float32 RMSNorm)")
        ffn_dim = int(self.get(part, "ffn_dim"))
        self.check(ffn_dim % 2 == 0, f"{where}ffn_dim must be even")
        return dim, heads, ffn_dim // 2

    def rope_theta(self, data: dict, default: float) -> float:
        """The RoPE base period; only the default RoPE is ours."""
        rope = data.get("rope_parameters") or {}
        self.check(data.get("rope_scaling") is None
                   and rope.get("rope_type", "default") == "default",
                   "only the default RoPE is supported")
        return float(rope.get("rope_theta", data.get("rope_theta", default)))

    def hidden_scale(self, dim: int, hidden: int, ffn_dim: int) -> float:
        """The official hidden_scale that gives this gated MLP width (hidden = 2/3 of
        int(hidden_scale * dim), the official rule): exact for official sizes."""
        scale = 1.5 * hidden / dim
        self.check(gating_hidden(dim, int(scale * dim)) == hidden,
                   f"ffn_dim {ffn_dim} has no official hidden_scale")
        return scale


def from_transformers_moshi(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A transformers `MoshiConfig` config.json (kmhf/hf-moshiko) -> official lm config keys.

    transformers keeps the fused gated-MLP width (`ffn_dim` = 2 x hidden), a sliding window
    as the context, RoPE only in the temporal transformer, and no acoustic delays: Moshi's
    standard ones (0 for text and codebook 0, 1 for the others, for both audio streams) are
    used. `audio_encoder_config` describes the bundled Mimi and is not read here.
    """
    depth = data.get("depth_decoder_config")
    if not isinstance(depth, dict):
        raise WeightsError(f"{source}: depth_decoder_config must be a JSON object")
    for part, keys, where in ((data, _TRANSFORMERS_MAIN, ""), (depth, _TRANSFORMERS_DEPTH,
                                                                "depth_decoder_config.")):
        unknown = sorted(set(part) - keys - _TRANSFORMERS_METADATA)
        if unknown:
            raise WeightsError(f"{source}: unknown transformers Moshi config key(s): "
                               + ", ".join(where + key for key in unknown))

    config = _TransformersConfig(source, "Moshi")
    get, check = config.get, config.check
    dim, heads, hidden = config.check_transformer(data)
    depth_dim, depth_heads, depth_hidden = config.check_transformer(depth,
                                                                    "depth_decoder_config.")
    max_period = config.rope_theta(data, 10000.0)
    dep_q = int(get(data, "num_codebooks", 8))
    card = data.get("audio_vocab_size") or (data.get("audio_encoder_config") or {}).get(
        "codebook_size", 2048)
    mapped = {
        "dim": dim,
        "text_card": int(get(data, "vocab_size")),
        "n_q": 2 * dep_q,
        "dep_q": dep_q,
        "card": int(card),
        "num_heads": heads,
        "num_layers": int(get(data, "num_hidden_layers")),
        "hidden_scale": config.hidden_scale(dim, hidden, data["ffn_dim"]),
        "context": int(get(data, "sliding_window", 3000)),
        "max_period": max_period,
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": depth_dim,
        "depformer_dim_feedforward": 3 * depth_hidden // 2,
        "depformer_num_heads": depth_heads,
        "depformer_num_layers": int(get(depth, "num_hidden_layers")),
        "depformer_context": int(get(depth, "sliding_window", 8)),
        "depformer_pos_emb": "none",
        "delays": [0] + 2 * ([0] + [1] * (dep_q - 1)),
    }
    check(gating_hidden(depth_dim, mapped["depformer_dim_feedforward"]) == depth_hidden,
          f"depth_decoder_config.ffn_dim {depth['ffn_dim']} has no official feed-forward size")
    return mapped


# ----------------------------------------------------------------------- transformers STT config

TRANSFORMERS_STT_MODEL_TYPE = "kyutai_speech_to_text"
# The feature extractor's config beside config.json in a -trfs repo: it holds the stt_config.
TRANSFORMERS_STT_PREPROCESSOR = "preprocessor_config.json"
_TRANSFORMERS_STT_KEYS = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
     "head_dim", "ffn_dim", "hidden_act", "rms_norm_eps", "sliding_window", "rope_theta",
     "rope_parameters", "rope_scaling", "codebook_vocab_size", "audio_bos_token_id",
     "audio_pad_token_id", "codec_config", "frame_size",
     "stt_config"}  # the last one put there by complete_config
)


def from_transformers_stt(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A transformers `KyutaiSpeechToTextConfig` config.json (kyutai/stt-2.6b-en-trfs,
    kyutai/stt-1b-en_fr-trfs) -> official lm config keys.

    transformers counts the initial text token in `vocab_size` (text_card + 1: the rows of
    text_emb; its lm_head has a zero row for it) and the initial audio token in
    `codebook_vocab_size` (card + 1); the attention window is `sliding_window` (our context);
    the gated MLP width is fused (`ffn_dim` = 2 x hidden). It has no extra (VAD) heads and no
    acoustic delays (all 0 for STT). The stt_config (text delay, silence prefix) is not in
    config.json but in the feature extractor's preprocessor_config.json of the same repo:
    `complete_config` adds it to `data` when the loader finds that file beside config.json;
    otherwise stt_config stays unset and the transcriber uses SttConfig's defaults
    (stt-1b-en_fr's 0.5 s / 0 s; wrong for stt-2.6b-en, whose file says 2.5 s / 1 s).
    `codec_config` describes the bundled Mimi and is not read here.
    """
    unknown = sorted(set(data) - _TRANSFORMERS_STT_KEYS - _TRANSFORMERS_METADATA)
    if unknown:
        raise WeightsError(f"{source}: unknown transformers Kyutai STT config key(s): "
                           + ", ".join(unknown))

    config = _TransformersConfig(source, "Kyutai STT")
    check = config.check

    def get(key: str, default: Any = None) -> Any:
        return config.get(data, key, default)

    dim, heads, hidden = config.check_transformer(data)
    max_period = config.rope_theta(data, 100000.0)
    text_card = int(get("vocab_size")) - 1
    card = int(get("codebook_vocab_size", 2049)) - 1
    n_q = int(get("num_codebooks", 32))
    check(data.get("audio_bos_token_id") in (None, card),
          f"audio_bos_token_id must be the initial audio token {card}")
    pad = text_card + 1 + n_q * (card + 1)  # the zero row closing the embedding table
    check(data.get("audio_pad_token_id") in (None, pad), f"audio_pad_token_id must be {pad}")
    # bos_token_id (the initial text token, text_card in our files) is not checked: the
    # class default 48000 lies outside the vocab; the model always starts from text_card.
    text_pad = 3 if data.get("pad_token_id") is None else data["pad_token_id"]
    mapped: dict[str, Any] = {
        "dim": dim,
        "text_card": text_card,
        "existing_text_padding_id": int(text_pad),
        "n_q": n_q,
        "dep_q": 0,
        "card": card,
        "num_heads": heads,
        "num_layers": int(get("num_hidden_layers")),
        "hidden_scale": config.hidden_scale(dim, hidden, data["ffn_dim"]),
        "context": int(get("sliding_window", 375)),
        "max_period": max_period,
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "delays": [0] * (n_q + 1),
    }
    if data.get("stt_config") is not None:
        mapped["stt_config"] = data["stt_config"]
    return mapped


def complete_config(data: dict[str, Any], read_beside: Callable[[str], dict | None]
                    ) -> dict[str, Any]:
    """A transformers Kyutai STT config.json completed with the stt_config its feature
    extractor keeps in the preprocessor_config.json beside it (`read_beside(name)`: that file's
    JSON, or None where there is none); any other config as it is."""
    if data.get("model_type") != TRANSFORMERS_STT_MODEL_TYPE or "stt_config" in data:
        return data
    extractor = read_beside(TRANSFORMERS_STT_PREPROCESSOR) or {}
    keys = ("audio_delay_seconds", "audio_silence_prefix_seconds")
    stt_config = {key: extractor[key] for key in keys if extractor.get(key) is not None}
    return {**data, "stt_config": stt_config} if stt_config else data
