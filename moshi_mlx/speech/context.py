"""Earlier conversation turns for CSM: a JSON context file, or audio files with their texts.

A context file is a JSON list of turns {"speaker": 0, "text": "...", "audio": "turn.wav"} or
{..., "codes": "turn.npy"}; the paths are relative to the JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moshi_mlx.errors import MoshiError

if TYPE_CHECKING:
    from moshi_mlx.speech.generate import Segment

TURN_KEYS = {"speaker", "text", "audio", "codes"}


def as_int(value: object, what: str) -> int:
    """An int given as an int or as text (a bool is refused); `what` names it in the error."""
    if isinstance(value, bool):
        raise MoshiError(f"{what} must be an int, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise MoshiError(f"{what} must be an int, got {value!r}") from None


def read_context_file(path: Path) -> list[Segment]:
    """The turns of a context JSON file, their audio read or their codes loaded."""
    try:
        turns = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoshiError(f"{path}: cannot read the context JSON ({exc})") from None
    if not isinstance(turns, list):
        raise MoshiError(f"{path}: expected a JSON list of turns")
    return [read_turn(turn, path.parent, f"{path}: turn {i}") for i, turn in enumerate(turns)]


def read_turn(turn: object, folder: Path, where: str) -> Segment:
    """One turn {"speaker", "text", "audio" or "codes"} (paths relative to `folder`), its
    audio read or its codes loaded; `where` names it in the errors."""
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.speech.generate import Segment

    if not isinstance(turn, dict) or not {"speaker", "text"} <= turn.keys():
        raise MoshiError(f"{where} needs 'speaker' and 'text'")
    extra = set(turn) - TURN_KEYS
    if extra:
        raise MoshiError(f"{where} has unknown keys {sorted(extra)}")
    speaker = as_int(turn["speaker"], f"{where} speaker")
    audio = codes = None
    if turn.get("audio"):
        audio = read_audio(folder / turn["audio"])
    if turn.get("codes"):
        from moshi_mlx.audio.codes import load_codes

        codes = load_codes(folder / turn["codes"])
    return Segment(speaker, str(turn["text"]), audio=audio, codes=codes)


def audio_turns(audio: Sequence[Path | np.ndarray], texts: Sequence[str],
                speakers: Sequence[int]) -> list[Segment]:
    """One turn per audio file (or 24 kHz mono samples already read), with its transcript and
    speaker (the three paired in order)."""
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.speech.generate import Segment

    return [Segment(speaker, text,
                    audio=item if isinstance(item, np.ndarray) else read_audio(item))
            for item, text, speaker in zip(audio, texts, speakers, strict=True)]
