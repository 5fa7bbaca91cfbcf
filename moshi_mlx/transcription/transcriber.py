"""Kyutai speech-to-text as a library: streaming events and whole-file transcripts.

    transcriber = Transcriber(lm, tokenizer, mimi)
    for event in transcriber.feed(pcm_chunk): ...      # any number of samples, 24 kHz mono
    for event in transcriber.flush(): ...              # end of input: the last words come out
    transcript = transcriber.transcribe("talk.wav")    # words with start/end, end of turns

Input handling follows the checkpoint's `stt_config`: every stream starts with
`audio_silence_prefix_seconds` of silence, and at the end of the input at least
ceil(audio_delay_seconds * 12.5) + 1 silent frames are pushed at once (the text stream is
trained that far behind the audio, so the last words only come out during this flush).
Times are seconds of the input audio: step time - silence prefix - delay for text (the step
that emits a token has seen the audio up to step / 12.5 s), step time - prefix for end of turn.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.models.lm import Lm
from moshi_mlx.models.lm_config import SttConfig
from moshi_mlx.models.mimi import MimiStream
from moshi_mlx.transcription.stream import (
    VAD_END_OF_TURN_HEAD,
    EndOfTurn,
    EndOfTurnRule,
    Event,
    Flushed,
    StreamDecoder,
    SttTiming,
    TextPiece,
)
from moshi_mlx.transcription.stt_gen import SttGen
from moshi_mlx.transcription.words import Word, WordEnd, timed_words

__all__ = ["VAD_END_OF_TURN_HEAD", "EndOfTurn", "Event", "Flushed", "TextPiece", "TimedWord",
           "Transcriber", "Transcript", "Word", "WordEnd", "transcript_from_events"]


@dataclass
class TimedWord:
    word: str
    start: float
    end: float


@dataclass
class Transcript:
    text: str
    words: list[TimedWord]
    end_of_turn: list[float]
    duration: float
    steps: int = 0

    def to_json_dict(self) -> dict[str, Any]:
        return {"text": self.text,
                "words": [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
                          for w in self.words],
                "end_of_turn": [round(t, 3) for t in self.end_of_turn]}


def transcript_from_events(events: Iterable[Event], decode_text: str, duration: float,
                           time_of) -> Transcript:
    """Collect one stream's events into a Transcript (word end: see `timed_words`)."""
    tracked: list[Word | WordEnd] = []
    turns, steps = [], 0
    for event in events:
        if isinstance(event, (Word, WordEnd)):
            tracked.append(event)
        elif isinstance(event, EndOfTurn):
            turns.append(event.time)
        elif isinstance(event, Flushed):
            steps = event.step
    words = [TimedWord(text, min(start, duration), min(end, duration))
             for text, start, end in timed_words(tracked, time_of)]
    return Transcript(decode_text, words, turns, duration, steps)


# --------------------------------------------------------------------------- transcriber


