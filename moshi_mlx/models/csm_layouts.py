"""Other people's layouts of Sesame CSM -> ours.

Tensors: Sesame's original checkpoint (SesameAILabs/csm, sesame/csm-1b), transformers'
`CsmForConditionalGeneration` (q/k rows in rotate-half RoPE order) and mlx-audio's
(mlx-community/csm-1b); ours keeps Sesame's names for the top-level tensors and its
interleaved-pair RoPE rows. Configs: Sesame's config.json (flavor names, torchtune llama3_2
builder arguments) and transformers' -> our config form (`CsmConfig.to_dict()`), plain data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from moshi_mlx.errors import WeightsError
from moshi_mlx.models.layouts import fragment_name, rope_rows_to_interleaved

if TYPE_CHECKING:
    from moshi_mlx.models.csm import CsmConfig

# ---------------------------------------------------------------------------- config

# SesameAILabs/csm FLAVORS: torchtune llama3_2 builder arguments (head_dim = dim // heads,
# the rest torchtune's defaults, see `_from_torchtune`).
SESAME_FLAVORS: dict[str, dict[str, int]] = {
    "llama-1B": {"num_layers": 16, "embed_dim": 2048, "num_heads": 32, "num_kv_heads": 8,
                 "intermediate_dim": 8192},
    "llama-100M": {"num_layers": 4, "embed_dim": 1024, "num_heads": 8, "num_kv_heads": 2,
                   "intermediate_dim": 8192},
}
# Custom flavors (our test fixture's) lie in this file beside a Sesame config.json.
SESAME_FLAVORS_FILE = "flavors.json"

# config.json keys that carry no model structure (tolerated, ignored).
METADATA_KEYS = frozenset({
    "architectures", "dtype", "torch_dtype", "transformers_version", "model_type",
    "initializer_range", "use_cache", "attention_dropout", "hidden_act", "tie_word_embeddings",
    "tie_codebooks_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "audio_token_id", "audio_eos_token_id", "codebook_pad_token_id", "codebook_eos_token_id",
    "codec_config", "quantization", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "attention_bias", "mlp_bias", "pretraining_tp",
    "moshi_name", "tokenizer_name", "mimi_name",  # our converter's file names
})


def reject_unknown(data: dict, known: set[str], source: str) -> None:
    unknown = sorted(set(data) - known - METADATA_KEYS)
    if unknown:
        raise WeightsError(f"{source}: unknown CSM config keys {unknown}")


def complete_config(data: dict, read_beside: Callable[[str], dict | None]) -> dict:
    """A Sesame config.json names its flavors; custom ones are in `flavors.json` beside it
    (`read_beside(name)`: that file's JSON, or None where there is none)."""
    if "backbone_flavor" in data and "flavors" not in data:
        flavors = read_beside(SESAME_FLAVORS_FILE)
        if flavors is not None:
            return {**data, "flavors": flavors}
    return data


def our_config_form(data: dict, source: str) -> dict[str, Any]:
    """A Sesame or transformers CSM config.json -> our config form (`CsmConfig.to_dict()`)."""
    if "backbone_flavor" in data:
        return _from_sesame(data, source)
    if data.get("model_type") == "csm" or "depth_decoder_config" in data:
        return _from_transformers(data, source)
    raise WeightsError(f"{source}: not a CSM config (no backbone_flavor, no model_type csm)")


def _from_sesame(data: dict, source: str) -> dict[str, Any]:
    reject_unknown(data, {"backbone_flavor", "decoder_flavor", "text_vocab_size",
                          "audio_vocab_size", "audio_num_codebooks", "flavors"}, source)
    custom = data.get("flavors") or {}

    def flavor(key: str) -> dict[str, Any]:
        name = data.get(key)
        if name in SESAME_FLAVORS:
            return _from_torchtune(SESAME_FLAVORS[name], f"{source} flavor {name}")
        if name in custom:
            return _from_torchtune(custom[name], f"{source} flavor {name}")
        raise WeightsError(f"{source}: unknown {key} {name!r} (known: "
                           f"{sorted(SESAME_FLAVORS)}; others need a {SESAME_FLAVORS_FILE})")

    try:
        return {"backbone": flavor("backbone_flavor"), "decoder": flavor("decoder_flavor"),
                "text_vocab_size": int(data["text_vocab_size"]),
                "audio_vocab_size": int(data["audio_vocab_size"]),
                "num_codebooks": int(data["audio_num_codebooks"])}
    except KeyError as exc:
        raise WeightsError(f"{source}: missing key {exc}") from None


def _from_torchtune(kw: dict, source: str) -> dict[str, Any]:
    reject_unknown(kw, {"vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim",
                        "max_seq_len", "intermediate_dim", "attn_dropout", "norm_eps",
                        "rope_base", "scale_factor"}, source)
    try:
        dim, heads = int(kw["embed_dim"]), int(kw["num_heads"])
        return {"num_layers": int(kw["num_layers"]), "dim": dim, "num_heads": heads,
                "num_kv_heads": int(kw["num_kv_heads"]), "head_dim": dim // heads,
                "hidden_dim": int(kw["intermediate_dim"]),
                "norm_eps": float(kw.get("norm_eps", 1e-5)),
                "rope_theta": float(kw.get("rope_base", 500000)),
                # torchtune's llama3 scaling: only the factor is an argument
                "rope_scaling": {"factor": float(kw.get("scale_factor", 32))},
                "max_seq_len": int(kw.get("max_seq_len", 2048))}
    except KeyError as exc:
        raise WeightsError(f"{source}: missing key {exc}") from None


_HF_LLAMA_KEYS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                  "rope_parameters", "max_position_embeddings", "vocab_size", "num_codebooks"}


