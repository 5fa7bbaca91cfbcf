"""What every *_layouts module shares: fragment names for tensors built from several
source tensors."""

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

