"""safetensors files, read and written by hand: 8-byte little-endian header length, JSON
header, raw tensor bytes back to back.

Reading checks the whole header before any data is touched and reads one tensor at a time, so a
broken file gives one clear line and a large checkpoint never has to sit in memory at once.
Writing streams tensors in a planned order after writing the header first (the converter's
bounded-memory path), hashing the file on the way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from moshi_mlx.errors import WeightsError

# safetensors dtype name -> (MLX dtype, numpy dtype holding the same bytes)
_DTYPES: dict[str, tuple[mx.Dtype, np.dtype]] = {
    "BF16": (mx.bfloat16, np.dtype("<u2")),
    "F16": (mx.float16, np.dtype("<f2")),
    "F32": (mx.float32, np.dtype("<f4")),
    "U32": (mx.uint32, np.dtype("<u4")),
    "I32": (mx.int32, np.dtype("<i4")),
    "U8": (mx.uint8, np.dtype("u1")),
    "I64": (mx.int64, np.dtype("<i8")),
}
SAFETENSORS_DTYPE_NAMES: dict[mx.Dtype, str] = {dt: name for name, (dt, _) in _DTYPES.items()}
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})


def mlx_dtype(safetensors_dtype: str) -> mx.Dtype:
    """MLX dtype of a safetensors dtype name ("BF16" -> mx.bfloat16)."""
    return _DTYPES[safetensors_dtype][0]


_MAX_HEADER_BYTES = 100 * 1024 * 1024


# --------------------------------------------------------------------------------------------
# safetensors reading


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    header_bytes: int  # bytes before the data section (8 + JSON length)
    file_size: int

    def in_file_order(self) -> list[str]:
        return sorted(self.tensors, key=lambda name: self.tensors[name].start)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; WeightsError (one line) for any problem."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    file_size = path.stat().st_size
    if file_size < 8:
        raise WeightsError(f"{path} is not a safetensors file (only {file_size} bytes)")
    with open(path, "rb") as f:
        json_len = int.from_bytes(f.read(8), "little")
        if json_len > min(file_size - 8, _MAX_HEADER_BYTES):
            raise WeightsError(
                f"{path} is not a safetensors file, or is truncated (header length {json_len}, "
                f"file size {file_size})"
            )
        raw = f.read(json_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    data_size = file_size - 8 - json_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_size)
    # The format stores tensors back to back: holes or trailing bytes mean a damaged file.
    position = 0
    for info in sorted(tensors.values(), key=lambda info: info.start):
        if info.start != position:
            raise WeightsError(f"{path} is corrupt: tensor data is not contiguous")
        position = info.end
    if position != data_size:
        raise WeightsError(
            f"{path} is corrupt: {data_size - position} bytes after the last tensor"
        )
    return SafetensorsHeader(path, tensors, metadata, 8 + json_len, file_size)


def _parse_entry(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(o) for o in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        message = f"{path} is not a safetensors file (bad header entry {name!r})"
        raise WeightsError(message) from None
    if dtype not in _DTYPES:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    expected = math.prod(shape) * _DTYPES[dtype][1].itemsize
    if any(d < 0 for d in shape) or start < 0 or end - start != expected:
        raise WeightsError(f"{path} is corrupt: tensor {name} has inconsistent size in its header")
    if end > data_size:
        raise WeightsError(
            f"{path} is truncated: tensor {name} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes"
        )
    return TensorInfo(dtype, shape, start, end)


def tensor_from_bytes(raw: bytes | bytearray | memoryview, info: TensorInfo) -> mx.array:
    """Raw little-endian tensor bytes -> MLX array of the tensor's dtype and shape."""
    mx_dtype, np_dtype = _DTYPES[info.dtype]
    host = np.frombuffer(raw, dtype=np_dtype).reshape(info.shape)
    array = mx.array(host)
    return array.view(mx_dtype) if info.dtype == "BF16" else array


def tensor_buffer(array: mx.array) -> memoryview:
    """MLX array -> a view of its raw little-endian bytes (C order), as stored in safetensors."""
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return memoryview(np.ascontiguousarray(np.array(array, copy=False))).cast("B")