def _hf_llama(d: dict, source: str) -> dict[str, Any]:
    rope = dict(d.get("rope_parameters") or {})
    rope.update(d.get("rope_scaling") or {})
    theta = float(d.get("rope_theta", rope.get("rope_theta", 500000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "llama3":
        scaling = {"factor": float(rope["factor"]),
                   "low_freq_factor": float(rope["low_freq_factor"]),
                   "high_freq_factor": float(rope["high_freq_factor"]),
                   "old_context": float(rope["original_max_position_embeddings"])}
    elif kind == "default":
        scaling = None
    else:
        raise WeightsError(f"{source}: unsupported rope_type {kind!r}")
    try:
        dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        return {"num_layers": int(d["num_hidden_layers"]), "dim": dim, "num_heads": heads,
                "num_kv_heads": int(d.get("num_key_value_heads", heads)),
                "head_dim": int(d.get("head_dim") or dim // heads),
                "hidden_dim": int(d["intermediate_size"]),
                "norm_eps": float(d.get("rms_norm_eps", 1e-5)), "rope_theta": theta,
                "rope_scaling": scaling,
                "max_seq_len": int(d.get("max_position_embeddings", 2048))}
    except KeyError as exc:
        raise WeightsError(f"{source}: missing key {exc}") from None


def _from_transformers(data: dict, source: str) -> dict[str, Any]:
    reject_unknown(data, _HF_LLAMA_KEYS | {"depth_decoder_config", "text_vocab_size"}, source)
    depth = data.get("depth_decoder_config")
    if not isinstance(depth, dict):
        raise WeightsError(f"{source}: missing depth_decoder_config")
    reject_unknown(depth, _HF_LLAMA_KEYS | {"backbone_hidden_size"}, f"{source} depth decoder")
    if data.get("attention_bias") or data.get("mlp_bias"):
        raise WeightsError(f"{source}: biases in attention/MLP are not supported")
    return {"backbone": _hf_llama(data, source),
            "decoder": _hf_llama(depth, f"{source} depth decoder"),
            "text_vocab_size": int(data.get("text_vocab_size", 128256)),
            "audio_vocab_size": int(data.get("vocab_size", 2051)),
            "num_codebooks": int(data.get("num_codebooks", 32))}


# ---------------------------------------------------------------------------- weights

_LAYER_KEYS_SESAME = {
    "attn.q_proj.weight": "attn.q_proj.weight",
    "attn.k_proj.weight": "attn.k_proj.weight",
    "attn.v_proj.weight": "attn.v_proj.weight",
    "attn.output_proj.weight": "attn.out_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "sa_norm.scale": "attn_norm.weight",
    "mlp_norm.scale": "mlp_norm.weight",
}
_LAYER_KEYS_HF = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.out_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}
_QKV = {"attn.q_proj.": 0, "attn.k_proj.": 1, "attn.v_proj.": 2}
_TOP_SESAME = {
    "text_embeddings.weight": "text_embeddings.weight",
    "audio_embeddings.weight": "audio_embeddings.weight",
    "projection.weight": "projection.weight",
    "codebook0_head.weight": "codebook0_head.weight",
    "audio_head": "audio_head",
    "backbone.norm.scale": "backbone.norm.weight",
    "decoder.norm.scale": "decoder.norm.weight",
}
_TOP_HF = {
    "embed_text_tokens.weight": "text_embeddings.weight",
    "depth_decoder.model.embed_tokens.weight": "audio_embeddings.weight",
    "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
    "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
    "lm_head.weight": "codebook0_head.weight",
    "depth_decoder.codebooks_head.weight": "audio_head",
    "backbone_model.norm.weight": "backbone.norm.weight",
    "depth_decoder.model.norm.weight": "decoder.norm.weight",
}
_LAYER_SESAME = re.compile(r"(backbone|decoder)\.layers\.(\d+)\.(.+)")
_LAYER_HF = re.compile(r"(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)")


_OUR_TOP = frozenset(_TOP_SESAME.values())
_OUR_LAYER_KEYS = frozenset(
    {name for name in _LAYER_KEYS_SESAME.values() if not name.startswith(tuple(_QKV))}
    | {"attn.qkv_proj.weight"})
_MOSHI_PREFIXES = ("transformer.layers.", "depformer", "text_emb", "emb.", "audio_embs.")


def _map_key(key: str, value: mx.array, config: CsmConfig) -> tuple[str, mx.array] | None:
    """One tensor of the Sesame, transformers, mlx-audio or our own layout -> (our name,
    tensor); None for the transformers file's bundled codec (we decode with our Mimi). The
    layouts' names differ tensor by tensor, so each tensor says which layout it comes from."""
    if key.startswith("codec_model."):
        return None
    # mlx-audio's layout (mlx-community/csm-1b): "model." + Sesame's names, with transformers'
    # names inside the layers (on Sesame's rows: no q/k permutation)
    key = key.removeprefix("model.")
    if key.endswith((".scales", ".biases")) and not key.startswith(("backbone.", "decoder.")):
        raise WeightsError(f"quantized embeddings or heads ({key}: mlx-audio's quantized CSM "
                           "layout) are not supported: load the float checkpoint with -q 4/8")
    if key in _TOP_SESAME:
        return _TOP_SESAME[key], value
    if key in _TOP_HF:
        return _TOP_HF[key], value
    if (match := _LAYER_SESAME.fullmatch(key)) and (
            name := _layer_name(_LAYER_KEYS_SESAME, match[3])):
        return _fused(f"{match[1]}.layers.{match[2]}.", name), value
    if (match := _LAYER_SESAME.fullmatch(key)) and (
            name := _layer_name(_LAYER_KEYS_HF, match[3])):
        # mlx-audio's layer names are transformers', on Sesame's rows (interleaved RoPE)
        return _fused(f"{match[1]}.layers.{match[2]}.", name), value
    if (match := _LAYER_HF.fullmatch(key)) and match[3] in _LAYER_KEYS_HF:
        part = "backbone" if match[1].startswith("backbone") else "decoder"
        name = _LAYER_KEYS_HF[match[3]]
        if name in ("attn.q_proj.weight", "attn.k_proj.weight"):
            llama = config.backbone if part == "backbone" else config.decoder
            heads = llama.num_heads if name.startswith("attn.q") else llama.num_kv_heads
            value = rope_rows_to_interleaved(value, heads, key, "transformers CSM")
        return _fused(f"{part}.layers.{match[2]}.", name), value
    base = key.rsplit(".", 1)[0]  # our own layout, quantized too (X.scales, X.biases)
    if key in _OUR_TOP or f"{base}.weight" in _OUR_TOP or (
            (match := _LAYER_SESAME.fullmatch(key))
            and match[3].rsplit(".", 1)[0] + ".weight" in _OUR_LAYER_KEYS):
        return key, value
    if key.startswith(_MOSHI_PREFIXES):
        raise WeightsError("a Moshi/STT LM checkpoint was given, not a CSM (Sesame) checkpoint")
    layout = "transformers" if key.startswith(("backbone_model.", "depth_decoder.")) else (
        "sesame")
    raise WeightsError(f"unknown tensors for the {layout} CSM layout (e.g. {key})")


def _layer_name(table: dict[str, str], name: str) -> str | None:
    """A layer tensor's name in a layout's table -> ours; a quantized linear's X.scales and
    X.biases (MLX files keeping the layout's names) follow its X.weight."""
    if name in table:
        return table[name]
    base, _, suffix = name.rpartition(".")
    if suffix in ("scales", "biases") and f"{base}.weight" in table:
        return table[f"{base}.weight"].removesuffix("weight") + suffix
    return None


def _fused(prefix: str, name: str) -> str:
    """Our full name; q, k, v become their part of the fused `attn.qkv_proj` (joined by the
    loader, tensor by tensor)."""
    for role, part in _QKV.items():
        if name.startswith(role):
            return fragment_name(f"{prefix}attn.qkv_proj.{name.removeprefix(role)}", part,
                                 len(_QKV))
    return prefix + name


def sanitize(weights: dict[str, mx.array], config: CsmConfig) -> dict[str, mx.array]:
    """Sesame or transformers (or our own) layout -> our parameter names, lazily, tensor by
    tensor. The transformers file's bundled `codec_model.*` Mimi is dropped."""
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        mapped = _map_key(key, value, config)
        if mapped is not None:
            out[mapped[0]] = mapped[1]
    return out
