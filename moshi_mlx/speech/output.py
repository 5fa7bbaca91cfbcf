"""Where generated speech goes: a whole WAV clip (watermarked when silentcipher loads), a WAV
written frame by frame, or the speaker as the frames come. Ctrl-C keeps what was decoded."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import MoshiError


def watermarked(audio: np.ndarray) -> np.ndarray:
    """The whole clip marked as Sesame marks its output when silentcipher can be loaded;
    otherwise unchanged, with a one-line note (the audio is written either way)."""
    from moshi_mlx.speech.watermark import WatermarkUnavailable, load_watermarker

    try:
        watermarker = load_watermarker()
    except WatermarkUnavailable as exc:
        print(f"note: audio not watermarked ({exc})", file=sys.stderr)
        return audio
    marked = watermarker.apply(audio, SAMPLE_RATE)
    print("watermarked with silentcipher (Sesame's key)", file=sys.stderr)
    return marked


def write_clip(path: Path, audio: np.ndarray, watermark: bool) -> None:
    from moshi_mlx.audio.io import write_audio

    write_audio(path, watermarked(audio) if watermark else audio)


def open_wav(path: Path):
    """A 24 kHz mono float WAV open for writing (MoshiError, one line, when it cannot be)."""
    import soundfile

    try:
        return soundfile.SoundFile(str(path), "w", samplerate=SAMPLE_RATE, channels=1,
                                   subtype="FLOAT", format="WAV")
    except Exception as exc:
        raise MoshiError(f"{path}: cannot write audio ({exc})") from None


def write_streaming(path: Path, frames: Iterable[np.ndarray], mimi) -> list[np.ndarray]:
    """Decode and append each frame as it comes (a tail trimmed by the silence rule is never
    written); the file is closed (valid) on Ctrl-C too. Returns the frames written."""
    from moshi_mlx.speech.generate import stream_decoded

    out = open_wav(path)
    written: list[np.ndarray] = []
    try:
        for frame, pcm in stream_decoded(mimi, frames):
            out.write(pcm)
            out.flush()
            written.append(frame)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {path} holds the first {len(written)} frames", file=sys.stderr)
    finally:
        out.close()
    return written


def decode_all(frames: Iterable[np.ndarray], mimi) -> tuple[list[np.ndarray], np.ndarray]:
    """(frames kept, their audio) decoded as they come, so the stop rules hear the audio and
    a trimmed silent tail is left out of both."""
    from moshi_mlx.speech.generate import stream_decoded

    kept, pcms = [], []
    for frame, pcm in stream_decoded(mimi, frames):
        kept.append(frame)
        pcms.append(pcm)
    return kept, np.concatenate(pcms) if pcms else np.zeros(0, np.float32)


def play(frames: Iterable[np.ndarray], mimi, device: str | int | None, prebuffer: float,
         wav: Path | None = None, stream_wav: bool = False, watermark: bool = True
         ) -> list[np.ndarray]:
    """Decode each frame as it comes and queue it for the speaker (and for `wav`: written
    frame by frame with stream_wav, else at the end with what was played, watermarked when
    `watermark`; a tail trimmed by the silence rule is played, being quiet, but not written).
    Ctrl-C stops at once. Returns the frames kept."""
    from moshi_mlx.audio.player import StreamPlayer
    from moshi_mlx.speech.generate import stream_decoded

    kept: list[np.ndarray] = []
    pcms: list[np.ndarray] = []
    played = 0
    out = open_wav(wav) if wav is not None and stream_wav else None
    player = StreamPlayer(device, prebuffer=prebuffer)

    def to_speaker(pcm: np.ndarray) -> None:
        nonlocal played
        player.write(pcm)
        played += 1

    try:
        player.open()
        print(f"playing on {player.name}", file=sys.stderr, flush=True)
        for frame, pcm in stream_decoded(mimi, frames, on_audio=to_speaker):
            kept.append(frame)
            pcms.append(pcm)
            if out is not None:
                out.write(pcm)
                out.flush()
        player.finish()
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(kept)} frames", file=sys.stderr)
    finally:
        player.close()
        if out is not None:
            out.close()
    if wav is not None and not stream_wav:
        audio = np.concatenate(pcms) if pcms else np.zeros(0, np.float32)
        write_clip(wav, audio, watermark)
    print(player.stats.summary_line(), file=sys.stderr)
    return kept
