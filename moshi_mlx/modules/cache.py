"""Key/value caches of streaming attention, behind one contract (`AttentionCache`):

- `offset`: the absolute position of the next step (RoPE reads it before `update`);
- `update(k, v)`: store k, v [B, H, T, D] for positions offset .. offset+T-1, advance the
  offset, and return (keys, values, mask) to attend with: mask bool [T, S] (True = may attend)
  or None when every query may see every returned key;
- `reset()`: forget everything.

A query at position p sees key position s iff 0 <= p - s < context, in both caches.
`KVCache` is a ring buffer for one step at a time (the LMs); `WindowCache` keeps the window in
position order for a few steps at a time (Mimi's transformers). `SlotCache` holds one independent
stream per batch row (its `offset` is an array [B]): rows start again and pause on their own.
`LeftPaddedCache` holds a batch of streams that advance together from left-padded prompts
(batched CSM): every step writes one slot shared by all rows, each row's padding is masked.
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


class SlotCache:
    """Keys/values of `rows` independent streams, each with its own position (batched STT).

    A ring of `context + max_steps - 1` slots per row: position p of a row lives in slot
    p % ring, so the `context - 1` steps before an update of at most `max_steps` steps are never
    overwritten by it. With max_steps 1 the layout is `KVCache`'s. Which position each slot
    holds is kept on the host per row (-1: nothing of this row's current stream), and the mask
    [B, 1, T, ring] lets query p see slot s iff 0 <= p - position(s) < context. Every update
    attends over the whole ring: the float sums of attention depend on how many (masked) keys
    they run over, so a row's results must not depend on how far the other rows are.

    `offset` is an int32 array [B] (RoPE per row). `set_active(mask)` picks the rows the next
    updates write and advance; the others keep their keys, values and offset exactly (their
    attention output is meaningless and meant to be dropped). `reset_rows(rows)` starts those
    rows again at position 0.
    """

    def __init__(self, context: int, rows: int, max_steps: int = 1) -> None:
        if context < 1 or rows < 1 or max_steps < 1:
            raise ValueError(f"context, rows and max_steps must be >= 1, got {context}, {rows}, "
                             f"{max_steps}")
        self.context = context
        self.rows = rows
        self.ring = context + max_steps - 1
        self.reset()

    def reset(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.positions = np.full((self.rows, self.ring), -1, dtype=np.int64)
        self.offsets = np.zeros(self.rows, dtype=np.int64)
        self.active = np.ones(self.rows, dtype=bool)

    def reset_rows(self, rows) -> None:
        self.positions[rows] = -1
        self.offsets[rows] = 0

    def set_active(self, mask) -> None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.rows,):
            raise ValueError(f"the active mask must have {self.rows} rows, got {mask.shape}")
        self.active = mask

    @property
    def offset(self) -> mx.array:
        return mx.array(self.offsets.astype(np.int32))

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Store k, v [B, H, T, D] at each active row's positions offset .. offset+T-1; return
        (keys, values, mask bool [B, 1, T, S])."""
        batch, heads, steps, head_dim = k.shape
        if batch != self.rows or steps > self.ring - self.context + 1:
            raise ValueError(f"SlotCache of {self.rows} rows, at most "
                             f"{self.ring - self.context + 1} steps: got k {tuple(k.shape)}")
        if self.keys is None:
            self.keys = mx.zeros((batch, heads, self.ring, head_dim), dtype=k.dtype)
            self.values = mx.zeros((batch, heads, self.ring, head_dim), dtype=v.dtype)
        query_positions = self.offsets[:, None] + np.arange(steps)[None, :]  # [B, T]
        slots = query_positions % self.ring
        index = mx.array(slots.astype(np.int32))[:, None, :, None]
        if not self.active.all():  # paused rows write back what their slots hold
            keep = mx.array(~self.active)[:, None, None, None]
            k = mx.where(keep, mx.take_along_axis(self.keys, index, axis=2), k)
            v = mx.where(keep, mx.take_along_axis(self.values, index, axis=2), v)
        self.keys = mx.put_along_axis(self.keys, index, k, axis=2)
        self.values = mx.put_along_axis(self.values, index, v, axis=2)
        rows = np.flatnonzero(self.active)
        self.positions[rows[:, None], slots[rows]] = query_positions[rows]
        self.offsets[rows] += steps

        held = self.positions[:, None, :]  # [B, 1, S]
        delta = query_positions[:, :, None] - held
        visible = (held >= 0) & (delta >= 0) & (delta < self.context)
        visible |= ~self.active[:, None, None]  # a paused row's output is dropped: any keys do
        return self.keys, self.values, mx.array(visible[:, None])


class LeftPaddedCache:
    """Keys/values of a batch of streams that all step together, their prompts left-padded:
    row r's stream starts at slot `pads[r]`, so each update writes the same slots in every row
    and the buffer is one [B, H, S, D] array per layer, no ring (the caller keeps every row
    within its context). `offset` is an int32 array [B]: each row's position of the next step
    (slot - pad), for RoPE. The mask [B, 1, T, S] hides each row's padding; a padding query
    sees only its own slot, so no softmax runs over nothing (its output is never read).

    `keep_rows(rows)` drops the other rows (finished streams cost nothing further) and the
    leading slots that are padding in every row left.
    """

    def __init__(self, pads, grow_step: int = 256) -> None:
        self.pads = np.asarray(pads, dtype=np.int64).reshape(-1)
        if self.pads.size < 1 or (self.pads < 0).any():
            raise ValueError(f"pads must be >= 0, one per row, got {pads!r}")
        if grow_step < 1:
            raise ValueError(f"grow_step must be >= 1, got {grow_step}")
        self.grow_step = grow_step
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.slots = 0  # slots written (the next update writes slot `slots`)

    @property
    def rows(self) -> int:
        return len(self.pads)

    @property
    def offset(self) -> mx.array:
        return mx.array((self.slots - self.pads).astype(np.int32))

    def reset(self) -> None:
        self.keys = self.values = None
        self.slots = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """Store k, v [B, H, T, D] at slots `slots` .. `slots`+T-1 of every row; return (keys,
        values, mask bool [B, 1, T, S], or None when no row has padding and T is 1)."""
        batch, heads, steps, head_dim = k.shape
        if batch != self.rows:
            raise ValueError(f"LeftPaddedCache of {self.rows} rows, got k {tuple(k.shape)}")
        end = self.slots + steps
        have = 0 if self.keys is None else self.keys.shape[2]
        if end > have:
            grown = -(-end // self.grow_step) * self.grow_step - have
            new_keys = mx.zeros((batch, heads, grown, head_dim), dtype=k.dtype)
            new_values = mx.zeros((batch, heads, grown, head_dim), dtype=v.dtype)
            if self.keys is None:
                self.keys, self.values = new_keys, new_values
            else:
                self.keys = mx.concatenate([self.keys, new_keys], axis=2)
                self.values = mx.concatenate([self.values, new_values], axis=2)
        self.keys[:, :, self.slots : end] = k
        self.values[:, :, self.slots : end] = v
        start, self.slots = self.slots, end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        if steps == 1 and not self.pads.any():
            return keys, values, None
        query = np.arange(start, end)[None, :, None]  # [1, T, 1]
        key = np.arange(end)[None, None, :]  # [1, 1, S]
        visible = (key >= self.pads[:, None, None]) & (key <= query)
        visible |= key == query
        return keys, values, mx.array(visible[:, None])

    def keep_rows(self, rows) -> None:
        """Keep only these rows (indices, in the order given)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size < 1:
            raise ValueError("keep at least one row (drop the cache instead)")
        self.pads = self.pads[rows]
        drop = int(self.pads.min())  # slots that are padding in every row left
        self.pads = self.pads - drop
        self.slots -= drop
        if self.keys is not None:
            index = mx.array(rows.astype(np.int32))
            self.keys = self.keys[index, :, drop:]
            self.values = self.values[index, :, drop:]
