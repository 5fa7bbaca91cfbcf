"""Causal 1-d convolutions that stream: every call continues where the previous one stopped.

Activations are channels-last, [B, T, C]. A streaming module keeps its carried samples in a
small state object created by `init_state()`; the module itself holds only weights, so one set
of weights can serve several independent streams (e.g. whole-clip encoding beside a live one).

Each conv is built with a `formulation`: "matmul" (the default, faster on MLX's CPU backend) or
"native" (mx.conv1d / mx.conv_transpose1d). Both give the same results to float rounding; the
choice exists so that benchmarks/mimi.py can measure them side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

FORMULATIONS = ("matmul", "native")
DEFAULT_FORMULATION = "matmul"


def check_formulation(name: str) -> str:
    if name not in FORMULATIONS:
        raise ValueError(f"unknown conv formulation {name!r} (use one of {FORMULATIONS})")
    return name


@dataclass
class ConvState:
    """Input samples not yet consumed by a causal conv (None before the first call)."""

    pending: mx.array | None = None


@dataclass
class RowConvState:
    """The carried samples of `rows` independent streams, one per batch row, each started
    again (`fresh`) and paused (not `active`) on its own. In steady state every row carries
    exactly the left padding (calls take whole strides), so the carry is one array
    [B, left_context, C]; a fresh row gets the left padding of a first call instead."""

    rows: int
    pending: mx.array | None = None
    fresh: np.ndarray = field(init=False)  # bool [B]: the next call is the row's first
    active: np.ndarray = field(init=False)  # bool [B]: rows the next call advances

    def __post_init__(self) -> None:
        self.fresh = np.ones(self.rows, dtype=bool)
        self.active = np.ones(self.rows, dtype=bool)

    def reset_rows(self, rows) -> None:
        self.fresh[rows] = True


@dataclass
class ConvTrState:
    """The overlapping tail of the last transposed-conv output, to add to the next call."""

    tail: mx.array | None = None


class StreamingConv1d(nn.Module):
    """Causal Conv1d. The left context of the first call is zeros (pad_mode "constant") or
    copies of the first sample ("replicate"); later calls use the carried input samples.

    Weights: `weight` [out, k, in // groups] (MLX layout), optional `bias` [out].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
        formulation: str = DEFAULT_FORMULATION,
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unknown pad_mode {pad_mode!r}")
        self.formulation = check_formulation(formulation)
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.pad_mode = pad_mode
        self.kernel_size = kernel_size
        self.weight = mx.zeros((out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self._cache = _WeightCache()

    @property
    def left_context(self) -> int:
        """Samples of left padding: effective kernel minus stride (official causal padding)."""
        return (self.kernel_size - 1) * self.dilation + 1 - self.stride

    def init_state(self) -> ConvState:
        return ConvState()

    def __call__(self, x: mx.array, state: ConvState, final: bool = False) -> mx.array:
        """Consume x [B, T, in]; return every output whose window is complete.

        final=True ends the stream the way a whole-clip call does at the clip's end: the input
        is padded on the right (zeros, or the last sample for "replicate") up to the next
        whole window, so the clip gives ceil(total / stride) outputs.
        """
        if isinstance(state, RowConvState):
            return self._call_rows(x, state)
        if state.pending is None:
            if x.shape[1] == 0:  # nothing yet: keep the state fresh (left padding pending)
                return mx.zeros((x.shape[0], 0, self.weight.shape[0]), dtype=x.dtype)
            pad = self.left_context
            if pad > 0:
                if self.pad_mode == "replicate":
                    left = mx.repeat(x[:, :1], pad, axis=1)
                else:
                    left = mx.zeros((x.shape[0], pad, x.shape[2]), dtype=x.dtype)
                x = mx.concatenate([left, x], axis=1)
        elif state.pending.shape[1] > 0:
            x = mx.concatenate([state.pending, x], axis=1)
        span = (self.kernel_size - 1) * self.dilation + 1
        if final and x.shape[1] > 0:
            frames = max(0, -((span - x.shape[1]) // self.stride) + 1)
            extra = (frames - 1) * self.stride + span - x.shape[1] if frames else 0
            if extra > 0:
                if self.pad_mode == "replicate":
                    right = mx.repeat(x[:, -1:], extra, axis=1)
                else:
                    right = mx.zeros((x.shape[0], extra, x.shape[2]), dtype=x.dtype)
                x = mx.concatenate([x, right], axis=1)
        frames = (x.shape[1] - span) // self.stride + 1 if x.shape[1] >= span else 0
        state.pending = x[:, frames * self.stride :]
        if frames == 0:
            return mx.zeros((x.shape[0], 0, self.weight.shape[0]), dtype=x.dtype)
        x = x[:, : (frames - 1) * self.stride + span]
        y = self._convolve(x, frames)
        if "bias" in self:
            y = y + self.bias
        return y

    def _call_rows(self, x: mx.array, state: RowConvState) -> mx.array:
        """Streaming over independent rows: x [B, T, in] with T a multiple of the stride."""
        pad = self.left_context
        if x.shape[1] % self.stride:
            raise ValueError(f"row streams take whole strides of {self.stride}, got {x.shape[1]}")
        if pad > 0:
            if self.pad_mode == "replicate":
                start = mx.repeat(x[:, :1], pad, axis=1)
            else:
                start = mx.zeros((x.shape[0], pad, x.shape[2]), dtype=x.dtype)
            left = start if state.pending is None else mx.where(
                mx.array(state.fresh)[:, None, None], start, state.pending)
            x = mx.concatenate([left, x], axis=1)
        span = (self.kernel_size - 1) * self.dilation + 1
        frames = (x.shape[1] - span) // self.stride + 1 if x.shape[1] >= span else 0
        carry = x[:, frames * self.stride:]
        if state.pending is not None and not state.active.all():
            carry = mx.where(mx.array(state.active)[:, None, None], carry, state.pending)
        state.pending = carry
        state.fresh &= ~state.active
        if frames == 0:
            return mx.zeros((x.shape[0], 0, self.weight.shape[0]), dtype=x.dtype)
        y = self._convolve(x[:, : (frames - 1) * self.stride + span], frames)
        if "bias" in self:
            y = y + self.bias
        return y

    def _matrices(self) -> tuple[mx.array, ...]:
        """Weight rearranged for the matmul formulations, cached until the weight changes.

        Every matrix is stored row-major [in, out] here: MLX hands a strided view to BLAS only
        when it is exactly row- or column-major (it would copy the weight on every call), and
        a reference BLAS (the Linux wheel's) runs x @ W ~1.5x faster than x @ W.T.
        """
        if self._cache.key is not self.weight:
            out, k, inp = self.weight.shape
            if k == 2 * self.stride:  # [s*in, 2*out]: first-half taps, then second-half taps
                halves = self.weight.reshape(out, 2, self.stride * inp)
                both = mx.concatenate([halves[:, 0], halves[:, 1]], axis=0)
                mats = (mx.contiguous(both.T),)
            else:
                # [k*in, out] (row j*in + i is tap j, input i), then per tap [in, out] each
                stacked = mx.contiguous(self.weight.reshape(out, k * inp).T)
                taps = mx.contiguous(self.weight.transpose(1, 2, 0))
                mats = (stacked, *(taps[j] for j in range(k)))
            mx.eval(*mats)
            self._cache = _WeightCache(self.weight, mats)
        return self._cache.matrices

    def _convolve(self, x: mx.array, frames: int) -> mx.array:
        """Valid (unpadded) conv of x [B, (frames-1)*stride + span, in] -> [B, frames, out].

        MLX's CPU conv1d is an im2col + sgemm; the forms below skip most of that work and were
        measurably faster for Mimi's shapes (one-channel input keeps conv1d).
        """
        k, s, d = self.kernel_size, self.stride, self.dilation
        native = self.formulation == "native"
        if native or self.groups != 1 or x.shape[2] == 1 or (s != 1 and (k != 2 * s or d != 1)):
            return mx.conv1d(x, self.weight, stride=s, dilation=d, groups=self.groups)
        mats = self._matrices()
        if k == 2 * s and d == 1:
            # Window j = blocks j and j+1 of `s` samples: one matmul, then add shifted halves.
            b, _, c = x.shape
            out = self.weight.shape[0]
            blocks = x.reshape(b, frames + 1, s * c) @ mats[0]
            return blocks[:, :-1, :out] + blocks[:, 1:, out:]
        if k == 1:
            return x @ mats[1]
        if frames * k * x.shape[2] <= _IM2COL_LIMIT:
            # Few frames (streaming): the k shifted windows side by side, one matmul.
            cols = mx.concatenate([x[:, j * d : j * d + frames] for j in range(k)], axis=2)
            return cols @ mats[0]
        y = None
        for j, mat in enumerate(mats[1:]):  # many frames: sum of k shifted matmuls
            term = x[:, j * d : j * d + frames] @ mat
            y = term if y is None else y + term
        return y


# Largest im2col matrix (elements) built for a stride-1 conv; beyond it the taps are summed.
_IM2COL_LIMIT = 1 << 20


@dataclass
class _WeightCache:
    key: mx.array | None = None
    matrices: tuple[mx.array, ...] = ()


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d: each call emits stride * T samples; the last kernel - stride
    output samples only have part of their inputs yet and are carried to the next call (the
    official causal convention trims them at the right end of a whole clip).

    Weights: `weight` [out, k, in // groups] (MLX conv_transpose1d layout), optional `bias`.
    When kernel == 2 * stride (every Mimi layer) the conv is one matmul plus an overlap-add of
    two half-blocks, much faster on CPU than conv_transpose1d.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int = 1,
        bias: bool = True,
        formulation: str = DEFAULT_FORMULATION,
    ) -> None:
        super().__init__()
        self.formulation = check_formulation(formulation)
        if groups not in (1, in_channels) or (groups != 1 and in_channels != out_channels):
            raise ValueError("only groups=1 or depthwise (groups=in=out) transposed convs")
        if kernel_size < stride:
            raise ValueError("kernel_size must be >= stride")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.weight = mx.zeros((out_channels, kernel_size, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        self._cache = _WeightCache()

    def init_state(self) -> ConvTrState:
        return ConvTrState()

    def _taps(self) -> mx.array:
        """[in, k*out] (column j*out + o is weight[o, j, :]), or [k, C] when depthwise."""
        if self._cache.key is not self.weight:
            if self.groups == 1:
                taps = self.weight.transpose(2, 1, 0).reshape(self.in_channels, -1)
            else:
                taps = self.weight[:, :, 0].T
            mx.eval(taps)
            self._cache = _WeightCache(self.weight, (taps,))
        return self._cache.matrices[0]

    def _full_output(self, x: mx.array) -> mx.array:
        """Untrimmed, bias-free output [B, (T-1)*stride + kernel, out] of input [B, T, in]."""
        b, t, _ = x.shape
        k, s = self.kernel_size, self.stride
        if k != 2 * s or self.formulation == "native":
            return mx.conv_transpose1d(x, self.weight, stride=s, groups=self.groups)
        taps = self._taps()
        if self.groups == 1:
            blocks = (x @ taps).reshape(b, t, 2, s, self.out_channels)
        else:
            blocks = (x[:, :, None, :] * taps[None, None]).reshape(b, t, 2, s, self.out_channels)
        first, second = blocks[:, :, 0], blocks[:, :, 1]  # [B, T, s, out] each
        zero = mx.zeros((b, 1, s, self.out_channels), dtype=x.dtype)
        body = first + mx.concatenate([zero, second[:, :-1]], axis=1)
        out = mx.concatenate([body, second[:, -1:]], axis=1)
        return out.reshape(b, (t + 1) * s, self.out_channels)

    def __call__(self, x: mx.array, state: ConvTrState, final: bool = False) -> mx.array:
        steps = x.shape[1]
        if steps == 0:
            return mx.zeros((x.shape[0], 0, self.out_channels), dtype=x.dtype)
        y = self._full_output(x)
        overlap = self.kernel_size - self.stride
        if state.tail is not None and overlap > 0:
            y = mx.concatenate([y[:, :overlap] + state.tail, y[:, overlap:]], axis=1)
        emitted = steps * self.stride
        state.tail = y[:, emitted:]
        y = y[:, :emitted]
        if "bias" in self:
            y = y + self.bias
        return y
