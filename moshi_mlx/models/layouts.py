"""What every *_layouts module shares: fragment names for tensors built from several
source tensors, and the q/k row order of rotate-half RoPE layouts."""

from __future__ import annotations

import mlx.core as mx

from moshi_mlx.errors import WeightsError

# A sanitize that needs several source tensors for one of ours (transformers' separate q/k/v
# projections -> our fused in_proj) returns each piece as "<name>#<i>/<n>": part i of n,
# joined in order along dim 0 once all n have been seen. Sanitize stays tensor by tensor.
FRAGMENT = "#"


def fragment_name(name: str, index: int, count: int) -> str:
    return f"{name}{FRAGMENT}{index}/{count}"


class FragmentJoiner:
    """Collects fragments; `add` returns the finished tensors (a plain name at once, a
    fragmented one when its last part arrives)."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[int, mx.array]] = {}

    def add(self, name: str, array: mx.array) -> list[tuple[str, mx.array]]:
        if FRAGMENT not in name:
            return [(name, array)]
        key, _, part = name.rpartition(FRAGMENT)
        index, count = (int(n) for n in part.split("/"))
        parts = self.pending.setdefault(key, {})
        parts[index] = array
        if len(parts) < count:
            return []
        del self.pending[key]
        return [(key, mx.concatenate([parts[i] for i in range(count)], axis=0))]

    def check_done(self, source: str) -> None:
        if self.pending:
            key, parts = next(iter(self.pending.items()))
            raise WeightsError(f"{source} lacks part of {key} (has {len(parts)} of its "
                               "pieces, e.g. the q/k/v projections of one layer)")


def rope_rows_to_interleaved(tensor: mx.array, num_heads: int, key: str, layout: str
                             ) -> mx.array:
    """Undo transformers' q/k row permutation: its RoPE rotates the two halves of each head
    (rows i and i + head_dim/2 of a head), ours (traditional RoPE) adjacent rows (2i, 2i + 1).
    `key` and `layout` name the tensor and its layout in the error for a wrong shape."""
    rows, cols = tensor.shape[0], tensor.shape[-1]
    if tensor.ndim != 2 or rows % (2 * num_heads):
        raise WeightsError(f"tensor {key} of shape {tuple(tensor.shape)} does not hold "
                           f"{num_heads} heads ({layout} layout)")
    half = rows // num_heads // 2
    return tensor.reshape(num_heads, 2, half, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
