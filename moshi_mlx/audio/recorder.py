"""WAV files written frame by frame, flushed after each write.

libsndfile rewrites the WAV header on every flush, so a run that is interrupted (Ctrl-C, a
crash, a killed process after the last flush) still leaves a valid file holding everything
written so far.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import AudioError


class WavWriter:
    def __init__(self, path: str | Path, channels: int = 1, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.channels = channels
        self.frames_written = 0
        try:
            self._file = sf.SoundFile(
                str(self.path), "w", samplerate=sample_rate, channels=channels,
                format="WAV", subtype="PCM_16",
            )
        except (sf.LibsndfileError, OSError) as exc:
            raise AudioError(f"cannot write {self.path}: {exc}") from None

    def write(self, *channels: np.ndarray) -> None:
        """Write one block: one array per channel (same length), float32 in [-1, 1]."""
        if len(channels) != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {len(channels)}")
        data = np.stack([np.asarray(c, dtype=np.float32).reshape(-1) for c in channels], axis=1)
        self._file.write(np.clip(data, -1.0, 1.0))
        self._file.flush()
        self.frames_written += len(data)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> WavWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TranscriptWriter:
    """Moshi's text with timestamps: one line per word, `start_seconds<TAB>word`, flushed as it
    goes so an interrupted run keeps what was said."""

    def __init__(self, path: str | Path, frame_seconds: float = 0.08):
        self.path = Path(path)
        self.frame_seconds = frame_seconds
        try:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise AudioError(f"cannot write {self.path}: {exc}") from None
        self._word = ""
        self._start = 0.0

    def add(self, frame_index: int, piece: str | None) -> None:
        if not piece:
            return
        if piece.startswith(" ") and self._word:
            self._emit()
        if not self._word:
            self._start = frame_index * self.frame_seconds
        self._word += piece
        if not self._word.strip():
            self._word = ""

    def _emit(self) -> None:
        word = self._word.strip()
        if word:
            self._file.write(f"{self._start:.2f}\t{word}\n")
            self._file.flush()
        self._word = ""

    def close(self) -> None:
        if not self._file.closed:
            self._emit()
            self._file.close()