def tensor_to_bytes(array: mx.array) -> bytes:
    return bytes(tensor_buffer(array))


def read_tensor(f: BinaryIO, header: SafetensorsHeader, name: str) -> tuple[bytes, mx.array]:
    """Read one tensor from an open file; returns its raw bytes and the MLX array."""
    info = header.tensors[name]
    f.seek(header.header_bytes + info.start)
    raw = f.read(info.nbytes)
    if len(raw) != info.nbytes:
        raise WeightsError(f"{header.path} is truncated while reading tensor {name}")
    return raw, tensor_from_bytes(raw, info)


def iter_tensors(header: SafetensorsHeader, skip: Collection[str] = ()
                 ) -> Iterator[tuple[str, bytes, mx.array]]:
    """Yield (name, raw bytes, array) one tensor at a time, in file order (those in `skip`
    left unread)."""
    with open(header.path, "rb") as f:
        for name in header.in_file_order():
            if name in skip:
                continue
            raw, array = read_tensor(f, header, name)
            yield name, raw, array


def read_safetensors(path: str | os.PathLike) -> dict[str, mx.array]:
    """Every tensor of a checked safetensors file, by name."""
    return {name: array for name, _raw, array in iter_tensors(read_safetensors_header(path))}


def lazy_placeholders(header: SafetensorsHeader) -> dict[str, mx.array]:
    """Name -> an unevaluated array of each tensor's dtype and shape: mapping code runs on these
    to learn names and shapes without reading (or allocating) any data."""
    return {name: mx.zeros(info.shape, dtype=mlx_dtype(info.dtype))
            for name, info in header.tensors.items()}


@dataclass(frozen=True)
class CheckpointFiles:
    """One checkpoint in one safetensors file or in several shards (transformers'
    model-0000i-of-0000N.safetensors): the checked headers, and which file holds each tensor.
    Tensors are read one at a time, shard after shard."""

    headers: tuple[SafetensorsHeader, ...]
    owner: dict[str, SafetensorsHeader]

    @classmethod
    def read(cls, paths: list[Path] | tuple[Path, ...]) -> CheckpointFiles:
        headers = tuple(read_safetensors_header(path) for path in paths)
        owner: dict[str, SafetensorsHeader] = {}
        for header in headers:
            for name in header.tensors:
                if name in owner:
                    raise WeightsError(f"tensor {name} is in both {owner[name].path.name} and "
                                       f"{header.path.name}")
                owner[name] = header
        return cls(headers, owner)

    @property
    def path(self) -> Path:
        """The file, or the first shard."""
        return self.headers[0].path

    @property
    def name(self) -> str:
        if len(self.headers) == 1:
            return self.path.name
        return f"{self.path.parent.name}/ ({len(self.headers)} shards)"

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {name: header.tensors[name] for name, header in self.owner.items()}

    def in_file_order(self) -> list[str]:
        return [name for header in self.headers for name in header.in_file_order()]

    def placeholders(self) -> dict[str, mx.array]:
        return {name: array for header in self.headers
                for name, array in lazy_placeholders(header).items()}

    def iter_tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, bytes, mx.array]]:
        for header in self.headers:
            yield from iter_tensors(header, skip)

    def sha256(self) -> str:
        """sha256 of the file; of a sharded checkpoint, of its shards' bytes in order."""
        digest = hashlib.sha256()
        for header in self.headers:
            with open(header.path, "rb") as f:
                while block := f.read(16 * 1024 * 1024):
                    digest.update(block)
        return digest.hexdigest()


class TensorReader:
    """Random access to a checkpoint's tensors by name (files opened once, closed on exit)."""

    def __init__(self, files: CheckpointFiles) -> None:
        self.files = files
        self._open: dict[Path, BinaryIO] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def read(self, name: str) -> mx.array:
        header = self.files.owner[name]
        if header.path not in self._open:
            self._open[header.path] = open(header.path, "rb")  # noqa: SIM115 (closed on exit)
        return read_tensor(self._open[header.path], header, name)[1]


# --------------------------------------------------------------------------------------------
# writing




@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1].itemsize


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
