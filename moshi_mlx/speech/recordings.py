"""A voice from one recording: its speech checked, its transcript from Kyutai STT when none is
given, its audio encoded to Mimi codes once. `tts --context-audio` without `--context-text`
and `tts --save-voice` stand on these.

No speech: a recording holds speech when one of its 80 ms frames reaches
`stopping.SILENCE_LEVEL_DB` RMS, the level under which CSM's silence rule calls audio quiet,
and its transcript (stripped) is not empty. The level is checked first: it needs no model, and
an STT model may emit words on pure silence (the random test fixture does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE
from moshi_mlx.errors import MoshiError
from moshi_mlx.speech.generate import Segment, encode_context_audio
from moshi_mlx.speech.stopping import SILENCE_LEVEL_DB

if TYPE_CHECKING:
    from moshi_mlx.transcription.transcriber import Transcriber


def loudest_frame_db(pcm: np.ndarray) -> float:
    """The RMS level in dBFS of the loudest 80 ms frame of `pcm` (-inf when silent or empty)."""
    samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if samples.size == 0:
        return -np.inf
    frames = np.zeros(-(-samples.size // FRAME_SIZE) * FRAME_SIZE, np.float32)
    frames[: samples.size] = samples
    power = np.mean(np.square(frames.reshape(-1, FRAME_SIZE), dtype=np.float64), axis=1)
    loudest = float(power.max())
    return 10.0 * np.log10(loudest) if loudest > 0 else -np.inf


def check_speech(pcm: np.ndarray, where: str) -> np.ndarray:
    """`pcm`, unless no frame of it reaches the speech level (MoshiError naming `where`)."""
    level = loudest_frame_db(pcm)
    if not level >= SILENCE_LEVEL_DB:
        heard = "no samples" if np.asarray(pcm).size == 0 else \
            "all zeros" if level == -np.inf else f"loudest 80 ms at {level:.0f} dBFS"
        raise MoshiError(f"{where}: no speech in the recording ({heard}; speech reaches "
                         f"{SILENCE_LEVEL_DB:.0f} dBFS): record the voice again")
    return pcm


def transcribe_recordings(transcriber: Transcriber, pcms: Sequence[np.ndarray],
                          names: Sequence[str]) -> list[str]:
    """The transcripts (stripped) of 24 kHz mono recordings, one batch through `transcriber`;
    a recording without speech (by level, or an empty transcript) is refused, named by its
    entry in `names`."""
    if len(pcms) != len(names):
        raise ValueError("one name per recording")
    if not pcms:
        return []
    for pcm, name in zip(pcms, names, strict=True):
        check_speech(pcm, name)
    transcripts = transcriber.transcribe_pcm(list(pcms))
    texts = [transcript.text.strip() for transcript in transcripts]
    for text, name in zip(texts, names, strict=True):
        if not text:
            raise MoshiError(f"{name}: no speech in the recording (the transcript is empty): "
                             "record the voice again, or give its text")
    return texts


def voice_from_recording(recording: str | os.PathLike | np.ndarray, text: str | None = None, *,
                         speaker: int = 0, transcriber: Transcriber | None = None,
                         mimi=None, num_codebooks: int = 32) -> Segment:
    """A voice (one context turn) from a recording: an audio file or 24 kHz mono samples.

    text: what the recording says; None: transcribed by `transcriber` (a
    moshi_mlx.transcription Transcriber, e.g. from `load_transcriber()`). mimi: CSM's Mimi,
    to encode the audio once (the Segment then holds codes [num_codebooks, frames], ready for
    `speech.voices.save_voice` or as context); None keeps the audio. A recording without
    speech is refused (MoshiError)."""
    from moshi_mlx.audio.io import read_audio

    name = str(recording) if isinstance(recording, (str, os.PathLike)) else "recording"
    pcm = read_audio(Path(recording)) if isinstance(recording, (str, os.PathLike)) \
        else np.asarray(recording, dtype=np.float32).reshape(-1)
    check_speech(pcm, name)
    if text is None:
        if transcriber is None:
            raise MoshiError(f"{name}: give the recording's text, or a transcriber to hear it")
        text = transcribe_recordings(transcriber, [pcm], [name])[0]
    segment = Segment(speaker, text, audio=pcm)
    return segment if mimi is None else encode_context_audio(mimi, segment, num_codebooks)
