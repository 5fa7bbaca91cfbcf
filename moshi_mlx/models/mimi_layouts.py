"""Other people's layouts of Mimi -> ours: the official PyTorch checkpoint
(tokenizer-e351c8d8-checkpoint125.safetensors), transformers' `MimiModel` (kyutai/mimi) and
the Mimi that transformers' Moshi and Kyutai STT checkpoints bundle; their configs -> the
fields of our `MimiConfig`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import WeightsError
from moshi_mlx.models.layouts import FragmentJoiner, fragment_name, rope_rows_to_interleaved
from moshi_mlx.modules.seanet import SeanetConfig

if TYPE_CHECKING:
    from moshi_mlx.models.mimi import MimiConfig


def _map_key(key: str, value: mx.array) -> tuple[str, mx.array] | None:
    """Official PyTorch key/layout -> ours. None for entries we do not use."""
    if key.endswith("._initialized"):
        return None
    key = key.replace("._codebook.", ".codebook.")
    key = key.replace(".self_attn.in_proj_weight", ".self_attn.in_proj.weight")
    if value.ndim != 3:
        return key, value  # a wrong rank is reported by the shape check
    if key.endswith("convtr.weight"):
        if key.startswith("upsample."):  # depthwise [C, 1, k] -> [C, k, 1]
            return key, value.transpose(0, 2, 1)
        return key, value.transpose(1, 2, 0)  # [in, out, k] -> [out, k, in]
    return key, value.transpose(0, 2, 1)  # conv [out, in, k] -> [out, k, in]


def sanitize(weights: dict[str, mx.array], cfg: MimiConfig) -> dict[str, mx.array]:
    """Tensors of the official layout or the transformers one (`MimiModel`, kyutai/mimi;
    recognised by its keys) -> ours."""
    if any(_TRANSFORMERS_KEY.match(key) for key in weights):
        weights = transformers_to_official(weights, cfg)
    out = {}
    for key, value in weights.items():
        mapped = _map_key(key, value)
        if mapped is not None:
            out[mapped[0]] = mapped[1]
    return out


# ---- transformers layout (MimiModel.save_pretrained, kyutai/mimi) -------------------------

_TRANSFORMERS_KEY = re.compile(
    r"(encoder|decoder)\.layers\.|(encoder|decoder)_transformer\.layers\.|(down|up)sample\.conv\.w"
    r"|quantizer\.(semantic|acoustic)_residual_vector_quantizer\.")
_TR_SEANET = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(block\.\d+\.)?conv\.(weight|bias)")
_TR_LAYER = re.compile(r"(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)")
_TR_LAYER_PARTS = {
    "self_attn.o_proj.weight": "self_attn.out_proj.weight",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc2.weight": "linear2.weight",
    "input_layernorm.weight": "norm1.weight",
    "input_layernorm.bias": "norm1.bias",
    "post_attention_layernorm.weight": "norm2.weight",
    "post_attention_layernorm.bias": "norm2.bias",
    "self_attn_layer_scale.scale": "layer_scale_1.scale",
    "mlp_layer_scale.scale": "layer_scale_2.scale",
}
_TR_QKV = re.compile(r"self_attn\.([qkv])_proj\.weight")
_TR_QUANTIZER = re.compile(
    r"quantizer\.(semantic|acoustic)_residual_vector_quantizer\.(?:(input_proj|output_proj)\.weight"
    r"|layers\.(\d+)\.codebook\.(embed_sum|cluster_usage|initialized))")
_TR_CODEBOOK = {"embed_sum": "embedding_sum", "cluster_usage": "cluster_usage",
                "initialized": "_initialized"}


def _decoder_convtr_indices(cfg: MimiConfig) -> set[int]:
    """Positions of the transposed convs in the SEANet decoder stack: conv, then per ratio
    ELU, transposed conv and the residual blocks."""
    step = 2 + cfg.seanet.n_residual_layers
    return {2 + j * step for j in range(len(cfg.seanet.ratios))}


def transformers_to_official(weights: dict[str, mx.array], cfg: MimiConfig
                             ) -> dict[str, mx.array]:
    """transformers `MimiModel` names/layout -> the official PyTorch checkpoint's: conv names,
    split codebook halves, q/k/v projections fused back into in_proj (q and k rows put back in
    the interleaved-RoPE order)."""
    convtr = _decoder_convtr_indices(cfg)
    joiner = FragmentJoiner()
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        name = None
        if match := _TR_SEANET.fullmatch(key):
            side, index, block, leaf = match[1], int(match[2]), match[3], match[4]
            if block:
                name = f"{side}.model.{index}.{block}conv.conv.{leaf}"
            elif side == "decoder" and index in convtr:
                name = f"{side}.model.{index}.convtr.convtr.{leaf}"
            else:
                name = f"{side}.model.{index}.conv.conv.{leaf}"
        elif match := _TR_LAYER.fullmatch(key):
            prefix = f"{match[1]}_transformer.transformer.layers.{match[2]}."
            if qkv := _TR_QKV.fullmatch(match[3]):
                part = "qkv".index(qkv[1])
                if part < 2:
                    value = rope_rows_to_interleaved(value, cfg.num_heads, key, "transformers Mimi")
                name = fragment_name(prefix + "self_attn.in_proj_weight", part, 3)
            elif match[3] in _TR_LAYER_PARTS:
                name = prefix + _TR_LAYER_PARTS[match[3]]
        elif key == "downsample.conv.weight":
            name = "downsample.conv.conv.conv.weight"
        elif key == "upsample.conv.weight":
            name = "upsample.convtr.convtr.convtr.weight"
        elif match := _TR_QUANTIZER.fullmatch(key):
            half = "rvq_first" if match[1] == "semantic" else "rvq_rest"
            if match[2]:
                name = f"quantizer.{half}.{match[2]}.weight"
            else:
                name = f"quantizer.{half}.vq.layers.{match[3]}._codebook.{_TR_CODEBOOK[match[4]]}"
        if name is None:
            raise WeightsError(f"unexpected tensor {key!r}: not part of a transformers-layout "
                               "Mimi (MimiModel) checkpoint")
        out.update(joiner.add(name, value))
    joiner.check_done("the transformers Mimi checkpoint")
    return out


def config_from_transformers(data: dict, source: str = "config") -> dict[str, Any]:
    """A transformers `MimiConfig` config.json (kyutai/mimi, or a Moshi config's
    `audio_encoder_config`) -> the fields of our `MimiConfig`; what our Mimi does not
    implement is a one-line error."""

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise WeightsError(f"{source}: {what} is not supported (transformers Mimi layout)")

    get = data.get
    heads, dim = int(get("num_attention_heads", 8)), int(get("hidden_size", 512))
    check(get("num_key_value_heads") in (None, heads), "num_key_value_heads != heads")
    check(get("head_dim") in (None, dim // heads), "head_dim != hidden_size / heads")
    check(get("hidden_act", "gelu") == "gelu", f"hidden_act {get('hidden_act')!r}")
    check(get("use_causal_conv", True) is True, "use_causal_conv false")
    check(get("pad_mode", "constant") == "constant", f"pad_mode {get('pad_mode')!r}")
    check(float(get("trim_right_ratio", 1.0)) == 1.0, "trim_right_ratio != 1")
    check(not get("use_conv_shortcut", False), "use_conv_shortcut")
    check(not get("attention_bias", False), "attention_bias")
    check(int(get("audio_channels", 1)) == 1, "audio_channels != 1")
    check(int(get("num_semantic_quantizers", 1)) == 1, "num_semantic_quantizers != 1")
    check(int(get("upsample_groups", dim)) == dim, "upsample_groups != hidden_size")
    check(int(get("vector_quantization_hidden_dimension", get("codebook_dim", 256)))
          == int(get("codebook_dim", 256)), "vector_quantization_hidden_dimension != codebook_dim")
    rope = get("rope_parameters") or {}
    check(rope.get("rope_type", "default") == "default" and not get("rope_scaling"),
          "a non-default RoPE")
    ratios = tuple(int(r) for r in get("upsampling_ratios", (8, 6, 5, 4)))
    seanet = SeanetConfig(
        dimension=dim, n_filters=int(get("num_filters", 64)), ratios=ratios,
        kernel_size=int(get("kernel_size", 7)),
        residual_kernel_size=int(get("residual_kernel_size", 3)),
        last_kernel_size=int(get("last_kernel_size", 3)),
        dilation_base=int(get("dilation_growth_rate", 2)),
        n_residual_layers=int(get("num_residual_layers", 1)), compress=int(get("compress", 2)),
    )
    sample_rate = int(get("sampling_rate", SAMPLE_RATE))
    frame_rate = get("_frame_rate") or get("frame_rate")
    frame_size = (round(sample_rate / float(frame_rate)) if frame_rate
                  else 2 * seanet.hop_length)
    max_codebooks = int(get("num_quantizers", 32))
    return dict(
        sample_rate=sample_rate, frame_size=frame_size, seanet=seanet, dim=dim, num_heads=heads,
        num_layers=int(get("num_hidden_layers", 8)),
        dim_feedforward=int(get("intermediate_size", 2048)),
        context=int(get("sliding_window", 250)),
        rope_max_period=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
        norm_eps=float(get("norm_eps", 1e-5)), codebook_size=int(get("codebook_size", 2048)),
        codebook_dim=int(get("codebook_dim", 256)), max_codebooks=max_codebooks,
        num_codebooks=min(8, max_codebooks),
    )


# ---- files that bundle a Mimi --------------------------------------------------------------

# Moshi's transformers checkpoints (kmhf/hf-moshiko) bundle their Mimi under this prefix,
# Kyutai STT's (kyutai/stt-*-trfs) under the other; each config.json describes it in a key.
BUNDLED_PREFIX = "audio_encoder."
STT_BUNDLED_PREFIX = "codec_model."
_BUNDLING_CONFIGS = {"moshi": ("audio_encoder_config", BUNDLED_PREFIX),
                     "kyutai_speech_to_text": ("codec_config", STT_BUNDLED_PREFIX)}

# Keys that tell which other model a file holds (for the "not a Mimi" message).
_OTHER_LAYOUTS = (
    ("depformer_in.", "a Moshi LM in the official PyTorch layout"),
    ("depformer.slices.", "a Moshi LM in the MLX layout"),
    ("depth_decoder.", "a Moshi LM in the transformers layout"),
    ("model.embed_tokens.embed_tokens.", "a Kyutai STT LM in the transformers layout"),
)


def layout_hint(keys) -> str:
    """"; it holds <another model>" for the keys of a file that is not a Mimi, else ""."""
    for marker, what in _OTHER_LAYOUTS:
        if any(marker in key for key in keys):
            return f"; it holds {what}"
    return ""


def bundled_mimi(data: dict[str, Any], source: str) -> tuple[dict[str, Any] | None, str]:
    """What a config.json beside Mimi weights says: (the fields of our `MimiConfig`, the tensor
    prefix of a Mimi bundled in a Moshi or STT file) for a transformers config, (None, "") for
    any other (official LM configs)."""
    if data.get("model_type") == "mimi":
        return config_from_transformers(data, source), ""
    key, prefix = _BUNDLING_CONFIGS.get(data.get("model_type"), (None, ""))
    if key is not None and isinstance(data.get(key), dict):
        return config_from_transformers(data[key], f"{source} {key}"), prefix
    if isinstance(data.get("codec_config"), dict):  # CSM's, and weights_convert folders'
        return config_from_transformers(data["codec_config"], f"{source} codec_config"), ""
    return None, ""


def unbundle(weights: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    """The Mimi tensors of a file that bundles it under `prefix` (found from the tensor names
    when empty), without the prefix; the file's tensors as they are when it bundles none."""
    if not prefix:
        prefix = next((p for p in (BUNDLED_PREFIX, STT_BUNDLED_PREFIX)
                       if any(key.startswith(p) for key in weights)), "")
    if not prefix:
        return weights
    return {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
