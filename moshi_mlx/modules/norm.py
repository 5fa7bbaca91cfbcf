"""RMS normalisation with a learnt gain (Moshi's and Llama's, one module)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class RmsNorm(nn.Module):
    """RMSNorm with a learnt gain `weight`; `in_float32` computes it in float32 whatever the
    input dtype (the official Moshi `rms_norm_f32`), the result cast back."""

    def __init__(self, dim: int, eps: float, in_float32: bool = False) -> None:
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps
        self.in_float32 = in_float32

    def __call__(self, x: mx.array) -> mx.array:
        if self.in_float32 and x.dtype != mx.float32:
            y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
            return y.astype(x.dtype)
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)
