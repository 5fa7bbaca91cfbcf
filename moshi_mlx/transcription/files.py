"""Whole inputs through a Transcriber: audio files as one batch (with a progress line and
the real-time factor on stderr) and stored Mimi codes."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moshi_mlx.audio.codes import load_codes
from moshi_mlx.audio.rates import FRAME_RATE, SAMPLE_RATE
from moshi_mlx.errors import MoshiError
from moshi_mlx.transcription.live import print_events
from moshi_mlx.transcription.transcriber import Transcriber, Transcript, transcript_from_events


class Progress:
    """Progress with the real-time factor on stderr (redrawn in place on a terminal)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: float, total: float) -> None:
        if not self.tty:
            return
        spent = time.perf_counter() - self.start
        sys.stderr.write(f"\r{100 * done / total:5.1f}%  {done:.1f}/{total:.1f} s of audio, "
                         f"{done / max(spent, 1e-9):.2f}x real time")
        sys.stderr.flush()

    def finish(self, audio_seconds: float, streams: int) -> None:
        spent = time.perf_counter() - self.start
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write(
            f"{streams} stream(s), {audio_seconds:.1f} s of audio each at most, in {spent:.1f} s: "
            f"real-time factor {spent / max(audio_seconds, 1e-9):.3f} "
            f"({audio_seconds / max(spent, 1e-9):.2f}x real time)\n")


def transcribe_files(transcriber: Transcriber, pcms: Sequence[np.ndarray],
                     print_text: bool) -> list[Transcript]:
    """24 kHz mono inputs as one batch. print_text (one input): its text goes to stdout as it
    is transcribed, and stands in for the progress line."""
    progress = Progress()
    on_events = None
    if print_text:

        def on_events(events) -> None:
            print_events(events, sys.stdout, mark_turns=False)

        progress.tty = False  # the text is the progress
    transcripts = transcriber.transcribe_pcm(pcms, chunk_frames=4, progress=progress,
                                             on_events=on_events)
    if print_text:
        sys.stdout.write("\n")
    progress.finish(max(len(p) for p in pcms) / SAMPLE_RATE, len(pcms))
    return transcripts


def load_stt_codes(path: Path, n_q: int) -> np.ndarray:
    """Mimi codes [n_q, T] for the STT model (audio.codes.load_codes, plus the codebook count)."""
    codes = load_codes(path)
    if codes.shape[0] != n_q:
        raise MoshiError(f"{path} holds {codes.shape[0]} codebooks; the STT model reads {n_q}")
    return codes


def transcribe_codes(transcriber: Transcriber, codes: np.ndarray) -> Transcript:
    """Mimi codes [n_q, T] as one stream: no silence prefix; the flush pushes the tail."""
    transcriber.reset(1)
    events = transcriber.feed_codes(codes) + transcriber.flush()
    return transcript_from_events(events, transcriber.stream_text(0), codes.shape[1] / FRAME_RATE,
                                  transcriber.text_time)
