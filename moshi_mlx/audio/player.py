"""Output-only playback of audio produced piece by piece (e.g. text to speech).

The producer (any thread: the one running the model) calls `write` with 24 kHz chunks; the
output callback only takes samples from a `SampleFifo`, silence when nothing is ready, so it
never waits on the model. Playback starts once `prebuffer` seconds are queued (or the producer
is done); after that, every callback that finds too few samples while more audio is still to
come is an underrun, counted. `write` waits while the buffer is full: audio is never dropped.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from moshi_mlx.audio.devices import OpenedStream, open_stream
from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.resample import StreamResampler
from moshi_mlx.audio.ring import SampleFifo
from moshi_mlx.errors import AudioError


@dataclass
class PlaybackStats:
    written_samples: int = 0  # at the device rate
    played_samples: int = 0  # real samples handed to the device (not underrun silence)
    underruns: int = 0  # callbacks, after the start, that ran short while audio was to come
    underrun_samples: int = 0
    started_after_s: float | None = None  # first write -> playback start
    sample_rate: int = SAMPLE_RATE

    def summary_line(self) -> str:
        seconds = self.played_samples / self.sample_rate
        line = f"played {seconds:.2f} s of audio, {self.underruns} underruns"
        if self.underruns:
            line += f" ({1000 * self.underrun_samples / self.sample_rate:.0f} ms of silence)"
        return line


class StreamPlayer:
    """Play chunks on an output device as they come. Use as a context manager, or call
    `open`, then `write`... `finish` (plays to the end), and `close` (always)."""

    def __init__(self, device: str | int | None = None, prebuffer: float = 0.5,
                 capacity: float = 4.0, keep_audio: bool = False,
                 device_rate: int | None = None) -> None:
        if prebuffer < 0:
            raise AudioError(f"prebuffer must be >= 0 seconds, got {prebuffer}")
        self.device = device
        self.prebuffer = float(prebuffer)
        self.capacity = max(float(capacity), self.prebuffer + 2 * FRAME_SIZE / SAMPLE_RATE)
        self.keep_audio = keep_audio
        self.device_rate = device_rate
        self.stats = PlaybackStats()
        self.played: list[np.ndarray] = []  # what the callback handed out, silence included
        self.output: OpenedStream | None = None
        self.fifo: SampleFifo | None = None
        self._resample: StreamResampler | None = None
        self._started = False
        self._done = False  # the producer has written everything
        self._space = threading.Event()  # set by the callback after it took samples
        self._first_write: float | None = None

    # ---- callback: moves samples only -------------------------------------------------------
    def _on_output(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        samples, real, _ = self.fifo.read_counted(frames)
        outdata[:] = samples[:, None]
        self.stats.played_samples += real
        if real < frames and not self._done:
            self.stats.underruns += 1
            self.stats.underrun_samples += frames - real
        if self.keep_audio:
            self.played.append(samples)
        self._space.set()

    # ---- producer side ----------------------------------------------------------------------
    def open(self) -> StreamPlayer:
        self.output = open_stream("output", self.device, self._on_output,
                                  sample_rate=self.device_rate)
        rate = self.output.sample_rate
        self.stats.sample_rate = rate
        self.fifo = SampleFifo(int(self.capacity * rate))
        self._resample = StreamResampler(SAMPLE_RATE, rate)
        return self

    @property
    def name(self) -> str:
        return self.output.name if self.output is not None else "?"

    def write(self, pcm: np.ndarray) -> None:
        """Queue 24 kHz samples; waits (interruptibly) while the buffer has no room."""
        if self.fifo is None:
            raise AudioError("the player is not open")
        if self._first_write is None:
            self._first_write = time.monotonic()
        samples = self._resample(pcm)
        for start in range(0, len(samples), self.fifo.capacity // 2):
            piece = samples[start : start + self.fifo.capacity // 2]
            while len(self.fifo) + len(piece) > self.fifo.capacity:
                self._start()  # a full buffer can always start playing
                self._space.clear()
                self._space.wait(0.05)
            self.fifo.write(piece)
            self.stats.written_samples += len(piece)
        if len(self.fifo) >= self.prebuffer * self.stats.sample_rate:
            self._start()

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._first_write is not None:
            self.stats.started_after_s = time.monotonic() - self._first_write
        try:
            self.output.stream.start()
        except Exception as exc:
            raise AudioError(f"cannot start the output stream: {exc}") from None

    def finish(self, timeout: float | None = None) -> PlaybackStats:
        """No more audio: play what is queued to the end (the device's own buffers too)."""
        if self._resample is not None and self._resample._stream is not None:
            tail = self._resample._stream.resample_chunk(np.zeros(0, np.float32), last=True)
            if len(tail):
                self.fifo.write(tail)  # room is not checked: a few ms of filter delay
                self.stats.written_samples += len(tail)
        self._done = True
        if self.fifo is None or self.stats.written_samples == 0:
            return self.stats
        self._start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(self.fifo) and (deadline is None or time.monotonic() < deadline):
            self._space.clear()
            self._space.wait(0.05)
        # the samples taken last are still in the device's buffers
        time.sleep(float(self.output.stream.latency) + 2 * FRAME_SIZE / self.stats.sample_rate)
        self.output.stream.stop()
        return self.stats

    def close(self) -> None:
        """Stop at once (e.g. on Ctrl-C) and release the device. Safe to call twice."""
        self._done = True
        if self.output is not None:
            with contextlib.suppress(Exception):
                self.output.stream.abort()
            with contextlib.suppress(Exception):
                self.output.stream.close()
            self.output = None

    def __enter__(self) -> StreamPlayer:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
