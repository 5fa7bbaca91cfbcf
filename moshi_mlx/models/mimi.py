"""Mimi, Kyutai's streaming neural audio codec: 24 kHz audio <-> 12.5 Hz frames of codes.

encode: SEANet encoder (hop 960, 25 Hz) -> 8-layer causal transformer -> learnt stride-2
        downsample (12.5 Hz) -> split residual VQ (1 semantic + acoustic codebooks)
decode: codebook sum -> depthwise stride-2 transposed-conv upsample -> transformer -> SEANet
        decoder.
Everything is causal and streaming. The model holds only weights: every stream's state is an
explicit `EncoderState` / `DecoderState` passed to `encode_step` / `decode_step`, so one loaded
Mimi serves any number of streams (`MimiStream` holds the two states of one stream). A whole
clip is encoded/decoded by running the same streaming path over it in chunks, with a fresh state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import AudioError
from moshi_mlx.models import mimi_layouts
from moshi_mlx.modules.cache import SlotCache, WindowCache
from moshi_mlx.modules.conv import DEFAULT_FORMULATION, ConvState, ConvTrState, RowConvState
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
    conv_formulation: str = DEFAULT_FORMULATION  # how the convs compute: "matmul" or "native"

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def downsample_stride(self) -> int:
        return self.frame_size // self.seanet.hop_length

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> MimiConfig:
        """From a transformers Mimi config.json, the one config file form Mimi has."""
        return cls(**mimi_layouts.config_from_transformers(data, source))

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
class RowEncoderState(EncoderState):
    """An encoder state of `rows` independent streams, one per batch row (batched STT): each
    row starts again (`reset_rows`) and pauses (`set_active`) without touching the others."""

    rows: int = 1

    def _parts(self) -> list:
        return [*_flatten(self.seanet), *self.transformer, self.downsample]

    def reset_rows(self, rows) -> None:
        for part in self._parts():
            part.reset_rows(rows)

    def set_active(self, mask) -> None:
        """Rows that the next `encode_step` advances (bool [rows]); the others keep their state
        exactly (their codes of that call are meaningless)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.rows,):
            raise ValueError(f"the active mask must have {self.rows} rows, got {mask.shape}")
        for part in self._parts():
            if isinstance(part, SlotCache):
                part.set_active(mask)
            else:
                part.active = mask.copy()


def _flatten(states) -> list:
    """The conv states in a nested SEANet state list (ELUs hold None)."""
    if isinstance(states, list):
        return [leaf for item in states for leaf in _flatten(item)]
    return [] if states is None else [states]


