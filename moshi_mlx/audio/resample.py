"""Streaming resampling between a device's rate and the model's 24 kHz."""

from __future__ import annotations

import numpy as np


class StreamResampler:
    """Streaming resampler (soxr) from `src` to `dst` Hz; identity when the rates match."""

    def __init__(self, src: int, dst: int):
        self.src, self.dst = int(src), int(dst)
        self._stream = None
        if self.src != self.dst:
            import soxr

            self._stream = soxr.ResampleStream(self.src, self.dst, 1, dtype="float32")

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples)

