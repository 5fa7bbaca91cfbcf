"""Write a safetensors file tensor by tensor, without holding all tensors in memory.

The header (names, dtypes, shapes, byte offsets) is written first from a plan; tensor bytes
are then streamed in exactly the planned order. The SHA-256 of the whole file is computed on
the way.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import BinaryIO

import mlx.core as mx

from moshi_mlx.weights import SAFETENSORS_DTYPE_NAMES, tensor_buffer

_ITEMSIZES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4, "U8": 1, "I64": 8}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZES[self.dtype]


def planned(name: str, array: mx.array) -> PlannedTensor:
    """The plan entry of a (possibly lazy, unevaluated) array."""
    return PlannedTensor(name, SAFETENSORS_DTYPE_NAMES[array.dtype], tuple(array.shape))


class SafetensorsStreamWriter:
    """Streams the tensors of `plan`, in order, into the open binary file `f`."""

    def __init__(self, f: BinaryIO, plan: list[PlannedTensor],
                 metadata: dict[str, str] | None = None) -> None:
        names = [entry.name for entry in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the plan")
        header: dict[str, object] = {}
        if metadata is not None:
            header["__metadata__"] = metadata
        offset = 0
        for entry in plan:
            header[entry.name] = {
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # Pad with spaces (allowed by the format) so tensor data starts 8-byte aligned.
        encoded += b" " * (-len(encoded) % 8)
        self._f = f
        self._plan = plan
        self._next = 0
        self._hash = hashlib.sha256()
        self.total_bytes = 8 + len(encoded) + offset
        self._write(len(encoded).to_bytes(8, "little") + encoded)

    def _write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._hash.update(data)

    def write(self, name: str, array: mx.array) -> None:
        """Write the next planned tensor (evaluates `array`)."""
        if self._next >= len(self._plan):
            raise ValueError(f"tensor {name} is not in the plan (all tensors already written)")
        entry = self._plan[self._next]
        got = planned(name, array)
        if got != entry:
            raise ValueError(f"expected {entry} next, got {got}")
        buffer = tensor_buffer(array)
        if len(buffer) != entry.nbytes:
            raise ValueError(f"tensor {name}: {len(buffer)} bytes, expected {entry.nbytes}")
        self._write(buffer)
        self._next += 1

    def finish(self) -> str:
        """Check every planned tensor was written; return the file's SHA-256 (hex)."""
        if self._next != len(self._plan):
            raise ValueError(f"only {self._next} of {len(self._plan)} tensors were written")
        return self._hash.hexdigest()