class Transcriber:
    """Streaming Kyutai STT over `batch_size` independent streams.

    lm: an STT `Lm` (dep_q 0); tokenizer: its sentencepiece processor; mimi: a Mimi with as
    many codebooks as the LM reads (None: only `feed_codes` works). temp 0 is greedy (the
    official lm_gen_config). End of turn: VAD head `eot_head`, class 0 above `eot_threshold`;
    it fires once, and again only after new text and a drop below threshold - hysteresis.
    """

    def __init__(self, lm: Lm, tokenizer: Any, mimi: Any | None = None, *, temp: float = 0.0,
                 seed: int | None = None, top_k: int = 50, batch_size: int = 1,
                 eot_threshold: float = 0.5, eot_hysteresis: float = 0.1,
                 eot_head: int = VAD_END_OF_TURN_HEAD, stt_config: SttConfig | None = None,
                 compile: bool = True) -> None:
        if not lm.cfg.is_stt:
            raise ValueError("Transcriber needs a speech-to-text LM (dep_q 0)")
        if mimi is not None and mimi.num_codebooks != lm.cfg.n_q:
            raise ValueError(f"Mimi gives {mimi.num_codebooks} codebooks, the LM reads "
                             f"{lm.cfg.n_q}")
        self.lm = lm
        self.mimi = mimi
        self._mimi_stream = None if mimi is None else MimiStream(mimi)
        self.tokenizer = tokenizer
        self.config = stt_config or lm.cfg.stt_config or SttConfig()
        self.eot_threshold = eot_threshold
        self.eot_rearm = eot_threshold - eot_hysteresis
        self.eot_head = eot_head
        self.gen = SttGen(lm, temp=temp, seed=seed, top_k=top_k, batch_size=batch_size,
                          compile=compile)
        self.timing = SttTiming.of(self.config)
        self.prefix_samples = self.timing.prefix_samples
        self.flush_frames = self.timing.flush_frames
        self.text_lag = self.timing.text_lag
        self.first_text_step = self.timing.first_text_step
        self.reset(batch_size)

    # ------------------------------------------------------------------ times
    def text_time(self, step: int) -> float:
        """Seconds of input audio of a text token emitted at `step`."""
        return self.timing.text_time(step)

    def audio_time(self, step: int) -> float:
        """Seconds of input audio seen when `step` runs."""
        return self.timing.audio_time(step)

    # ------------------------------------------------------------------ state
    @property
    def batch_size(self) -> int:
        return self.gen.batch_size

    def reset(self, batch_size: int | None = None) -> None:
        """New streams: model state, Mimi state, silence prefix, word trackers."""
        self.gen.reset(batch_size)
        if self._mimi_stream is not None:
            self._mimi_stream.reset()
        rows = self.gen.batch_size
        self._buffer = np.zeros((rows, self.prefix_samples), dtype=np.float32)
        self._input_samples = np.zeros(rows, dtype=np.int64)
        rule = EndOfTurnRule(self.eot_head, self.eot_threshold, self.eot_rearm)
        self._streams = [StreamDecoder(row, self.timing, self.tokenizer, rule)
                         for row in range(rows)]
        self._pending: list[Event] = []
        self._handle(0, np.array(self.gen.initial_text), self._vad_or_none(self.gen.initial_vad))

    @staticmethod
    def _vad_or_none(vad: mx.array | None) -> np.ndarray | None:
        return None if vad is None else np.array(vad)

    # ------------------------------------------------------------------ one step
    def _handle(self, step: int, text: np.ndarray, vad: np.ndarray | None) -> None:
        for row, stream in enumerate(self._streams):
            if stream.done:
                continue
            self._pending += stream.handle(step, int(text[row]), None if vad is None else vad[row])
            if stream.due(step):
                self._close(row, step)

    def _close(self, row: int, step: int) -> None:
        self._pending += self._streams[row].close(step, self._input_samples[row] / SAMPLE_RATE)

    def _take_events(self) -> list[Event]:
        events, self._pending = self._pending, []
        return events

    def step_codes(self, codes) -> list[Event]:
        """One Mimi frame per stream, codes int [B, n_q] -> events."""
        text, vad = self.gen.step(codes)
        self._handle(self.gen.state.steps, np.array(text), self._vad_or_none(vad))
        return self._take_events()

    def feed_codes(self, codes) -> list[Event]:
        """Codes [B, n_q, T] (or [n_q, T] for one stream) -> events of the T steps."""
        codes = np.asarray(codes)
        if codes.ndim == 2:
            codes = codes[None]
        events: list[Event] = []
        for t in range(codes.shape[2]):
            self._input_samples += FRAME_SIZE
            events += self.step_codes(codes[:, :, t])
        return events

    # ------------------------------------------------------------------ audio
    def feed(self, pcm, lengths: Sequence[int] | None = None) -> list[Event]:
        """Audio [T] (one stream) or [B, T] float at 24 kHz -> events of the whole frames.
        lengths: per stream, how many of the T samples are real input (the rest is silence
        padding of a batch); default all."""
        if self.mimi is None:
            raise ValueError("this Transcriber has no Mimi: use feed_codes")
        pcm = np.asarray(pcm, dtype=np.float32)
        if pcm.ndim == 1:
            pcm = pcm[None]
        if pcm.ndim != 2 or pcm.shape[0] != self.batch_size:
            raise ValueError(f"audio must be [{self.batch_size}, T], got {pcm.shape}")
        self._input_samples += np.asarray(pcm.shape[1] if lengths is None else lengths)
        self._buffer = np.concatenate([self._buffer, pcm], axis=1)
        return self._run_buffered_frames()

    def _run_buffered_frames(self) -> list[Event]:
        frames = self._buffer.shape[1] // FRAME_SIZE
        events: list[Event] = []
        for f in range(frames):
            if all(stream.done for stream in self._streams):
                break
            chunk = self._buffer[:, f * FRAME_SIZE:(f + 1) * FRAME_SIZE]
            codes = self._mimi_stream.encode_step(chunk[:, None, :])
            events += self.step_codes(codes[:, :, 0])
        self._buffer = self._buffer[:, frames * FRAME_SIZE:]
        return events

    def end_step(self, input_samples: int) -> int:
        """The step at which a stream of `input_samples` samples has seen its input, its
        prefix and its flush frames."""
        return self.timing.end_step(input_samples)

    def end_stream_after(self, row: int, input_samples: int) -> None:
        """Stream `row` ends after `input_samples` samples (what follows is its flush; later
        steps are ignored for it): for batches of inputs of different lengths."""
        self._streams[row].ended_at = self.end_step(input_samples)

    def flush(self) -> list[Event]:
        """End of input: the partial frame and the flush silence are pushed at once, pending
        words close, every stream gets a `Flushed` event. Call `reset()` to start again."""
        for row, stream in enumerate(self._streams):
            if not stream.done and stream.ended_at is None:
                stream.ended_at = self.end_step(int(self._input_samples[row]))
        events = self._take_events()
        open_ends = [s.ended_at for s in self._streams if not s.done]
        if self.mimi is not None and open_ends:
            needed = (max(open_ends) - self.gen.state.steps) * FRAME_SIZE - self._buffer.shape[1]
            if needed > 0:
                zeros = np.zeros((self.batch_size, needed), dtype=np.float32)
                self._buffer = np.concatenate([self._buffer, zeros], axis=1)
            events += self._run_buffered_frames()
        for row, stream in enumerate(self._streams):  # codes input: no silence to push
            if not stream.done:
                self._close(row, self.gen.state.steps)
        return events + self._take_events()

    # ------------------------------------------------------------------ files
    def transcribe(self, path: str | os.PathLike) -> Transcript:
        """Transcribe one audio file (any format/rate soundfile reads; converted to 24 kHz
        mono)."""
        return self.transcribe_files([path])[0]

    def transcribe_files(self, paths: Sequence[str | os.PathLike], **options
                         ) -> list[Transcript]:
        """Transcribe several files as one batch (one stream per file); options as
        `transcribe_pcm`."""
        from moshi_mlx.audio.io import read_audio

        pcms = [read_audio(p) for p in paths]
        return self.transcribe_pcm(pcms, **options)

    def stream_text(self, row: int = 0) -> str:
        """The text of stream `row` so far (every piece, decoded)."""
        return self._streams[row].text

    def transcribe_pcm(self, pcms: Sequence[np.ndarray], chunk_frames: int = 1,
                       progress: Callable[[float, float], None] | None = None,
                       on_events: Callable[[list[Event]], None] | None = None
                       ) -> list[Transcript]:
        """Transcribe float 24 kHz mono arrays as one batch (one stream each).
        progress(done_s, total_s) is called after each chunk of `chunk_frames` frames,
        on_events(events) with the events of each chunk and of the flush."""
        self.reset(len(pcms))
        lengths = np.array([len(p) for p in pcms])
        longest = int(lengths.max())
        for row, length in enumerate(lengths):
            self.end_stream_after(row, int(length))
        events: list[Event] = []
        chunk = chunk_frames * FRAME_SIZE
        for start in range(0, longest, chunk):
            # One chunk of the batch at a time (no padded copy of whole files); a stream past
            # its end reads silence.
            part = np.zeros((len(pcms), min(chunk, longest - start)), dtype=np.float32)
            for row, pcm in enumerate(pcms):
                piece = np.asarray(pcm[start:start + part.shape[1]], dtype=np.float32)
                part[row, : len(piece)] = piece
            fed = np.clip(lengths - start, 0, part.shape[1])
            new = self.feed(part, lengths=fed)
            events += new
            if on_events is not None:
                on_events(new)
            if progress is not None:
                progress(min(start + chunk, longest) / SAMPLE_RATE, longest / SAMPLE_RATE)
        new = self.flush()
        events += new
        if on_events is not None:
            on_events(new)
        transcripts = []
        for row in range(len(pcms)):
            mine = [e for e in events if e.stream == row]
            transcripts.append(transcript_from_events(mine, self.stream_text(row),
                                                      lengths[row] / SAMPLE_RATE,
                                                      self.text_time))
        return transcripts
