"""Mimi, Kyutai's streaming neural audio codec: 24 kHz audio <-> 12.5 Hz frames of codes.

encode: SEANet encoder (hop 960, 25 Hz) -> 8-layer causal transformer -> learnt stride-2
        downsample (12.5 Hz) -> split residual VQ (1 semantic + acoustic codebooks)
decode: codebook sum -> depthwise stride-2 transposed-conv upsample -> transformer -> SEANet
        decoder.
Everything is causal and streaming. A whole clip is encoded/decoded by running the same
streaming path over it in chunks, with its own fresh state (so it leaves `encode_step` /
`decode_step` streams untouched).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import AudioError, WeightsError
from moshi_mlx.modules.cache import WindowCache
from moshi_mlx.modules.conv import ConvState, ConvTrState
from moshi_mlx.modules.rvq import SplitResidualVectorQuantizer
from moshi_mlx.modules.seanet import (
    ConvLayer,
    ConvTrLayer,
    SeanetConfig,
    SeanetDecoder,
    SeanetEncoder,
)
from moshi_mlx.modules.transformer import Attention


@dataclass
class MimiConfig:
    sample_rate: int = SAMPLE_RATE
    frame_size: int = FRAME_SIZE  # samples per 12.5 Hz frame
    seanet: SeanetConfig = field(default_factory=SeanetConfig)
    dim: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250  # transformer steps at 25 Hz
    rope_max_period: float = 10000.0
    norm_eps: float = 1e-5
    codebook_size: int = 2048
    codebook_dim: int = 256
    max_codebooks: int = 32  # in the checkpoint
    num_codebooks: int = 8  # used by encode / expected by decode
    chunk_frames: int = 25  # frames per chunk of a whole-clip call (bounds memory)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def downsample_stride(self) -> int:
        return self.frame_size // self.seanet.hop_length

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> MimiConfig:
        """From a transformers Mimi config.json, the one config file form Mimi has."""
        return config_from_transformers(data, source)

    @classmethod
    def default(cls) -> MimiConfig:
        return cls()


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return x * self.scale


class TransformerLayer(nn.Module):
    """Norm-first layer: x + ls1 * attn(norm1(x)); x + ls2 * linear2(gelu(linear1(norm2(x))))."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.rope_max_period)
        self.linear1 = nn.Linear(cfg.dim, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.dim, bias=False)
        self.layer_scale_1 = LayerScale(cfg.dim)
        self.layer_scale_2 = LayerScale(cfg.dim)

    def __call__(self, x: mx.array, cache: WindowCache) -> mx.array:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), cache))
        return x + self.layer_scale_2(self.linear2(nn.gelu(self.linear1(self.norm2(x)))))


class _Layers(nn.Module):
    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.layers = [TransformerLayer(cfg) for _ in range(cfg.num_layers)]


class MimiTransformer(nn.Module):
    """Causal transformer over [B, T, dim] (keys `transformer.layers.{i}.*`)."""

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.context = cfg.context
        self.transformer = _Layers(cfg)

    def init_state(self) -> list[WindowCache]:
        return [WindowCache(self.context) for _ in self.transformer.layers]

    def store_weights_column_major(self) -> None:
        """Same values, column-major storage for every Linear weight [out, in]: nn.Linear
        computes x @ weight.T, and with this layout weight.T is a row-major [in, out] matrix,
        the operand layout BLAS runs fastest (~1.5x with the reference BLAS of MLX's Linux
        wheel) and that MLX passes without a copy."""
        for layer in self.transformer.layers:
            for linear in (
                layer.self_attn.in_proj, layer.self_attn.out_proj, layer.linear1, layer.linear2
            ):
                linear.weight = mx.contiguous(linear.weight.T).T

    def __call__(self, x: mx.array, caches: list[WindowCache]) -> mx.array:
        for layer, cache in zip(self.transformer.layers, caches, strict=True):
            x = layer(x, cache)
        return x


