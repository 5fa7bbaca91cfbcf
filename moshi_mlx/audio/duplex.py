"""The real-time loop: microphone -> engine -> speaker, with separate input and output streams.

Threads:
- the input callback (PortAudio) appends each captured block to a bounded `BlockQueue`;
- the output callback (PortAudio) takes exactly the samples it needs from a `SampleFifo`,
  silence when nothing is ready;
- one worker thread turns captured audio into 1920-sample frames at 24 kHz, runs
  `engine.process` on each, and queues Moshi's audio for playback.

The callbacks never wait on the model. When compute falls behind real time the worker skips
the oldest captured frames (keeping at most `max_backlog` frames), the speaker gets silence,
and late frames are counted and shown, so latency stays bounded instead of growing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from moshi_mlx.audio.devices import FRAME_SIZE, SAMPLE_RATE, OpenedStream, open_stream
from moshi_mlx.audio.display import TextDisplay
from moshi_mlx.audio.recorder import WavWriter
from moshi_mlx.audio.resample import StreamResampler
from moshi_mlx.audio.ring import BlockQueue, SampleFifo
from moshi_mlx.audio.stats import LoopStats
from moshi_mlx.errors import AudioError


class Framer:
    """Cut a stream of arbitrary-size blocks into frames of `frame_size` samples, each tagged
    with the timestamp of the block that completed it."""

    def __init__(self, frame_size: int = FRAME_SIZE):
        self.frame_size = frame_size
        self._pending = np.zeros(0, dtype=np.float32)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def push(self, samples: np.ndarray, timestamp: float) -> list[tuple[np.ndarray, float]]:
        self._pending = np.concatenate([self._pending, samples])
        frames = []
        while len(self._pending) >= self.frame_size:
            frames.append((self._pending[: self.frame_size].copy(), timestamp))
            self._pending = self._pending[self.frame_size :]
        return frames


class DuplexLoop:
    """Full-duplex conversation on sound devices. `run()` blocks until `stop()`, the optional
    duration, or Ctrl-C; the streams are always closed and the recording left valid."""

    def __init__(
        self,
        engine: Any,
        display: TextDisplay | None = None,
        input_device: str | int | None = None,
        output_device: str | int | None = None,
        record: WavWriter | None = None,
        device_rate: int | None = None,
        max_backlog: int = 2,
        max_output_frames: int = 3,
        late_after: float | None = None,
        keep_audio: bool = False,
        executor: Executor | None = None,
    ):
        self.engine = engine
        self.display = display or TextDisplay()
        self.input_device = input_device
        self.output_device = output_device
        self.record = record
        self.device_rate = device_rate
        self.frame_seconds = FRAME_SIZE / SAMPLE_RATE
        self.max_backlog = max(1, int(max_backlog))
        self.max_output_frames = max(1, int(max_output_frames))
        self.late_after = self.frame_seconds if late_after is None else late_after
        self.stats = LoopStats(frame_seconds=self.frame_seconds)
        self.keep_audio = keep_audio
        # With MLX, run the model on the thread that loaded it (pass that thread's executor).
        self.executor = executor
        self.produced: list[np.ndarray] = []  # Moshi frames in order (keep_audio)
        self.played: list[np.ndarray] = []  # exactly what went to the speaker (keep_audio)
        self.played_real: list[np.ndarray] = []  # the same without underrun silence
        self.pending_frames = 0  # whole frames captured but not processed at stop
        self.pending_samples = 0  # a partial frame captured at stop
        self.unread_samples = 0  # captured, still queued for the worker at stop
        self.rates: tuple[int, int] | None = None  # (input, output) device rates once open
        self.input_blocks = 0  # input callbacks seen
        self.input_samples = 0  # samples captured (device rate)
        self.captured: list[np.ndarray] = []  # 24 kHz frames given to the engine (keep_audio)
        # frames waiting each time the worker looked (recent looks only)
        self.backlog_seen: deque[int] = deque(maxlen=10_000)
        self._stop = threading.Event()
        self._record_lock = threading.Lock()
        self._worker: threading.Thread | Future | None = None
        self._worker_error: BaseException | None = None
        self.input: OpenedStream | None = None
        self.output: OpenedStream | None = None
        self.in_queue: BlockQueue | None = None
        self.out_fifo: SampleFifo | None = None

    # ---- audio callbacks: move samples only -------------------------------------------------
    def _on_input(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        t0 = time.perf_counter()
        self.in_queue.put(indata[:, 0].copy(), time.monotonic())
        self.input_blocks += 1
        self.input_samples += frames
        self.stats.callback.append(time.perf_counter() - t0)

    def _on_output(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        t0 = time.perf_counter()
        samples, real, started = self.out_fifo.read_counted(frames)
        outdata[:] = samples[:, None]
        if started:
            now = time.monotonic()
            for captured_at in started:
                self.stats.latency.append(now - captured_at + self.stats.device_latency)
        if self.keep_audio:
            self.played.append(samples)
            self.played_real.append(samples[:real])
        self.stats.callback.append(time.perf_counter() - t0)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        rate = self.device_rate
        self.input = open_stream("input", self.input_device, self._on_input, sample_rate=rate)
        try:
            self.output = open_stream("output", self.output_device, self._on_output,
                                      sample_rate=rate)
        except AudioError:
            self.input.stream.close()
            raise
        in_rate, out_rate = self.input.sample_rate, self.output.sample_rate
        self.rates = (in_rate, out_rate)
        self.in_queue = BlockQueue(max_samples=(self.max_backlog + 1) * FRAME_SIZE * in_rate
                                   // SAMPLE_RATE)
        self.out_fifo = SampleFifo(capacity=self.max_output_frames * FRAME_SIZE * out_rate
                                   // SAMPLE_RATE)
        self._to_engine = StreamResampler(in_rate, SAMPLE_RATE)
        self._to_speaker = StreamResampler(SAMPLE_RATE, out_rate)
        self.stats.device_latency = float(self.input.stream.latency) + float(
            self.output.stream.latency)
        self._stop.clear()
        if self.executor is not None:
            self._worker = self.executor.submit(self._work)
        else:
            self._worker = threading.Thread(target=self._work, name="moshi-worker", daemon=True)
            self._worker.start()
        try:
            self.output.stream.start()
            self.input.stream.start()
        except Exception as exc:
            self.close()
            raise AudioError(f"cannot start the audio streams: {exc}") from None

    def stop(self) -> None:
        self._stop.set()
        if self.in_queue is not None:
            self.in_queue.wake()

    def close(self) -> None:
        """Stop the worker and the streams; leaves the recording valid. Safe to call twice."""
        self.stop()
        for opened in (self.input, self.output):
            if opened is not None:  # a failing stream must not keep the rest from closing
                with contextlib.suppress(Exception):
                    opened.stream.stop()
                with contextlib.suppress(Exception):
                    opened.stream.close()
        self.input = self.output = None
        if isinstance(self._worker, threading.Thread):
            self._worker.join(timeout=30)
        elif self._worker is not None:
            with contextlib.suppress(TimeoutError, FutureTimeout):
                self._worker.result(timeout=30)
        self._worker = None
        if self.record is not None:
            with self._record_lock:  # a step still running past the join writes nothing more
                self.record.close()
        if self.in_queue is not None:
            self.unread_samples = len(self.in_queue)
            self.stats.skipped_input_frames += self.in_queue.dropped_samples * SAMPLE_RATE // (
                max(1, self._to_engine.src) * FRAME_SIZE)
            self.in_queue.dropped_samples = 0
        if self.out_fifo is not None:
            ratio = self._to_speaker.dst / SAMPLE_RATE
            self.stats.dropped_output_frames = int(
                self.out_fifo.dropped_samples / (FRAME_SIZE * ratio))
            self.stats.underrun_frames = int(self.out_fifo.underrun_samples / (FRAME_SIZE * ratio))
        self.display.finish()

    def run(self, duration: float | None = None) -> LoopStats:
        """Start, wait for `duration` seconds (None: until Ctrl-C or stop()), close."""
        try:
            self.start()
        except BaseException:
            if self.record is not None:  # leave a valid (empty) recording behind
                self.record.close()
            raise
        try:
            deadline = None if duration is None else time.monotonic() + duration
            while not self._stop.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                self._stop.wait(0.05)
        except KeyboardInterrupt:
            pass
        finally:
            self.close()
        if self._worker_error is not None:
            raise self._worker_error
        return self.stats

    # ---- worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._work_loop()
        except BaseException as exc:  # surfaced by run()
            self._worker_error = exc
            self._stop.set()

    def _work_loop(self) -> None:
        framer = Framer(FRAME_SIZE)
        frames: list[tuple[np.ndarray, float]] = []
        while not self._stop.is_set():
            for block, captured_at in self.in_queue.get_all(timeout=0 if frames else 0.1):
                frames.extend(framer.push(self._to_engine(block), captured_at))
            self.backlog_seen.append(len(frames))
            if len(frames) > self.max_backlog:
                skip = len(frames) - self.max_backlog
                self.stats.skipped_input_frames += skip
                frames = frames[skip:]
            if not frames:
                continue
            pcm, captured_at = frames.pop(0)
            self._process(pcm, captured_at)
        self.pending_frames = len(frames)
        self.pending_samples = framer.pending

    def _process(self, pcm: np.ndarray, captured_at: float) -> None:
        t0 = time.perf_counter()
        out = self.engine.process(pcm)
        speaker = self._to_speaker(out.pcm)
        self.out_fifo.write(speaker, marker=captured_at)
        total = time.perf_counter() - t0
        late = time.monotonic() - captured_at > self.late_after
        self.stats.add_frame(out.timings, total, late)
        if self.keep_audio:
            self.produced.append(speaker)
            self.captured.append(pcm)
        if self.record is not None:
            with self._record_lock:
                if not self.record.closed:
                    self.record.write(out.pcm, pcm)
        self.display.text(out.text)
        if late:
            self.display.lagging(
                f"{self.stats.late_frames} late frames, last took "
                f"{total * 1000:.0f} ms for {self.frame_seconds * 1000:.0f} ms of audio"
            )
