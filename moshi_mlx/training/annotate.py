"""Word alignments for Moshi's fine-tuning data, from our Kyutai STT (moshi-finetune's
annotate.py uses whisper-timestamped on the left channel only).

For every stereo file of a data `.jsonl`, both channels are transcribed as one batch of two
streams; the `.json` beside the audio gets moshi-finetune's format,
`{"alignments": [[word, [start, end], speaker], ...]}` in start order, the left channel's
words as `SPEAKER_MAIN` (Moshi: the only ones its Interleaver keeps), the right channel's as
`SPEAKER_OTHER`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moshi_mlx.errors import AudioError, TrainingDataError
from moshi_mlx.training.moshi_data import MAIN_SPEAKER, OTHER_SPEAKER, read_jsonl

CHANNEL_SPEAKERS = (MAIN_SPEAKER, OTHER_SPEAKER)  # left, right


def alignments_of(transcripts: list[Any]) -> list[list]:
    """Transcripts of the left and right channels -> moshi-finetune's alignments, in start
    order (the left channel first among equal starts)."""
    rows = []
    for transcript, speaker in zip(transcripts, CHANNEL_SPEAKERS, strict=True):
        rows += [[w.word, [round(w.start, 3), round(w.end, 3)], speaker]
                 for w in transcript.words]
    return sorted(rows, key=lambda row: row[1][0])


def annotate_file(audio_path: str | Path, transcriber: Any) -> list[list]:
    """The alignments of one stereo file (left Moshi, right the user)."""
    from moshi_mlx.audio.io import read_audio_channels

    try:
        pcm, _ = read_audio_channels(audio_path)
    except AudioError as exc:
        raise TrainingDataError(str(exc)) from None
    if pcm.shape[1] != 2:
        raise TrainingDataError(f"{audio_path}: {pcm.shape[1]} channel(s); Moshi's data are "
                                "stereo (left Moshi, right the user)")
    transcripts = transcriber.transcribe_pcm([pcm[:, 0].copy(), pcm[:, 1].copy()])
    return alignments_of(transcripts)


def write_alignments(path: Path, alignments: list[list]) -> None:
    """Write the .json whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"alignments": alignments}, ensure_ascii=False),
                         encoding="utf-8")
    os.replace(temporary, path)


def annotate_jsonl(jsonl: str | Path, transcriber: Any, overwrite: bool = False,
                   notice: Callable[[str], None] = print) -> list[Path]:
    """Write the alignments .json of every file of a data `.jsonl` (kept when it exists,
    unless `overwrite`). Returns the files written."""
    written = []
    entries = read_jsonl(jsonl)
    for number, entry in enumerate(entries, 1):
        target = entry.path.with_suffix(".json")
        if target.exists() and not overwrite:
            notice(f"[{number}/{len(entries)}] {target} exists, kept")
            continue
        alignments = annotate_file(entry.path, transcriber)
        write_alignments(target, alignments)
        written.append(target)
        notice(f"[{number}/{len(entries)}] {target}: {len(alignments)} words")
    return written