class _Wrap(nn.Module):
    """One more level of key nesting (`downsample.conv.*`, `upsample.convtr.*`)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


@dataclass
class EncoderState:
    seanet: list
    transformer: list[WindowCache]
    downsample: ConvState


@dataclass
class DecoderState:
    upsample: ConvTrState
    transformer: list[WindowCache]
    seanet: list


class Mimi(nn.Module):
    def __init__(self, cfg: MimiConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or MimiConfig()
        if not 1 <= cfg.num_codebooks <= cfg.max_codebooks:
            raise ValueError(f"num_codebooks must be in 1..{cfg.max_codebooks}")
        self.cfg = cfg
        stride = cfg.downsample_stride
        self.encoder = SeanetEncoder(cfg.seanet)
        self.decoder = SeanetDecoder(cfg.seanet)
        self.encoder_transformer = MimiTransformer(cfg)
        self.decoder_transformer = MimiTransformer(cfg)
        self.downsample = _Wrap(
            conv=ConvLayer(
                cfg.dim, cfg.dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate"
            )
        )
        self.upsample = _Wrap(
            convtr=ConvTrLayer(cfg.dim, cfg.dim, 2 * stride, stride, groups=cfg.dim, bias=False)
        )
        self.quantizer = SplitResidualVectorQuantizer(
            cfg.dim, cfg.codebook_dim, cfg.max_codebooks - 1, cfg.codebook_size
        )
        self.reset()

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    # ---- state -------------------------------------------------------------------------

    def new_encoder_state(self) -> EncoderState:
        return EncoderState(
            self.encoder.init_state(),
            self.encoder_transformer.init_state(),
            self.downsample.conv.init_state(),
        )

    def new_decoder_state(self) -> DecoderState:
        return DecoderState(
            self.upsample.convtr.init_state(),
            self.decoder_transformer.init_state(),
            self.decoder.init_state(),
        )

    def reset(self) -> None:
        """Forget the streaming state of `encode_step` and `decode_step`."""
        self._encoder_state = self.new_encoder_state()
        self._decoder_state = self.new_decoder_state()

    # ---- core streaming computations (channels-last) ------------------------------------

    def encode_latent(self, pcm: mx.array, state: EncoderState, final: bool = False) -> mx.array:
        """pcm [B, T, 1] -> pre-quantization latent [B, F, dim]. Streaming calls take whole
        frames; `final` ends a whole clip (a partial last frame is padded as officially)."""
        x = self.encoder(pcm, state.seanet, final)
        if x.shape[1] > 0:
            x = self.encoder_transformer(x, state.transformer)
        return self.downsample.conv(x, state.downsample, final)

    def _encode_chunk(self, pcm: mx.array, state: EncoderState, final: bool = False) -> mx.array:
        latent = self.encode_latent(pcm, state, final)
        return self.quantizer.encode(latent, self.num_codebooks)

    def _decode_chunk(self, codes: mx.array, state: DecoderState) -> mx.array:
        x = self.quantizer.decode(codes)
        x = self.upsample.convtr(x, state.upsample)
        x = self.decoder_transformer(x, state.transformer)
        return self.decoder(x, state.seanet)  # [B, T, 1]

    # ---- public API -----------------------------------------------------------------------

    def encode_step(self, pcm) -> mx.array:
        """One or more whole frames [B, 1, n * 1920] -> codes int32 [B, K, n] (streaming)."""
        x = self._check_pcm(pcm, streaming=True)
        codes = self._encode_chunk(x, self._encoder_state)
        mx.eval(codes)
        return codes

    def decode_step(self, codes) -> mx.array:
        """Codes [B, K, n] -> pcm [B, 1, n * 1920] (streaming)."""
        c = self._check_codes(codes)
        pcm = self._decode_chunk(c, self._decoder_state).transpose(0, 2, 1)
        mx.eval(pcm)
        return pcm

    def encode(self, pcm) -> mx.array:
        """Whole clip [B, 1, T] (or [B, T] / [T]) -> codes int32 [B, K, ceil(T / 1920)].

        The streaming path run over the clip in chunks of `cfg.chunk_frames` frames with a
        fresh state; the last chunk ends the stream like the official whole-clip padding.
        """
        x = self._check_pcm(pcm, streaming=False)
        state = self.new_encoder_state()
        chunk = self.cfg.chunk_frames * self.cfg.frame_size
        starts = list(range(0, x.shape[1], chunk))
        parts = []
        for start in starts:
            final = start == starts[-1]
            part = self._encode_chunk(x[:, start : start + chunk], state, final=final)
            mx.eval(part)
            parts.append(part)
        return mx.concatenate(parts, axis=2)

    def decode(self, codes) -> mx.array:
        """Codes [B, K, F] -> pcm [B, 1, F * 1920], the streaming path over chunks."""
        c = self._check_codes(codes)
        state = self.new_decoder_state()
        parts = []
        for start in range(0, c.shape[2], self.cfg.chunk_frames):
            part = self._decode_chunk(c[:, :, start : start + self.cfg.chunk_frames], state)
            mx.eval(part)
            parts.append(part)
        return mx.concatenate(parts, axis=1).transpose(0, 2, 1)

    # ---- input checks -------------------------------------------------------------------

    def _check_pcm(self, pcm, streaming: bool) -> mx.array:
        """-> [B, T, 1] in the weights' dtype (T a multiple of the frame size when streaming)."""
        if isinstance(pcm, mx.array):
            arr = pcm.astype(mx.float32)
            finite = bool(mx.all(mx.isfinite(arr)).item()) if arr.size else True
        else:
            host = np.asarray(pcm, dtype=np.float32)
            finite = bool(np.isfinite(host).all())
            arr = mx.array(host)
        arr = arr.astype(self.encoder.model[0].conv.conv.weight.dtype)
        if arr.ndim == 1:
            arr = arr[None, None]
        elif arr.ndim == 2:
            arr = arr[:, None]
        if arr.ndim != 3 or arr.shape[1] != 1:
            raise AudioError(f"expected mono audio [B, 1, T], got shape {tuple(arr.shape)}")
        if arr.shape[2] == 0:
            raise AudioError("the audio holds no samples")
        if not finite:
            raise AudioError("the audio holds NaN or infinite samples")
        frame = self.cfg.frame_size
        if streaming and arr.shape[2] % frame:
            raise AudioError(
                f"encode_step takes whole frames of {frame} samples, got {arr.shape[2]}"
            )
        return arr.transpose(0, 2, 1)

    def _check_codes(self, codes) -> mx.array:
        c = codes if isinstance(codes, mx.array) else mx.array(np.asarray(codes))
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or c.shape[2] == 0:
            raise ValueError(f"expected codes [B, K, frames], got shape {tuple(c.shape)}")
        if not 1 <= c.shape[1] <= self.cfg.max_codebooks:
            raise ValueError(f"codes have {c.shape[1]} codebooks, at most {self.cfg.max_codebooks}")
        c = c.astype(mx.int32)
        low, high = mx.min(c).item(), mx.max(c).item()
        if low < 0 or high >= self.cfg.codebook_size:
            raise ValueError(f"codes must be in 0..{self.cfg.codebook_size - 1}, got {low}..{high}")
        return c


