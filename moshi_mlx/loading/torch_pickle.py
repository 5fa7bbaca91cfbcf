"""Tensors of a PyTorch `torch.save` file (.pt), read without torch: PersonaPlex's saved voices
(voices.tgz: {"embeddings": float32 [N-1, 1, 1, dim], "cache": int64 [1, 17, 4]}).

A .pt is a zip archive: `<name>/data.pkl` (a pickle of the saved object, its tensors as calls
of torch's `_rebuild_tensor_v2` on storages it names by key) and `<name>/data/<key>` (each
storage's raw bytes), plus `byteorder`. The pickle is read by a restricted unpickler that
knows only those rebuild calls, torch's storage types and OrderedDict (their hooks argument):
any other global is refused, so a file cannot run code. Tensors become numpy arrays.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from moshi_mlx.errors import WeightsError

# torch's storage types (as pickled by torch.save) -> numpy dtype; bfloat16 is read as its
# 16 bits and widened to float32 (exact).
_STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "<u2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    def __init__(self, data: np.ndarray, bfloat16: bool) -> None:
        self.data, self.bfloat16 = data, bfloat16


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple,
                    *_ignored: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks,
    ...) -> a numpy copy of that view."""
    data = storage.data
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in stride):
        raise ValueError("bad tensor view")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if 0 not in size and last >= data.size:
        raise ValueError("tensor view out of its storage")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    array = np.array(view)
    if storage.bfloat16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a plain tensor file")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}data/{key}")
            self.storages[key] = _Storage(np.frombuffer(raw, dtype=storage_type.dtype),
                                          storage_type.name == "BFloat16Storage")
        return self.storages[key]


def _label(path: str | os.PathLike | BinaryIO, name: str | None) -> str:
    if name:
        return name
    return Path(path).name if isinstance(path, (str, os.PathLike)) else "the .pt file"


def read_torch_file(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Any:
    """The object a `torch.save` file holds (dicts, lists, numbers, strings), each tensor as a
    numpy array. A file that is not one, or that pickles anything else: WeightsError. `path`
    may be an open binary file (e.g. a member of a tar archive); `name` names it in messages
    (default: the path's file name)."""
    label = _label(path, name)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise WeightsError(f"{label} is not a PyTorch .pt file (no data.pkl)")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
                raise WeightsError(f"{label}: big-endian tensors are not supported")
            unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix)
            return unpickler.load()
    except WeightsError:
        raise
    except OSError as exc:
        raise WeightsError(f"cannot read {label if name else path}: {exc.strerror or exc}"
                           ) from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError,
            EOFError) as exc:
        raise WeightsError(f"{label} is not a readable PyTorch .pt tensor file: {exc}"
                           ) from None


def read_personaplex_voice(path: str | os.PathLike | BinaryIO, name: str | None = None
                           ) -> tuple[np.ndarray, np.ndarray]:
    """A PersonaPlex voice (voices.tgz's .pt) -> (embeddings float32 [N-1, dim]: the summed
    input embedding of each forward of its voice phase, cache int64 [17, C]: NVIDIA's token
    ring after it (C = max delay + 3 columns; column p % C holds position p)).

    Replaying it with `LmGen` (N voice frames; NVIDIA's forward t + 1 is our step t): step
    t = 0 .. N-2 with `embedded=embeddings[t]` (any forced tokens, user SINE_TOKENS), then
    `set_last_tokens(cache[0, (N-1) % C], cache[1:9, (N-1) % C])`; the next step forces
    codebooks 1..7 of Moshi's stream to cache[2:9, N % C] (the voice's last frame, delayed)."""
    data = read_torch_file(path, name)
    name = _label(path, name)
    if not isinstance(data, dict) or not {"embeddings", "cache"} <= set(data):
        raise WeightsError(f"{name} is not a PersonaPlex voice (expected embeddings and cache)")
    embeddings, cache = data["embeddings"], data["cache"]
    if (not isinstance(embeddings, np.ndarray) or embeddings.ndim != 4
            or embeddings.shape[1:3] != (1, 1) or embeddings.dtype.kind != "f"):
        raise WeightsError(f"{name}: embeddings must be float [N, 1, 1, dim]")
    if (not isinstance(cache, np.ndarray) or cache.ndim != 3 or cache.shape[0] != 1
            or cache.dtype.kind not in "iu"):
        raise WeightsError(f"{name}: cache must be integer [1, streams, columns]")
    return embeddings[:, 0, 0, :].astype(np.float32), cache[0].astype(np.int64)
