"""A transcript as text, JSON, SRT or WebVTT subtitles (word times in seconds of the input)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moshi_mlx.transcription.transcriber import Transcript

FORMATS = ("text", "json", "srt", "vtt")


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitle_cues(transcript: Transcript, max_words: int = 12, max_seconds: float = 5.0,
                  max_gap: float = 1.0) -> list[tuple[float, float, str]]:
    """Words grouped into cues: a new cue after a pause, an end of turn, or a long line."""
    cues: list[tuple[float, float, str]] = []
    turns = sorted(transcript.end_of_turn)
    current: list = []

    def close() -> None:
        if current:
            cues.append((current[0].start, max(current[-1].end, current[0].start + 0.04),
                         " ".join(w.word for w in current)))
            current.clear()

    for word in transcript.words:
        if current and (len(current) >= max_words or word.end - current[0].start > max_seconds
                        or word.start - current[-1].end > max_gap
                        or any(current[-1].end <= t < word.start for t in turns)):
            close()
        current.append(word)
    close()
    return cues


def render(transcript: Transcript, fmt: str) -> str:
    """The transcript in one of FORMATS, ending with a newline."""
    if fmt == "json":
        return json.dumps(transcript.to_json_dict(), ensure_ascii=False, indent=2) + "\n"
    if fmt == "text":
        return transcript.text + "\n"
    cues = subtitle_cues(transcript)
    if fmt == "srt":
        return "".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n\n"
                       for i, (a, b, text) in enumerate(cues, 1))
    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n\n"
                                  for a, b, text in cues)
