"""A fixed pool of Kyutai STT streams stepped as one batch (the batched server's engine).

    slots = SttSlots(lm, tokenizer, mimi, capacity=8)
    slot = slots.open()                      # lowest free slot, a fresh stream
    slots.push(slot, pcm)                    # float mono 24 kHz, any length
    while slots.has_work():
        for event in slots.step(): ...       # event.stream is the slot
    slots.end(slot)                          # end of input: the flush, then `Flushed`
    slots.close(slot)                        # free it for the next stream

Each `step()` runs one Mimi encode of [capacity, 1, 1920] and one LM temporal step of
[capacity, 1 + n_q]. Every batch row is its own stream (`SlotCache`, `RowEncoderState`):
the rows with a whole frame buffered advance by one frame, the others keep their state
exactly, so a stream's events are the ones it gets alone. A newly opened stream first runs the
official step 0 (initial tokens only) in a batched step, and starts reading audio at the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import AudioError, NoFreeSlot, SlotError
from moshi_mlx.models.lm import Lm
from moshi_mlx.models.lm_config import SttConfig
from moshi_mlx.modules.cache import SlotCache
from moshi_mlx.modules.sampling import Sampler, new_key
from moshi_mlx.transcription.stream import (
    VAD_END_OF_TURN_HEAD,
    EndOfTurnRule,
    Event,
    StreamDecoder,
    SttTiming,
)
from moshi_mlx.transcription.stt_gen import initial_tokens


@dataclass(frozen=True)
class StepInfo:
    """Slot `stream` read one more frame (its `step`-th): `prs` is the probability of no voice
    activity of every VAD head (Kyutai's `Step` message; None without heads), and
    `buffered_samples` the audio still waiting in the slot."""

    stream: int
    step: int
    prs: tuple[float, ...] | None
    buffered_samples: int


SlotEvent = Event | StepInfo


@dataclass(eq=False)
class _Slot:
    decoder: StreamDecoder
    buffer: np.ndarray
    key: mx.array | None  # PRNG key of the next draw (sampling only)
    input_samples: int = 0
    steps: int = 0  # frames read (as `Transcriber.gen.state.steps`)
    started: bool = False  # official step 0 has run
    ended: bool = False
    chunks: list[np.ndarray] = field(default_factory=list)  # pushed, not yet in `buffer`

    def buffered(self) -> np.ndarray:
        if self.chunks:
            self.buffer = np.concatenate([self.buffer, *self.chunks])
            self.chunks = []
        return self.buffer


class SttSlots:
    """`capacity` Kyutai STT streams that open, read audio, end and close at any time, stepped
    together. lm, tokenizer, mimi and the options are `Transcriber`'s; with temp > 0 each
    stream draws as a fresh `Transcriber(seed=seed)` does."""

    def __init__(self, lm: Lm, tokenizer: Any, mimi: Any, capacity: int, *, temp: float = 0.0,
                 seed: int | None = None, top_k: int = 50, eot_threshold: float = 0.5,
                 eot_hysteresis: float = 0.1, eot_head: int = VAD_END_OF_TURN_HEAD,
                 stt_config: SttConfig | None = None, compile: bool = True) -> None:
        if not lm.cfg.is_stt:
            raise ValueError("SttSlots needs a speech-to-text LM (dep_q 0)")
        if mimi.num_codebooks != lm.cfg.n_q:
            raise ValueError(f"Mimi gives {mimi.num_codebooks} codebooks, the LM reads "
                             f"{lm.cfg.n_q}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.lm, self.tokenizer, self.mimi = lm, tokenizer, mimi
        self.capacity = capacity
        self.timing = SttTiming.of(stt_config or lm.cfg.stt_config or SttConfig())
        self.flush_frames = self.timing.flush_frames
        self.end_of_turn = EndOfTurnRule(eot_head, eot_threshold, eot_threshold - eot_hysteresis)
        self.sampler = Sampler(temp, top_k)
        self.seed = seed
        self.compile = compile
        self.has_vad = lm.cfg.extra_heads_num_heads > 0
        self._initial = mx.array(initial_tokens(lm.cfg))
        self._encoder = mimi.new_row_encoder_state(capacity)
        self._caches = [SlotCache(lm.cfg.context, capacity) for _ in lm.transformer.layers]
        self._text = mx.zeros((capacity,), dtype=mx.int32)  # each row's last text token
        self._slots: list[_Slot | None] = [None] * capacity

    # ------------------------------------------------------------------ slots
    def open(self) -> int:
        """A fresh stream in the lowest free slot (its silence prefix queued)."""
        free = [i for i, slot in enumerate(self._slots) if slot is None]
        if not free:
            raise NoFreeSlot()
        row = free[0]
        self._encoder.reset_rows([row])
        for cache in self._caches:
            cache.reset_rows([row])
        decoder = StreamDecoder(row, self.timing, self.tokenizer, self.end_of_turn)
        key = None if self.sampler.greedy else new_key(self.seed)
        self._slots[row] = _Slot(decoder, np.zeros(self.timing.prefix_samples, np.float32), key)
        return row

    def close(self, slot: int) -> None:
        """Free `slot` at once (its pending audio and events are dropped)."""
        self._slot(slot)
        self._slots[slot] = None

    def push(self, slot: int, pcm) -> None:
        """Append audio (float mono 24 kHz, any length) to the stream of `slot`."""
        state = self._slot(slot)
        if state.ended:
            raise SlotError(f"slot {slot} has ended its input")
        samples = np.asarray(pcm, dtype=np.float32)
        if samples.ndim == 2 and samples.shape[0] == 1:
            samples = samples[0]
        if samples.ndim != 1:
            raise AudioError(f"expected mono audio [T], got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise AudioError("the audio holds NaN or infinite samples")
        state.chunks.append(samples.copy())
        state.input_samples += samples.size

    def end(self, slot: int) -> None:
        """End of input: the partial frame and the flush silence are queued; the slot emits
        `Flushed` once they are read."""
        state = self._slot(slot)
        if state.ended:
            raise SlotError(f"slot {slot} has already ended its input")
        state.ended = True
        ended_at = self.timing.end_step(state.input_samples)
        state.decoder.ended_at = ended_at
        missing = (ended_at - state.steps) * FRAME_SIZE - state.buffered().size
        state.chunks.append(np.zeros(missing, dtype=np.float32))

    def buffered_samples(self, slot: int) -> int:
        """Samples of `slot` waiting to be read (its silence prefix and flush included)."""
        return self._slot(slot).buffered().size

    def steps_of(self, slot: int) -> int:
        """Frames the stream of `slot` has read."""
        return self._slot(slot).steps

    def text(self, slot: int) -> str:
        """The text of the stream of `slot` so far (every piece, decoded)."""
        return self._slot(slot).decoder.text

    def is_open(self, slot: int) -> bool:
        return 0 <= slot < self.capacity and self._slots[slot] is not None

    def _slot(self, slot: int) -> _Slot:
        if not 0 <= slot < self.capacity:
            raise SlotError(f"no slot {slot} (slots 0..{self.capacity - 1})")
        state = self._slots[slot]
        if state is None:
            raise SlotError(f"slot {slot} is not open")
        return state

    def _ready(self) -> list[int]:
        return [row for row, slot in enumerate(self._slots)
                if slot is not None and not slot.decoder.done
                and slot.buffered().size >= FRAME_SIZE]

    def has_work(self) -> bool:
        """Some open stream has a whole frame buffered (`step()` advances it)."""
        return bool(self._ready())

    # ------------------------------------------------------------------ one batched step
    def step(self) -> list[SlotEvent]:
        """One batched step: every stream with a whole frame buffered reads it (a new stream
        runs its step 0 instead); the others keep their state. Events carry the slot."""
        ready = self._ready()
        if not ready:
            return []
        starting = np.zeros(self.capacity, dtype=bool)
        reading = np.zeros(self.capacity, dtype=bool)
        for row in ready:
            if self._slots[row].started:
                reading[row] = True
            else:
                starting[row] = True
        tokens = mx.broadcast_to(self._initial[None], (self.capacity, self._initial.size))
        if reading.any():
            codes = self._encode(reading)
            frame_tokens = mx.concatenate([self._text[:, None], codes], axis=1)
            tokens = mx.where(mx.array(reading)[:, None], frame_tokens, tokens)
        text, vad = self._lm_step(tokens, starting | reading)

        events: list[SlotEvent] = []
        for row in ready:
            slot = self._slots[row]
            if starting[row]:
                slot.started = True
                step = 0
            else:
                slot.steps += 1
                step = slot.steps
            probs = None if vad is None else vad[row]
            events += slot.decoder.handle(step, int(text[row]), probs)
            if reading[row]:
                prs = None if probs is None else tuple(float(p) for p in probs[:, 0])
                events.append(StepInfo(row, step, prs, slot.buffered().size))
            if slot.decoder.due(step):
                events += slot.decoder.close(step, slot.input_samples / SAMPLE_RATE)
        return events

    def _encode(self, reading: np.ndarray) -> mx.array:
        """One frame of every reading row through the row-masked Mimi -> codes [B, n_q]."""
        pcm = np.zeros((self.capacity, 1, FRAME_SIZE), dtype=np.float32)
        for row in np.flatnonzero(reading):
            slot = self._slots[row]
            pcm[row, 0] = slot.buffer[:FRAME_SIZE]
            slot.buffer = slot.buffer[FRAME_SIZE:]
        self._encoder.set_active(reading)
        return self.mimi.encode_step(pcm, self._encoder)[:, :, 0]

    def _lm_step(self, tokens: mx.array, active: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        for cache in self._caches:
            cache.set_active(active)
        hidden, logits = self.lm.temporal(tokens, self._caches, compiled=self.compile)
        if self.sampler.greedy:
            text = self.sampler(logits, None)
        else:  # each stream its own key: its draws do not depend on the other rows
            rows = []
            for row in range(self.capacity):
                slot = self._slots[row]
                if active[row]:
                    slot.key, draw = mx.random.split(slot.key)
                    rows.append(self.sampler(logits[row:row + 1], draw))
                else:
                    rows.append(self._text[row:row + 1])
            text = mx.concatenate(rows)
        self._text = mx.where(mx.array(active), text, self._text)
        vad = self.lm.extra_head_probs(hidden) if self.has_vad else None
        outputs = [self._text] + ([] if vad is None else [vad])
        for cache in self._caches:
            outputs += [cache.keys, cache.values]
        keys = [s.key for s in self._slots if s is not None and s.key is not None]
        mx.eval(outputs + keys)  # the one host sync of the LM step
        return np.array(self._text), None if vad is None else np.array(vad)
