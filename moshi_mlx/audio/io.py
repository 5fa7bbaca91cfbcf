"""WAV (and other soundfile formats) in and out, at Mimi's 24 kHz mono."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import AudioError


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample float audio (T,) or (T, C) from src_rate to dst_rate with soxr (high quality)."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if src_rate == dst_rate:
        return pcm
    if src_rate <= 0 or dst_rate <= 0:
        raise AudioError(f"invalid sample rates {src_rate} -> {dst_rate}")
    import soxr

    return soxr.resample(pcm, src_rate, dst_rate, quality="HQ").astype(np.float32, copy=False)


def read_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono (T,) at `sample_rate` (channels are averaged).

    Raises AudioError for a missing, unreadable or empty file, or one holding NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    return decode_audio(str(path), str(path), sample_rate)


def decode_audio_bytes(data: bytes, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`read_audio` for a file's bytes (an upload): any format soundfile reads. `name` is what
    the error messages call it."""
    return decode_audio(io.BytesIO(data), name, sample_rate)


def decode_audio(source: str | BinaryIO, name: str, sample_rate: int = SAMPLE_RATE
                 ) -> np.ndarray:
    """A path or a binary file object decoded as float32 mono (T,) at `sample_rate`."""
    data, rate = _decode_channels(source, name)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return resample(mono, rate, sample_rate)


def read_audio_channels(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE
                        ) -> tuple[np.ndarray, int]:
    """Read an audio file keeping its channels: (float32 (T, C) at `sample_rate`, the file's
    own rate). Raises AudioError as `read_audio` does."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    data, rate = _decode_channels(str(path), str(path))
    return resample(data, rate, sample_rate), rate


def _decode_channels(source: str | BinaryIO, name: str) -> tuple[np.ndarray, int]:
    """float32 (T, C) and the rate of a path or binary file object, checked."""
    import soundfile

    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(source, str) and reason.startswith("Error opening <"):
            reason = reason.split(">: ", 1)[-1]  # not the file object's repr
        raise AudioError(f"{name}: cannot read audio ({reason})") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"{name}: the audio file holds no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{name}: the audio holds NaN or infinite samples")
    return data, int(rate)


def write_audio(
    path: str | os.PathLike, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE
) -> None:
    """Write float audio (T,) or (T, C) as a WAV file (float32 samples, -1..1 nominal range).

    The data goes to a temporary file in the same folder first and is renamed into place, so a
    reader never sees a half-written file.
    """
    import soundfile

    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim not in (1, 2):
        raise AudioError(f"audio to write must be (T,) or (T, C), got shape {pcm.shape}")
    if not np.isfinite(pcm).all():
        raise AudioError(f"{path}: refusing to write NaN or infinite samples")
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise AudioError(f"{path}: folder {folder} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        soundfile.write(tmp_name, pcm, sample_rate, subtype="FLOAT", format="WAV")
        os.replace(tmp_name, path)
    except Exception as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise AudioError(f"{path}: cannot write audio ({exc})") from None
