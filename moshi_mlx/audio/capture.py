"""Input-only capture: a sound device as a stream of 24 kHz mono samples.

The device callback only queues blocks (bounded: beyond `max_seconds` of backlog the oldest
audio is dropped and counted); `read()` on the worker side mixes to mono and resamples.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moshi_mlx.audio import devices
from moshi_mlx.audio.devices import SAMPLE_RATE
from moshi_mlx.audio.resample import StreamResampler
from moshi_mlx.audio.ring import BlockQueue


class MicCapture:
    def __init__(self, device: str | int | None = None, max_seconds: float = 10.0,
                 opener=None) -> None:
        self.device = device
        self._opener = opener
        self._max_seconds = max_seconds
        self._queue: BlockQueue | None = None
        self._opened: Any = None
        self._resample: StreamResampler | None = None
        self.status_errors = 0

    @property
    def name(self) -> str:
        return self._opened.name if self._opened is not None else "?"

    @property
    def dropped_seconds(self) -> float:
        if self._queue is None or self._opened is None:
            return 0.0
        return self._queue.dropped_samples / self._opened.sample_rate

    @property
    def backlog_seconds(self) -> float:
        """Captured audio not read yet."""
        if self._queue is None or self._opened is None:
            return 0.0
        return len(self._queue) / self._opened.sample_rate

    def start(self) -> None:
        opener = self._opener or devices.open_stream
        self._opened = opener("input", self.device, self._on_input)
        rate = self._opened.sample_rate
        self._queue = BlockQueue(int(self._max_seconds * rate * self._opened.channels))
        self._resample = StreamResampler(rate, SAMPLE_RATE)
        self._opened.stream.start()

    def _on_input(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        if status:
            self.status_errors += 1
        self._queue.put(np.asarray(indata, dtype=np.float32).mean(axis=1), time.monotonic())

    def read(self, timeout: float = 0.5) -> np.ndarray:
        """Everything captured since the last read (waits up to `timeout` for something), as
        24 kHz mono float32."""
        blocks = self._queue.get_all(timeout)
        if not blocks:
            return np.zeros(0, dtype=np.float32)
        return self._resample(np.concatenate([block for block, _ in blocks]))

    def close(self) -> None:
        if self._opened is not None:
            try:
                self._opened.stream.stop()
            finally:
                self._opened.stream.close()
            self._opened = None