def _per_row(states, rows: int):
    """The SEANet state list with every ConvState replaced by a fresh RowConvState."""
    if isinstance(states, list):
        return [_per_row(item, rows) for item in states]
    return RowConvState(rows) if isinstance(states, ConvState) else states


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
        formulation = cfg.conv_formulation
        self.encoder = SeanetEncoder(cfg.seanet, formulation)
        self.decoder = SeanetDecoder(cfg.seanet, formulation)
        self.encoder_transformer = MimiTransformer(cfg)
        self.decoder_transformer = MimiTransformer(cfg)
        self.downsample = _Wrap(
            conv=ConvLayer(cfg.dim, cfg.dim, 2 * stride, stride=stride, bias=False,
                           pad_mode="replicate", formulation=formulation)
        )
        self.upsample = _Wrap(
            convtr=ConvTrLayer(cfg.dim, cfg.dim, 2 * stride, stride, groups=cfg.dim, bias=False,
                               formulation=formulation)
        )
        self.quantizer = SplitResidualVectorQuantizer(
            cfg.dim, cfg.codebook_dim, cfg.max_codebooks - 1, cfg.codebook_size
        )

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

    def new_row_encoder_state(self, rows: int) -> RowEncoderState:
        """An encoder state of `rows` independent streams stepped together: `encode_step` on
        [rows, 1, n * 1920] advances the active rows only (see `RowEncoderState`)."""
        steps = self.cfg.downsample_stride  # transformer steps per frame
        return RowEncoderState(
            _per_row(self.encoder.init_state(), rows),
            [SlotCache(self.cfg.context, rows, max_steps=steps)
             for _ in self.encoder_transformer.transformer.layers],
            RowConvState(rows),
            rows,
        )

    def new_decoder_state(self) -> DecoderState:
        return DecoderState(
            self.upsample.convtr.init_state(),
            self.decoder_transformer.init_state(),
            self.decoder.init_state(),
        )

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

    def encode_step(self, pcm, state: EncoderState) -> mx.array:
        """One or more whole frames [B, 1, n * 1920] -> codes int32 [B, K, n], continuing the
        stream of `state` (from `new_encoder_state()`; updated in place)."""
        if not isinstance(state, EncoderState):
            raise TypeError(f"encode_step needs an EncoderState, got {type(state).__name__}")
        x = self._check_pcm(pcm, streaming=True)
        codes = self._encode_chunk(x, state)
        mx.eval(codes)
        return codes

    def decode_step(self, codes, state: DecoderState) -> mx.array:
        """Codes [B, K, n] -> pcm [B, 1, n * 1920], continuing the stream of `state` (from
        `new_decoder_state()`; updated in place)."""
        if not isinstance(state, DecoderState):
            raise TypeError(f"decode_step needs a DecoderState, got {type(state).__name__}")
        c = self._check_codes(codes)
        pcm = self._decode_chunk(c, state).transpose(0, 2, 1)
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


class MimiStream:
    """One audio stream through a shared Mimi: its encoder and decoder states, for callers that
    run a single stream (`encode_step` / `decode_step` as on the model, without the state)."""

    def __init__(self, mimi: Mimi) -> None:
        self.mimi = mimi
        self.reset()

    @property
    def num_codebooks(self) -> int:
        return self.mimi.num_codebooks

    def reset(self) -> None:
        """Start the stream again (fresh encoder and decoder states)."""
        self.encoder_state = self.mimi.new_encoder_state()
        self.decoder_state = self.mimi.new_decoder_state()

    def encode_step(self, pcm) -> mx.array:
        """Whole frames [B, 1, n * 1920] -> codes int32 [B, K, n] (see `Mimi.encode_step`)."""
        return self.mimi.encode_step(pcm, self.encoder_state)

    def decode_step(self, codes) -> mx.array:
        """Codes [B, K, n] -> pcm [B, 1, n * 1920] (see `Mimi.decode_step`)."""
        return self.mimi.decode_step(codes, self.decoder_state)


# ---- weights ----------------------------------------------------------------------------


def sanitize(weights: dict[str, mx.array], cfg: MimiConfig | None = None) -> dict[str, mx.array]:
    """Tensors of the official or the transformers layout -> ours (see `mimi_layouts`)."""
    return mimi_layouts.sanitize(weights, cfg or MimiConfig())


# ---- the family interface of `moshi_mlx.loading` (load_mimi reads the weights; never quantized)

Config = MimiConfig
Model = Mimi
DESCRIPTION = "Mimi"
STORED_DTYPE = None
FILES = {"mimi": dict(name="Mimi", commands=("moshi_mlx.mimi",),
                      repos={"mimi": {None: "kyutai/moshiko-pytorch-bf16"}},
                      weights={None: "tokenizer-e351c8d8-checkpoint125.safetensors"},
                      layouts={"official": ("encoder.model.", "quantizer.rvq_first."),
                               "transformers": ("encoder.layers.", "encoder_transformer.layers.")},
                      bundled_prefixes=(mimi_layouts.BUNDLED_PREFIX,
                                        mimi_layouts.STT_BUNDLED_PREFIX))}


def quant_predicate(path: str, module: nn.Module) -> bool:
    return False
