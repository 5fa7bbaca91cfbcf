"""File mode: the same frame loop on a recording, without devices, as fast as possible.

The output WAV has exactly the input's length (the last partial frame is zero-padded for the
model and trimmed on output); it is written frame by frame, so an interrupted run leaves a
valid file with everything produced so far.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from moshi_mlx.audio.display import TextDisplay
from moshi_mlx.audio.io import read_audio
from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.audio.recorder import TranscriptWriter, WavWriter
from moshi_mlx.audio.stats import LoopStats


def run_file(
    engine: Any,
    input_file: str | Path,
    output_file: str | Path | None,
    transcript: str | Path | None = None,
    stereo: bool = False,
    display: TextDisplay | None = None,
    max_frames: int | None = None,
) -> LoopStats:
    """Run `engine` over `input_file` frame by frame; write Moshi's audio (left) and, with
    `stereo`, the user's audio (right) to `output_file`, and the timed text to `transcript`."""
    display = display or TextDisplay()
    user = read_audio(input_file, SAMPLE_RATE)
    frame_seconds = FRAME_SIZE / SAMPLE_RATE
    stats = LoopStats(frame_seconds=frame_seconds, latency_estimated=True)
    num_frames = -(-len(user) // FRAME_SIZE)
    if max_frames is not None:
        num_frames = min(num_frames, max_frames)
    writer = WavWriter(output_file, channels=2 if stereo else 1) if output_file else None
    text_out = TranscriptWriter(transcript, frame_seconds) if transcript else None
    try:
        for index in range(num_frames):
            chunk = user[index * FRAME_SIZE : (index + 1) * FRAME_SIZE]
            valid = len(chunk)
            pcm = np.zeros(FRAME_SIZE, dtype=np.float32)
            pcm[:valid] = chunk
            t0 = time.perf_counter()
            out = engine.process(pcm)
            total = time.perf_counter() - t0
            # "late" here: this frame would have missed its slot in a real-time conversation
            stats.add_frame(out.timings, total, late=total > frame_seconds)
            # mic-to-speaker in real time would be: the frame's own 80 ms of capture + compute
            stats.latency.append(frame_seconds + total)
            if writer is not None:
                channels = (out.pcm[:valid], pcm[:valid]) if stereo else (out.pcm[:valid],)
                writer.write(*channels)
            if text_out is not None:
                text_out.add(index, out.text)
            display.text(out.text)
    except KeyboardInterrupt:
        pass
    finally:
        if writer is not None:
            writer.close()
        if text_out is not None:
            text_out.close()
        display.finish()
    return stats