# ---- loading ----------------------------------------------------------------------------


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


def sanitize(weights: dict[str, mx.array], cfg: MimiConfig | None = None) -> dict[str, mx.array]:
    """Tensors of the official layout or the transformers one (`MimiModel`, kyutai/mimi;
    recognised by its keys) -> ours."""
    if any(_TRANSFORMERS_KEY.match(key) for key in weights):
        weights = transformers_to_official(weights, cfg or MimiConfig())
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


def _interleaved_rope_rows(tensor: mx.array, num_heads: int, key: str) -> mx.array:
    """Undo transformers' q/k row permutation (its RoPE rotates the two halves of a head, ours
    adjacent pairs)."""
    rows, cols = tensor.shape[0], tensor.shape[-1]
    if tensor.ndim != 2 or rows % (2 * num_heads):
        raise WeightsError(f"tensor {key} of shape {tuple(tensor.shape)} does not hold "
                           f"{num_heads} heads (transformers Mimi layout)")
    half = rows // num_heads // 2
    return tensor.reshape(num_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def transformers_to_official(weights: dict[str, mx.array], cfg: MimiConfig
                             ) -> dict[str, mx.array]:
    """transformers `MimiModel` names/layout -> the official PyTorch checkpoint's: conv names,
    split codebook halves, q/k/v projections fused back into in_proj (q and k rows put back in
    the interleaved-RoPE order)."""
    from moshi_mlx.models.layouts import FragmentJoiner, fragment_name

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
                    value = _interleaved_rope_rows(value, cfg.num_heads, key)
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


def config_from_transformers(data: dict, source: str = "config") -> MimiConfig:
    """A transformers `MimiConfig` config.json (kyutai/mimi, or a Moshi config's
    `audio_encoder_config`) -> ours; what our Mimi does not implement is a one-line error."""

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
    return MimiConfig(
        sample_rate=sample_rate, frame_size=frame_size, seanet=seanet, dim=dim, num_heads=heads,
        num_layers=int(get("num_hidden_layers", 8)),
        dim_feedforward=int(get("intermediate_size", 2048)),
        context=int(get("sliding_window", 250)),
        rope_max_period=float(rope.get("rope_theta", get("rope_theta", 10000.0))),
        norm_eps=float(get("norm_eps", 1e-5)), codebook_size=int(get("codebook_size", 2048)),
        codebook_dim=int(get("codebook_dim", 256)), max_codebooks=max_codebooks,
        num_codebooks=min(8, max_codebooks),
    )


# ---- loading ------------------------------------------------------------------------------

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


# The family interface of `moshi_mlx.loading` (load_mimi reads the weights; never quantized).
Config = MimiConfig
Model = Mimi
DESCRIPTION = "Mimi"
STORED_DTYPE = None
FILES = {"mimi": dict(name="Mimi", commands=("moshi_mlx.mimi",),
                      repos={"mimi": {None: "kyutai/moshiko-pytorch-bf16"}},
                      weights={None: "tokenizer-e351c8d8-checkpoint125.safetensors"},
                      layouts={"official": ("encoder.model.", "quantizer.rvq_first."),
                               "transformers": ("encoder.layers.", "encoder_transformer.layers.")},
                      bundled_prefixes=(BUNDLED_PREFIX, STT_BUNDLED_PREFIX))}


def quant_predicate(path: str, module: nn.Module) -> bool:
    return False


def _layout_hint(keys) -> str:
    for marker, what in _OTHER_LAYOUTS:
        if any(marker in key for key in keys):
            return f"; it holds {what}"
    return ""


def _mimi_config(config_path, source: str) -> tuple[MimiConfig | None, str]:
    """The MimiConfig a transformers config.json describes (and the tensor prefix of the Mimi
    bundled in a Moshi or STT file), or None for any other config (official LM configs)."""
    from moshi_mlx.loading.config import read_config_json

    if config_path is None:
        return None, ""
    data = read_config_json(config_path)
    if data.get("model_type") == "mimi":
        return config_from_transformers(data, str(config_path)), ""
    key, prefix = _BUNDLING_CONFIGS.get(data.get("model_type"), (None, ""))
    if key is not None and isinstance(data.get(key), dict):
        return config_from_transformers(data[key], f"{config_path} {key}"), prefix
    if isinstance(data.get("codec_config"), dict):  # CSM's, and weights_convert folders'
        return config_from_transformers(data["codec_config"], f"{config_path} codec_config"), ""
    return None, ""


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
    from moshi_mlx.loading.hub import mimi_files
    from moshi_mlx.loading.safetensors import read_safetensors

    files, config_path = mimi_files(path_or_repo)
    shown = files[0] if len(files) == 1 else files[0].parent
    found, prefix = _mimi_config(config_path, str(shown))
    cfg = cfg or found or MimiConfig()
    if not 1 <= num_codebooks <= cfg.max_codebooks:
        raise WeightsError(f"num_codebooks must be in 1..{cfg.max_codebooks}, got {num_codebooks}")
    cfg = dataclasses.replace(cfg, num_codebooks=num_codebooks)
    raw: dict[str, mx.array] = {}
    for path in files:
        raw.update(read_safetensors(path))
    if not prefix:
        prefix = next((p for p in (BUNDLED_PREFIX, STT_BUNDLED_PREFIX)
                       if any(key.startswith(p) for key in raw)), "")
    if prefix:
        raw = {key[len(prefix):]: value for key, value in raw.items()
               if key.startswith(prefix)}
    try:
        weights = sanitize(raw, cfg)
    except WeightsError as exc:
        raise WeightsError(f"{shown}: {exc}") from None
    model = Mimi(cfg)
    expected = dict(_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise WeightsError(
            f"{shown}: not a Mimi checkpoint ({len(missing)} expected tensors missing, "
            f"e.g. {missing[0]}){_layout_hint(raw)}"
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


def _flatten(tree) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)
