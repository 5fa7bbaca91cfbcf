"""One Kyutai STT stream's reading of the LM outputs: text pieces, words, end of turn, flush.

Shared by `Transcriber` (a batch of streams that start together) and `SttSlots` (streams that
come and go in a fixed pool): both run the model and hand each stream's text token and VAD
probabilities of every step to that stream's `StreamDecoder`.

Times are seconds of the stream's input audio (`SttTiming`): every stream starts with
`audio_silence_prefix_seconds` of silence, and the text stream is trained
`audio_delay_seconds` behind the audio, so at the end of the input at least
ceil(audio_delay_seconds * 12.5) + 1 silent frames are pushed for the last words to come out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moshi_mlx.audio.rates import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.models.lm_config import SttConfig
from moshi_mlx.transcription.words import EPAD, PAD, Word, WordEnd, WordTracker

VAD_END_OF_TURN_HEAD = 2  # horizon 2 s (Unmute and the official scripts use this head)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class TextPiece:
    """Newly transcribed text (a sentencepiece piece, leading space = new word)."""

    stream: int
    text: str
    time: float
    step: int


@dataclass(frozen=True)
class EndOfTurn:
    """The VAD head predicts a pause: probability of no voice activity > threshold."""

    stream: int
    time: float
    step: int
    probability: float


@dataclass(frozen=True)
class Flushed:
    """The input of `stream` ended (after `duration` s) and every word is out."""

    stream: int
    duration: float
    step: int


Event = TextPiece | Word | WordEnd | EndOfTurn | Flushed


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class SttTiming:
    """Step <-> seconds of input audio for a checkpoint's `stt_config`."""

    prefix_seconds: float
    delay_seconds: float

    @classmethod
    def of(cls, config: SttConfig) -> SttTiming:
        return cls(config.audio_silence_prefix_seconds, config.audio_delay_seconds)

    @property
    def prefix_samples(self) -> int:
        return int(self.prefix_seconds * SAMPLE_RATE)

    @property
    def flush_frames(self) -> int:
        return math.ceil(self.delay_seconds * FRAME_RATE) + 1

    @property
    def text_lag(self) -> float:
        return self.prefix_seconds + self.delay_seconds

    @property
    def first_text_step(self) -> int:
        """Text of earlier steps lies before the start of the input."""
        return math.ceil(self.text_lag * FRAME_RATE - 1e-9)

    def text_time(self, step: int) -> float:
        """Seconds of input audio of a text token emitted at `step` (the step that emits it
        has seen the audio up to step / 12.5 s)."""
        return max(0.0, step / FRAME_RATE - self.text_lag)

    def audio_time(self, step: int) -> float:
        """Seconds of input audio seen when `step` runs."""
        return max(0.0, step / FRAME_RATE - self.prefix_seconds)

    def end_step(self, input_samples: int) -> int:
        """The step at which a stream of `input_samples` samples has seen its input, its
        prefix and its flush frames."""
        return math.ceil((self.prefix_samples + input_samples) / FRAME_SIZE) + self.flush_frames


@dataclass(frozen=True)
class EndOfTurnRule:
    """VAD head `head`, class 0 above `threshold`: fires once, and again only after new text
    and a drop below `rearm` (threshold - hysteresis)."""

    head: int = VAD_END_OF_TURN_HEAD
    threshold: float = 0.5
    rearm: float = 0.4


def text_piece(tokenizer: Any, token: int) -> str:
    """The text of a sentencepiece token ("" for control / unknown / out-of-vocabulary)."""
    if (token >= tokenizer.get_piece_size() or tokenizer.is_control(token)
            or tokenizer.is_unknown(token)):
        return ""
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


# --------------------------------------------------------------------------- one stream


@dataclass(eq=False)
class StreamDecoder:
    """Events of one stream from its text token and VAD probabilities, step by step.

    `handle(step, token, vad)` for every step (step 0 = the official initial step), then
    `close(step, duration)` once `due(step)` (or at the end of a batch): the pending word
    comes out and `Flushed`.
    """

    stream: int
    timing: SttTiming
    tokenizer: Any
    end_of_turn: EndOfTurnRule
    tokens: list[int] = field(default_factory=list)
    has_text: bool = False  # text since the last end of turn
    below: bool = True  # VAD fell below the re-arm level since the last end of turn
    done: bool = False
    ended_at: int | None = None  # step at which this stream's input (and flush) ends

    def __post_init__(self) -> None:
        self.tracker = WordTracker(self.timing.text_time, self.timing.first_text_step,
                                   self.decode, stream=self.stream)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    @property
    def text(self) -> str:
        """Every piece so far, decoded."""
        return self.decode(self.tokens).strip()

    def handle(self, step: int, token: int, vad: np.ndarray | None) -> list[Event]:
        """Events of `step`: its text token, its VAD [heads, classes] (None without heads)."""
        events: list[Event] = []
        if step >= self.timing.first_text_step and token not in (PAD, EPAD):
            self.tokens.append(token)
            self.has_text = True
            piece = text_piece(self.tokenizer, token)
            if piece:
                events.append(TextPiece(self.stream, piece, self.timing.text_time(step), step))
        events += self.tracker.push(token, step)
        if vad is not None:
            rule = self.end_of_turn
            probability = float(vad[rule.head, 0])
            if probability < rule.rearm:
                self.below = True
            if self.has_text and self.below and probability > rule.threshold:
                events.append(EndOfTurn(self.stream, self.timing.audio_time(step), step,
                                        probability))
                self.has_text = self.below = False
        return events

    def due(self, step: int) -> bool:
        """The input and its flush are over at `step`."""
        return self.ended_at is not None and step >= self.ended_at

    def close(self, step: int, duration: float) -> list[Event]:
        self.done = True
        return [*self.tracker.finish(step), Flushed(self.stream, float(duration), step)]
