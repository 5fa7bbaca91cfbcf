"""Streaming multi-head self-attention: the one attention of Mimi and the Kyutai LMs.

Keys are cached after RoPE (absolute positions) in any cache of `moshi_mlx.modules.cache`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from moshi_mlx.modules.cache import AttentionCache, KVCache, SlotCache, WindowCache

__all__ = ["Attention", "AttentionCache", "KVCache", "SlotCache", "WindowCache", "rope"]


def rope(x: mx.array, offset: int | mx.array, max_period: float) -> mx.array:
    """Interleaved rotary embedding of x [..., T, D] at positions offset .. offset+T-1."""
    return mx.fast.rope(
        x, x.shape[-1], traditional=True, base=max_period, scale=1.0, offset=offset
    )


class Attention(nn.Module):
    """Multi-head self-attention with a fused q,k,v projection and no biases."""

    def __init__(self, dim: int, num_heads: int, rope_max_period: float | None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.rope_max_period = rope_max_period
        self.in_proj = nn.Linear(dim, 3 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array, cache: AttentionCache) -> mx.array:
        batch, steps, dim = x.shape
        qkv = self.in_proj(x).reshape(batch, steps, 3, self.num_heads, self.head_dim)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # [3, B, H, T, D]
        qk, v = qkv[:2], qkv[2]
        offset = cache.offset
        if self.rope_max_period is not None and isinstance(offset, mx.array):
            # Per-row positions: rope takes an offset [B] only with B as the leading axis.
            qk = (rope(qk[0], offset, self.rope_max_period),
                  rope(qk[1], offset, self.rope_max_period))
        elif self.rope_max_period is not None:
            qk = rope(qk, offset, self.rope_max_period)  # q and k in one op
        keys, values, mask = cache.update(qk[1], v)
        out = mx.fast.scaled_dot_product_attention(
            qk[0], keys, values, scale=self.head_dim**-0.5, mask=mask
        )
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, steps, dim))
