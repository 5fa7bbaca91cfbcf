"""Thread-safe bounded buffers between the audio callbacks and the worker thread.

The callbacks only move samples in and out of these buffers; they never wait on the model. Both
buffers are bounded: when the consumer falls behind, the oldest audio is dropped (and counted)
so that latency stays bounded instead of growing with every late frame.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np


class BlockQueue:
    """Blocks of captured audio with their capture time, oldest dropped beyond `max_samples`."""

    def __init__(self, max_samples: int):
        self.max_samples = int(max_samples)
        self._blocks: deque[tuple[np.ndarray, float]] = deque()
        self._samples = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.dropped_samples = 0
        self.dropped_blocks = 0
        self.peak_samples = 0

    def put(self, block: np.ndarray, timestamp: float) -> None:
        """Called from the input callback: append, dropping the oldest blocks if over capacity."""
        with self._lock:
            self._blocks.append((block, timestamp))
            self._samples += len(block)
            while self._samples > self.max_samples and len(self._blocks) > 1:
                old, _ = self._blocks.popleft()
                self._samples -= len(old)
                self.dropped_samples += len(old)
                self.dropped_blocks += 1
            self.peak_samples = max(self.peak_samples, self._samples)
        self._ready.set()

    def get_all(self, timeout: float | None = None) -> list[tuple[np.ndarray, float]]:
        """Called from the worker: every queued block (waits up to `timeout` for one)."""
        if not self._ready.wait(timeout):
            return []
        with self._lock:
            blocks = list(self._blocks)
            self._blocks.clear()
            self._samples = 0
            self._ready.clear()
        return blocks

    def wake(self) -> None:
        """Unblock a waiting `get_all` (used at shutdown)."""
        self._ready.set()

    def __len__(self) -> int:
        return self._samples


class SampleFifo:
    """A fixed-capacity FIFO of float32 samples for the playback side.

    `write` (worker) drops the oldest samples when full; `read` (output callback) always returns
    exactly n samples, padding with silence when not enough are queued (an underrun).
    Each write may carry a marker (e.g. the capture time of the frame it answers): `read`
    returns the markers whose first sample it has just handed out, so the caller can tell when
    that frame started playing.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._buf = np.zeros(self.capacity, dtype=np.float32)
        self._start = 0  # index of the oldest sample
        self._size = 0
        self._written = 0  # total samples ever written (stream position of the newest + 1)
        self._markers: deque[tuple[int, object]] = deque()
        self._lock = threading.Lock()
        self.dropped_samples = 0
        self.underrun_samples = 0
        self.peak_samples = 0

    def write(self, samples: np.ndarray, marker: object = None) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(samples) > self.capacity:
            samples = samples[-self.capacity :]
        with self._lock:
            if marker is not None:
                self._markers.append((self._written, marker))
            overflow = self._size + len(samples) - self.capacity
            if overflow > 0:
                self._start = (self._start + overflow) % self.capacity
                self._size -= overflow
                self.dropped_samples += overflow
            end = (self._start + self._size) % self.capacity
            first = min(len(samples), self.capacity - end)
            self._buf[end : end + first] = samples[:first]
            self._buf[: len(samples) - first] = samples[first:]
            self._size += len(samples)
            self._written += len(samples)
            self.peak_samples = max(self.peak_samples, self._size)

    def read(self, n: int) -> tuple[np.ndarray, list[object]]:
        """Exactly n samples (silence-padded) and the markers of writes that started playing."""
        out, _, started = self.read_counted(n)
        return out, started

    def read_counted(self, n: int) -> tuple[np.ndarray, int, list[object]]:
        """Like `read`, also returning how many of the n samples were real (not padding)."""
        out = np.zeros(n, dtype=np.float32)
        with self._lock:
            take = min(n, self._size)
            first = min(take, self.capacity - self._start)
            out[:first] = self._buf[self._start : self._start + first]
            out[first:take] = self._buf[: take - first]
            self._start = (self._start + take) % self.capacity
            self._size -= take
            self.underrun_samples += n - take
            # position in the written stream of the next sample to be read
            read_pos = self._written - self._size
            started = []
            while self._markers and self._markers[0][0] < read_pos:
                started.append(self._markers.popleft()[1])
        return out, take, started

    def __len__(self) -> int:
        return self._size
