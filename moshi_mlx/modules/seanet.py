"""Causal SEANet encoder and decoder (Mimi's convolutional front and back end).

Layer lists follow the official `model.{i}` numbering so checkpoint keys map one to one:
encoder  conv, [resblock, ELU, down-conv] x 4, ELU, conv;
decoder  conv, [ELU, up-convtr, resblock] x 4, ELU, conv.
A residual block is ELU, conv k=3 (C -> C/compress), ELU, conv k=1 (back to C), plus the input
(true skip: identity shortcut).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.modules.conv import DEFAULT_FORMULATION, StreamingConv1d, StreamingConvTranspose1d


@dataclass
class SeanetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    residual_kernel_size: int = 3
    last_kernel_size: int = 3
    dilation_base: int = 2
    n_residual_layers: int = 1
    compress: int = 2

    @property
    def hop_length(self) -> int:
        hop = 1
        for ratio in self.ratios:
            hop *= ratio
        return hop


def elu(x: mx.array) -> mx.array:
    """ELU (alpha 1): x where x > 0, else exp(x) - 1.

    On the CPU the exponential is computed by numpy: MLX's CPU exp is scalar code, ~35x slower
    than numpy's vectorised one, and SEANet's ELUs over 1920 x 64 activations dominated the
    per-frame time. max(x, 0) + (exp(min(x, 0)) - 1) equals the usual where-form exactly
    (exp(0) - 1 == 0). Elsewhere (GPU, bfloat16) MLX's own ELU keeps the graph lazy.
    """
    if x.dtype != mx.float32 or mx.default_device() != mx.cpu:
        return nn.elu(x)
    host = np.asarray(x)  # evaluates x; a view of its buffer, not a copy
    y = np.exp(np.minimum(host, 0.0))
    y -= 1.0
    y += np.maximum(host, 0.0)
    return mx.array(y)


class _Conv(nn.Module):
    """Wrapper giving the official `conv.conv.weight` key nesting."""

    def __init__(self, conv: StreamingConv1d) -> None:
        super().__init__()
        self.conv = conv


class _ConvTr(nn.Module):
    """Wrapper giving the official `convtr.convtr.weight` key nesting."""

    def __init__(self, convtr: StreamingConvTranspose1d) -> None:
        super().__init__()
        self.convtr = convtr


class ConvLayer(nn.Module):
    """A causal conv stored under `<i>.conv.conv.*`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.conv = _Conv(StreamingConv1d(*args, **kwargs))

    def init_state(self):
        return self.conv.conv.init_state()

    def __call__(self, x: mx.array, state, final: bool = False) -> mx.array:
        return self.conv.conv(x, state, final)


class ConvTrLayer(nn.Module):
    """A causal transposed conv stored under `<i>.convtr.convtr.*`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.convtr = _ConvTr(StreamingConvTranspose1d(*args, **kwargs))

    def init_state(self):
        return self.convtr.convtr.init_state()

    def __call__(self, x: mx.array, state, final: bool = False) -> mx.array:
        return self.convtr.convtr(x, state, final)


class _Elu(nn.Module):
    """Parameter-free ELU placeholder keeping the official layer numbering."""

    def init_state(self) -> None:
        return None

    def __call__(self, x: mx.array, state: None, final: bool = False) -> mx.array:
        return elu(x)


class ResidualBlock(nn.Module):
    """ELU -> conv(k, dilation) -> ELU -> conv(1), added to the input. Keys block.1, block.3."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, compress: int,
                 formulation: str = DEFAULT_FORMULATION) -> None:
        super().__init__()
        hidden = channels // compress
        self.block = [
            _Elu(),
            ConvLayer(channels, hidden, kernel_size, dilation=dilation, formulation=formulation),
            _Elu(),
            ConvLayer(hidden, channels, 1, formulation=formulation),
        ]

    def init_state(self) -> list:
        return [self.block[1].init_state(), self.block[3].init_state()]

    def __call__(self, x: mx.array, state: list, final: bool = False) -> mx.array:
        y = self.block[1](elu(x), state[0], final)
        y = self.block[3](elu(y), state[1], final)
        return x + y


def _residual_blocks(cfg: SeanetConfig, channels: int, formulation: str
                     ) -> list[ResidualBlock]:
    return [
        ResidualBlock(channels, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress,
                      formulation)
        for j in range(cfg.n_residual_layers)
    ]


class _Sequential(nn.Module):
    def __init__(self, layers: list) -> None:
        super().__init__()
        self.model = layers

    def init_state(self) -> list:
        return [layer.init_state() for layer in self.model]

    def __call__(self, x: mx.array, state: list, final: bool = False) -> mx.array:
        """final=True: the end of a whole clip (see StreamingConv1d)."""
        for layer, layer_state in zip(self.model, state, strict=True):
            x = layer(x, layer_state, final)
        return x


class SeanetEncoder(_Sequential):
    """[B, T, 1] audio -> [B, T / hop, dimension] latents (streaming, causal); `formulation`:
    how its convs compute (see `moshi_mlx.modules.conv`)."""

    def __init__(self, cfg: SeanetConfig, formulation: str = DEFAULT_FORMULATION) -> None:
        channels = cfg.n_filters
        layers: list = [ConvLayer(cfg.channels, channels, cfg.kernel_size,
                                  formulation=formulation)]
        for ratio in reversed(cfg.ratios):
            layers += _residual_blocks(cfg, channels, formulation)
            layers += [_Elu(), ConvLayer(channels, 2 * channels, 2 * ratio, stride=ratio,
                                         formulation=formulation)]
            channels *= 2
        layers += [_Elu(), ConvLayer(channels, cfg.dimension, cfg.last_kernel_size,
                                     formulation=formulation)]
        super().__init__(layers)


class SeanetDecoder(_Sequential):
    """[B, T, dimension] latents -> [B, T * hop, 1] audio (streaming, causal); `formulation`:
    how its convs compute (see `moshi_mlx.modules.conv`)."""

    def __init__(self, cfg: SeanetConfig, formulation: str = DEFAULT_FORMULATION) -> None:
        channels = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list = [ConvLayer(cfg.dimension, channels, cfg.kernel_size,
                                  formulation=formulation)]
        for ratio in cfg.ratios:
            layers += [_Elu(), ConvTrLayer(channels, channels // 2, 2 * ratio, ratio,
                                           formulation=formulation)]
            channels //= 2
            layers += _residual_blocks(cfg, channels, formulation)
        layers += [_Elu(), ConvLayer(channels, cfg.channels, cfg.last_kernel_size,
                                     formulation=formulation)]
        super().__init__(layers)
