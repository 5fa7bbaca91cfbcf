"""Key/value caches of streaming attention, behind one contract (`AttentionCache`):

- `offset`: the absolute position of the next step (RoPE reads it before `update`);
- `update(k, v)`: store k, v [B, H, T, D] for positions offset .. offset+T-1, advance the
  offset, and return (keys, values, mask) to attend with: mask bool [T, S] (True = may attend)
  or None when every query may see every returned key;
- `reset()`: forget everything.

A query at position p sees key position s iff 0 <= p - s < context, in both caches.
`KVCache` is a ring buffer for one step at a time (the LMs); `WindowCache` keeps the window in
position order for a few steps at a time (Mimi's transformers).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

import mlx.core as mx
import numpy as np


class AttentionCache(Protocol):
    offset: int

    def update(self, k: mx.array, v: mx.array
               ) -> tuple[mx.array, mx.array, mx.array | None]: ...

    def reset(self) -> None: ...


class KVCache:
    """Keys/values of the last `context` steps of one attention layer (ring buffer).

    A query at position p sees key position s iff 0 <= p - s < context. Position p lives in
    slot p % context. The buffer grows `grow_step` slots at a time up to `context`, so a short
    conversation never pays for the whole window (3000 steps of a 7B model in float32 are
    3 GB); once full it stays that size.
    """

    def __init__(self, context: int, grow_step: int = 256) -> None:
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        if grow_step < 1:
            raise ValueError(f"grow_step must be >= 1, got {grow_step}")
        self.context = context
        self.grow_step = grow_step
        self.reset()

    def reset(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def rewind(self, offset: int) -> None:
        """Forget positions >= offset, so the next update writes position `offset` (possible
        only while the ring has not wrapped: every position 0 .. offset-1 is still held)."""
        if not 0 <= offset <= self.offset or self.offset > self.context:
            raise ValueError(f"cannot rewind a cache at position {self.offset} (context "
                             f"{self.context}) to {offset}")
        self.offset = offset

    def update(
        self, k: mx.array, v: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """Store k, v [B, H, T, D] (positions offset .. offset+T-1) and advance the offset.

        Returns (keys, values, mask) to attend with: mask is bool [T, S] (True = may attend),
        or None when every query may see every returned key.
        """
        steps = k.shape[2]
        if steps == 1:
            self._store(k, v)
            self.offset += 1
            if self.offset <= self.context:  # slots 0 .. offset-1 hold positions in order
                return self.keys[:, :, : self.offset], self.values[:, :, : self.offset], None
            return self.keys, self.values, None

        old_keys, old_values, old_positions = self._visible()
        query_positions = np.arange(self.offset, self.offset + steps)
        if old_keys is None:
            keys, values, key_positions = k, v, query_positions
        else:
            keys = mx.concatenate([old_keys, k], axis=2)
            values = mx.concatenate([old_values, v], axis=2)
            key_positions = np.concatenate([old_positions, query_positions])
        delta = query_positions[:, None] - key_positions[None, :]
        mask = mx.array((delta >= 0) & (delta < self.context))
        self._store(k, v)
        self.offset += steps
        return keys, values, mask

    def _visible(self) -> tuple[mx.array | None, mx.array | None, np.ndarray | None]:
        """Cached keys/values with the absolute position held in each returned slot."""
        if self.keys is None or self.offset == 0:
            return None, None, None
        if self.offset < self.context:
            positions = np.arange(self.offset)
            return self.keys[:, :, : self.offset], self.values[:, :, : self.offset], positions
        slots = np.arange(self.context)
        positions = self.offset - 1 - ((self.offset - 1 - slots) % self.context)
        return self.keys, self.values, positions

    def _reserve(self, k: mx.array, v: mx.array, slots: int) -> None:
        """Make the buffer at least `slots` long (only ever needed before the ring wraps, so
        slots 0 .. offset-1 are in order and growing is appending zeros)."""
        have = 0 if self.keys is None else self.keys.shape[2]
        if slots <= have:
            return
        size = min(self.context, -(-slots // self.grow_step) * self.grow_step)
        batch, heads, _, head_dim = k.shape
        new_keys = mx.zeros((batch, heads, size - have, head_dim), dtype=k.dtype)
        new_values = mx.zeros((batch, heads, size - have, head_dim), dtype=v.dtype)
        if self.keys is None:
            self.keys, self.values = new_keys, new_values
        else:
            self.keys = mx.concatenate([self.keys, new_keys], axis=2)
            self.values = mx.concatenate([self.values, new_values], axis=2)

    def _store(self, k: mx.array, v: mx.array) -> None:
        capacity = self.context
        self._reserve(k, v, min(capacity, self.offset + k.shape[2]))
        steps = k.shape[2]
        first_position = self.offset
        if steps > capacity:  # only the newest `capacity` steps can ever be seen again
            k, v = k[:, :, -capacity:], v[:, :, -capacity:]
            first_position += steps - capacity
            steps = capacity
        start = first_position % capacity
        head = min(steps, capacity - start)
        self.keys[:, :, start : start + head] = k[:, :, :head]
        self.values[:, :, start : start + head] = v[:, :, :head]
        if head < steps:  # wrap around to the start of the ring
            self.keys[:, :, : steps - head] = k[:, :, head:]
            self.values[:, :, : steps - head] = v[:, :, head:]


class WindowCache:
    """Keys/values (after RoPE) of the newest `context - 1` steps, contiguous, oldest first.

    A query at position p sees key position s iff 0 <= p - s < context, so the last
    `context - 1` steps are all a following chunk can need. Keeping them in position order
    (rather than a ring buffer) makes each update one concatenation, and the visibility mask
    depends only on how many steps are past and new, so it is built once per shape.
    """

    def __init__(self, context: int) -> None:
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.context = context
        self.reset()

    def reset(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # absolute position of the next step

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """Append k, v [B, H, T, D]; return (keys, values, mask) to attend with (mask bool
        [T, S], True = may attend, or None when every query sees every key)."""
        steps = k.shape[2]
        if self.keys is None:
            keys, values = k, v
        else:
            keys = mx.concatenate([self.keys, k], axis=2)
            values = mx.concatenate([self.values, v], axis=2)
        past = keys.shape[2] - steps
        keep = min(self.context - 1, keys.shape[2])
        if keep > 0:
            self.keys, self.values = keys[:, :, -keep:], values[:, :, -keep:]
        self.offset += steps
        return keys, values, _window_mask(past, steps, self.context)


@lru_cache(maxsize=32)
def _window_mask(past: int, steps: int, context: int) -> mx.array | None:
    """Query i (after `past` cached keys) sees key j iff 0 <= past + i - j < context."""
    if steps == 1 and past < context:
        return None
    delta = (past + np.arange(steps))[:, None] - np.arange(past + steps)[None, :]
    return mx.array((delta >= 0) & (delta < context))
