"""An embedding table left in its checkpoint file, its rows read when they are looked up.

For a table that is large and rarely read: CSM's text embeddings (0.5 GB of csm-1b in bf16)
embed only the prompt's tokens. The file is memory-mapped read-only, so the operating system
pages in the rows a lookup touches and nothing else counts against the process. Rows come back
exactly as stored (bf16 stays bf16): the caller widens them as it would the loaded table's.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.loading.safetensors import SafetensorsHeader, TensorInfo, tensor_from_bytes


class FileRows(nn.Module):
    """Stands for an `nn.Embedding` whose `weight` is the tensor `name` of a safetensors file.
    Holds no parameters: the table is not loaded, trained, quantized or saved with the model.
    The file must stay in place while the model is used."""

    def __init__(self, header: SafetensorsHeader, name: str) -> None:
        super().__init__()
        info = header.tensors[name]
        self._info = info
        self._source = f"{Path(header.path).name}:{name}"
        # one row of raw bytes per table row
        self._table = np.memmap(header.path, dtype=np.uint8, mode="r",
                                offset=header.header_bytes + info.start,
                                shape=(info.shape[0], info.nbytes // info.shape[0]))

    @property
    def shape(self) -> tuple[int, ...]:
        return self._info.shape

    def _extra_repr(self) -> str:
        return f"{self.shape}, {self._info.dtype}, rows read from {self._source}"

    def __call__(self, ids: mx.array) -> mx.array:
        """ids [...] -> rows [..., dim] in the stored dtype."""
        index = np.asarray(ids).astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.shape[0]):
            raise IndexError(f"token id out of range for the {self.shape[0]}-row table "
                             f"{self._source}")
        rows = self._table[index.reshape(-1)]
        info = TensorInfo(self._info.dtype, (index.size, *self.shape[1:]), 0, rows.nbytes)
        return tensor_from_bytes(rows.tobytes(), info).reshape(*index.shape, *self.shape[1:])
