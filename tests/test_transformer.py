"""Streaming attention against a plain numpy re-derivation (RoPE, context window, KV ring)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from references import numpy_rope

from moshi_mlx.modules.transformer import Attention, KVCache, rope

MAX_PERIOD = 10000.0


def numpy_attention(attn: Attention, x: np.ndarray, context: int) -> np.ndarray:
    """Whole-sequence reference: query p attends to keys s with 0 <= p - s < context."""
    w_in = np.array(attn.in_proj.weight, dtype=np.float64)
    w_out = np.array(attn.out_proj.weight, dtype=np.float64)
    batch, steps, dim = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = (x.astype(np.float64) @ w_in.T).reshape(batch, steps, 3, heads, head_dim)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    positions = np.arange(steps)
    q, k = numpy_rope(q, positions, MAX_PERIOD), numpy_rope(k, positions, MAX_PERIOD)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    delta = positions[:, None] - positions[None, :]
    scores = np.where((delta >= 0) & (delta < context), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, steps, dim)
    return out @ w_out.T


def run_in_chunks(attn: Attention, x: np.ndarray, context: int, chunks: list[int],
                  grow_step: int = 256) -> np.ndarray:
    cache = KVCache(context, grow_step)
    outputs, start = [], 0
    for size in chunks:
        outputs.append(np.array(attn(mx.array(x[:, start : start + size]), cache)))
        start += size
    assert start == x.shape[1] and cache.offset == start
    return np.concatenate(outputs, axis=1)


def test_rope_matches_interleaved_reference() -> None:
    x = np.random.default_rng(0).standard_normal((1, 2, 7, 16)).astype(np.float32)
    got = np.array(rope(mx.array(x), 5, MAX_PERIOD))
    np.testing.assert_allclose(got, numpy_rope(x, np.arange(5, 12), MAX_PERIOD), atol=2e-5)


@pytest.mark.parametrize(
    "context, chunks",
    [
        (6, [1] * 20),  # single steps, ring wraps several times
        (6, [2] * 10),  # Mimi-style two steps per call
        (6, [20]),  # whole sequence longer than the context in one call
        (5, [3, 1, 7, 2, 1, 6]),  # mixed chunk sizes, wrap inside a chunk
        (32, [1] * 4 + [16]),  # never full
    ],
)
@pytest.mark.parametrize("grow_step", [1, 4, 256])  # buffer grows while the ring fills
def test_streaming_attention_matches_reference(context: int, chunks: list[int],
                                               grow_step: int) -> None:
    mx.random.seed(1)
    attn = Attention(dim=32, num_heads=4, rope_max_period=MAX_PERIOD)
    x = np.random.default_rng(2).standard_normal((2, sum(chunks), 32)).astype(np.float32)
    expected = numpy_attention(attn, x, context)
    got = run_in_chunks(attn, x, context, chunks, grow_step)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_cache_grows_in_steps_up_to_the_context() -> None:
    attn = Attention(dim=16, num_heads=2, rope_max_period=MAX_PERIOD)
    cache = KVCache(10, grow_step=4)
    lengths = []
    for _ in range(14):
        attn(mx.zeros((1, 1, 16)), cache)
        lengths.append(cache.keys.shape[2])
    assert lengths == [4] * 4 + [8] * 4 + [10] * 6
    cache.reset()
    attn(mx.zeros((1, 7, 16)), cache)  # one call past a step boundary reserves at once
    assert cache.keys.shape[2] == 8


def test_cache_memory_is_constant_past_context() -> None:
    attn = Attention(dim=16, num_heads=2, rope_max_period=MAX_PERIOD)
    cache = KVCache(4)
    x = mx.zeros((1, 1, 16))
    for _ in range(13):
        attn(x, cache)
    assert cache.keys.shape == (1, 2, 4, 8) and cache.offset == 13
    cache.reset()
    assert cache.offset == 0 and cache.keys is None


def test_context_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KVCache(0)
