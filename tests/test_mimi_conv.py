"""Streaming causal convs against a direct numpy evaluation of the official whole-clip
definition (left pad kernel - stride, right pad to a whole window; transposed: full output with
the last kernel - stride samples trimmed), fed in uneven chunks, in both formulations."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.modules.conv import FORMULATIONS, StreamingConv1d, StreamingConvTranspose1d


def _numpy_causal_conv(x, weight, bias, stride, dilation, replicate):
    """x [T, in], weight [out, in, k] (PyTorch layout) -> [ceil(T / stride), out]."""
    out_ch, _, k = weight.shape
    span = (k - 1) * dilation + 1
    left = span - stride
    frames = -(-x.shape[0] // stride)
    right = frames * stride - x.shape[0]  # up to a whole last window
    pad_left = np.repeat(x[:1], left, 0) if replicate else np.zeros((left, x.shape[1]))
    pad_right = np.repeat(x[-1:], right, 0) if replicate else np.zeros((right, x.shape[1]))
    padded = np.concatenate([pad_left, x, pad_right])
    y = np.zeros((frames, out_ch))
    for t in range(frames):
        for j in range(k):
            y[t] += weight[:, :, j] @ padded[t * stride + j * dilation]
    return y + bias


def _numpy_causal_convtr(x, weight, bias, stride):
    """x [T, in], weight [in, out, k] (PyTorch layout) -> [T * stride, out]."""
    _, out_ch, k = weight.shape
    full = np.zeros(((x.shape[0] - 1) * stride + k, out_ch))
    for t in range(x.shape[0]):
        for j in range(k):
            full[t * stride + j] += x[t] @ weight[:, :, j]
    return full[: x.shape[0] * stride] + bias


def _chunks(total: int, rng: np.random.Generator, multiple: int) -> list[int]:
    sizes, left = [], total
    while left > 0:
        size = min(left, multiple * int(rng.integers(0, 4)))
        sizes.append(size)
        left -= size
    return sizes


@pytest.fixture(params=FORMULATIONS)
def formulation(request):
    return request.param


@pytest.mark.parametrize(
    "in_ch, out_ch, k, stride, dilation, replicate",
    [(1, 8, 7, 1, 1, False), (6, 4, 3, 1, 2, False), (4, 6, 1, 1, 1, False),
     (4, 6, 8, 4, 1, False), (5, 3, 10, 5, 1, False), (6, 6, 4, 2, 1, True)],
)
def test_streaming_conv_matches_numpy(formulation, in_ch, out_ch, k, stride, dilation, replicate):
    rng = np.random.default_rng(k * 7 + stride)
    weight = rng.standard_normal((out_ch, in_ch, k))
    bias = rng.standard_normal(out_ch)
    total = 13 * stride + stride // 2 + 1  # ends mid-window: exercises the final padding
    x = rng.standard_normal((total, in_ch))
    layer = StreamingConv1d(in_ch, out_ch, k, stride=stride, dilation=dilation,
                            pad_mode="replicate" if replicate else "constant",
                            formulation=formulation)
    layer.weight = mx.array(weight.transpose(0, 2, 1).astype(np.float32))
    layer.bias = mx.array(bias.astype(np.float32))
    state = layer.init_state()
    outputs, start = [], 0
    sizes = _chunks(total, rng, stride)
    for i, size in enumerate(sizes):
        chunk = mx.array(x[None, start : start + size].astype(np.float32))
        outputs.append(np.asarray(layer(chunk, state, final=i == len(sizes) - 1))[0])
        start += size
    got = np.concatenate(outputs)
    expected = _numpy_causal_conv(x, weight, bias, stride, dilation, replicate)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("in_ch, out_ch, k, stride, depthwise",
                         [(6, 4, 16, 8, False), (4, 3, 10, 5, False), (5, 5, 4, 2, True),
                          (3, 2, 5, 2, False)])
def test_streaming_convtr_matches_numpy(formulation, in_ch, out_ch, k, stride, depthwise):
    rng = np.random.default_rng(k + stride)
    if depthwise:
        taps = rng.standard_normal((in_ch, 1, k))
        weight = np.zeros((in_ch, out_ch, k))
        weight[np.arange(in_ch), np.arange(in_ch)] = taps[:, 0]
    else:
        weight = rng.standard_normal((in_ch, out_ch, k))
    bias = rng.standard_normal(out_ch)
    x = rng.standard_normal((11, in_ch))
    layer = StreamingConvTranspose1d(in_ch, out_ch, k, stride, groups=in_ch if depthwise else 1,
                                     formulation=formulation)
    mlx_weight = taps.transpose(0, 2, 1) if depthwise else weight.transpose(1, 2, 0)
    layer.weight = mx.array(mlx_weight.astype(np.float32))
    layer.bias = mx.array(bias.astype(np.float32))
    state = layer.init_state()
    outputs, start = [], 0
    for size in (3, 0, 1, 5, 2):
        outputs.append(np.asarray(layer(mx.array(x[None, start : start + size]
                                                  .astype(np.float32)), state))[0])
        start += size
    got = np.concatenate(outputs)
    expected = _numpy_causal_convtr(x, weight, bias, stride)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_mimi_builds_every_conv_with_its_formulation():
    from moshi_mlx.models.mimi import Mimi, MimiConfig

    for name in FORMULATIONS:
        convs = [m for _, m in Mimi(MimiConfig(conv_formulation=name)).named_modules()
                 if isinstance(m, (StreamingConv1d, StreamingConvTranspose1d))]
        assert len(convs) == 30  # 14 per SEANet side (4 stages of 3), down- and upsample
        assert {c.formulation for c in convs} == {name}
    with pytest.raises(ValueError, match="conv formulation"):
        StreamingConv1d(2, 2, 3, formulation="fft")
