"""Words and their times from Kyutai STT text tokens.

The STT text stream holds PAD (3) while nothing new is said, EPAD (0) right before a word
starts ("end of padding"), and sentencepiece pieces. Two official readings exist and both
are here:

- `WordTracker`: streaming, the moshi-core `asr.rs` logic (Rust server, stt-rs): a PAD or
  EPAD closes the pending pieces into a word that starts at the last EPAD's time; an EPAD also
  ends the word before it. Times come from a step -> seconds function, so the same tracker
  gives the Rust times or ours (`Transcriber`: step time - silence prefix - delay).
- `segment_words`: offline, the DSM `tokens_to_timestamped_text` logic (scripts that print
  per-word timestamps): the words between two EPADs share that segment by token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from moshi_mlx.audio.rates import FRAME_RATE

EPAD = 0
PAD = 3


@dataclass(frozen=True)
class Word:
    """A complete word of `stream` and its start time, emitted at `step` (the step whose PAD or
    EPAD closed it); `tokens`: its sentencepiece pieces."""

    stream: int
    text: str
    start: float
    step: int
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class WordEnd:
    """The last word of `stream` ended at `end` (an EPAD at `step`)."""

    stream: int
    end: float
    step: int


class WordTracker:
    """Streaming word boundaries (moshi-core `asr.rs` logic) of one stream.

    time_of(step) -> seconds of a step; steps before `first_step` are ignored (the text of
    those steps lies before the start of the audio). decode(tokens) -> the word's text.
    stream: the stream number its events carry.
    """

    def __init__(self, time_of: Callable[[int], float], first_step: int = 0,
                 decode: Callable[[Sequence[int]], str] | None = None, stream: int = 0) -> None:
        self.time_of = time_of
        self.first_step = first_step
        self.decode = decode or (lambda tokens: "")
        self.stream = stream
        self.pending: list[int] = []
        self.last_stop = 0.0
        self.word_open = False  # a Word was emitted and no WordEnd yet

    def push(self, token: int, step: int) -> list[Word | WordEnd]:
        if step < self.first_step:
            return []
        if token not in (PAD, EPAD):
            self.pending.append(int(token))
            return []
        events: list[Word | WordEnd] = self._close(step)
        if token == EPAD:
            stop = self.time_of(step)
            if self.word_open:
                events.append(WordEnd(self.stream, stop, step))
                self.word_open = False
            self.last_stop = stop
        return events

    def finish(self, step: int) -> list[Word | WordEnd]:
        """End of the stream: the pending pieces (if any) make a last word."""
        return self._close(step)

    def _close(self, step: int) -> list[Word | WordEnd]:
        if not self.pending:
            return []
        tokens = tuple(self.pending)
        self.pending = []
        self.word_open = True
        return [Word(self.stream, self.decode(tokens), self.last_stop, step, tokens)]


def timed_words(events: Sequence[Word | WordEnd], time_of: Callable[[int], float]
                ) -> list[tuple[str, float, float]]:
    """(text, start, end) per word of a tracker's events: the end is the WordEnd right after
    the word, else (another word followed first, or the stream ended) its closing step. Words
    closed by PAD share their EPAD's start time in the events; here each starts no earlier
    than the word before ends, so the times never go back."""
    words: list[tuple[str, float, float]] = []
    previous_end = 0.0
    for i, event in enumerate(events):
        if not isinstance(event, Word):
            continue
        following = events[i + 1] if i + 1 < len(events) else None
        end = following.end if isinstance(following, WordEnd) else time_of(event.step)
        start = max(event.start, previous_end)
        previous_end = max(end, start)
        words.append((event.text, start, previous_end))
    return words


def segment_words(tokens: Sequence[int], tokenizer: Any, offset_seconds: float,
                  frame_rate: float = FRAME_RATE, padding_id: int = PAD
                  ) -> list[tuple[str, float, float]]:
    """DSM logic: (word, start, end) from a whole token sequence. A segment runs from the step
    after an EPAD to the next EPAD (the last one to `</s>` or at most frame_rate steps);
    several words in one segment take as many steps as they have tokens, the last one the
    rest. Times are step / frame_rate - offset_seconds, clamped at 0. Words before the first
    EPAD are dropped, as officially."""
    tokens = [int(t) for t in tokens]
    boundaries = [i for i, t in enumerate(tokens) if t == EPAD]
    words: list[tuple[str, float, float]] = []

    def seconds(step: float) -> float:
        return max(0.0, step / frame_rate - offset_seconds)

    def add_segment(start: int, end: float) -> None:
        kept = [t for t in tokens[start:math.ceil(end)] if t > padding_id]
        text = tokenizer.decode(kept)
        parts = text.split()
        if len(parts) == 1:
            words.append((text, seconds(start), seconds(end)))
            return
        for i, part in enumerate(parts):
            if i == len(parts) - 1:
                words.append((part, seconds(start), seconds(end)))
            else:
                count = len(tokenizer.encode(part))
                words.append((part, seconds(start), seconds(start + count)))
                start += count

    for here, after in zip(boundaries[:-1], boundaries[1:], strict=True):
        add_segment(here + 1, after)
    if boundaries:
        start = boundaries[-1] + 1
        eos = tokenizer.eos_id()
        ends = [i for i in range(start, len(tokens)) if tokens[i] == eos]
        add_segment(start, ends[0] if ends else min(len(tokens), start + frame_rate))
    return words
