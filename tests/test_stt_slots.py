"""Batched STT slots: streams that join, pause, end and leave one shared batch get exactly the
events they get alone (an SttSlots of their own, and the `Transcriber`), and the row-masked
Mimi gives exactly the codes of a single stream."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece

from moshi_mlx import NoFreeSlot, SttSlots, Transcriber, load_lm, load_mimi
from moshi_mlx.audio.io import read_audio
from moshi_mlx.errors import AudioError, MoshiError, SlotError
from moshi_mlx.models.mimi import MimiStream
from moshi_mlx.transcription.slots import StepInfo
from moshi_mlx.transcription.transcriber import (
    EndOfTurn,
    Flushed,
    Word,
    WordEnd,
    transcript_from_events,
)

FRAME = 1920


@pytest.fixture(scope="module")
def tokenizer(stt_dir: Path):
    return sentencepiece.SentencePieceProcessor(model_file=str(stt_dir / "stt_tokenizer.model"))


@pytest.fixture(scope="module")
def lm(stt_dir: Path):
    return load_lm(stt_dir / "stt_pytorch.safetensors", config=stt_dir / "stt_config.json",
                   dtype=mx.float32)


@pytest.fixture(scope="module")
def mimi(random_mimi_path):
    return load_mimi(random_mimi_path, num_codebooks=32)


@pytest.fixture(scope="module")
def speech(fixtures_dir: Path) -> np.ndarray:
    return read_audio(fixtures_dir / "speech.wav")


def clip(speech: np.ndarray, start_s: float, seconds: float) -> np.ndarray:
    start = int(start_s * 24000)
    return speech[start:start + int(seconds * 24000)]


# --------------------------------------------------------------------------- drivers


@dataclass
class Plan:
    """One stream of a schedule: opened at global step `join`, `chunk` samples pushed per
    global step (none during `pause`), ended once all is pushed, or closed at `close_at`."""

    pcm: np.ndarray
    join: int = 0
    chunk: int = 2500
    pause: range = range(0)
    close_at: int | None = None


def normalized(events) -> list:
    """Events without what depends on the slot and on when audio was pushed."""
    return [dataclasses.replace(e, stream=0, buffered_samples=0) if isinstance(e, StepInfo)
            else dataclasses.replace(e, stream=0) for e in events]


def run_schedule(slots: SttSlots, plans: list[Plan], max_steps: int = 400
                 ) -> tuple[list[list], list[int]]:
    """Drive the plans through `slots`: per stream its events (stream set to 0) and its slot."""
    events: list[list] = [[] for _ in plans]
    pushed = [0] * len(plans)
    slot_of: list[int | None] = [None] * len(plans)
    used: list[int] = [-1] * len(plans)
    finished = [False] * len(plans)
    for now in range(max_steps):
        for i, plan in enumerate(plans):
            if now == plan.join:
                slot_of[i] = used[i] = slots.open()
            slot = slot_of[i]
            if slot is None or finished[i]:
                continue
            if plan.close_at == now:
                slots.close(slot)
                slot_of[i], finished[i] = None, True
                continue
            if now not in plan.pause and pushed[i] < len(plan.pcm):
                slots.push(slot, plan.pcm[pushed[i]:pushed[i] + plan.chunk])
                pushed[i] += plan.chunk
                if pushed[i] >= len(plan.pcm):
                    slots.end(slot)
        owner = {slot: i for i, slot in enumerate(slot_of) if slot is not None}
        for event in slots.step():
            i = owner[event.stream]
            events[i].append(event)
            if isinstance(event, Flushed):  # as a server does: the slot is free again
                slots.close(event.stream)
                slot_of[i], finished[i] = None, True
        if all(finished) and all(now >= plan.join for plan in plans):
            return [normalized(e) for e in events], used
    raise AssertionError("the schedule did not finish")


def alone(lm, tokenizer, mimi, pcm: np.ndarray, capacity: int) -> list:
    """The stream by itself in an SttSlots of its own (same capacity: as many rows computed):
    whole input pushed, then ended."""
    slots = SttSlots(lm, tokenizer, mimi, capacity)
    slot = slots.open()
    slots.push(slot, pcm)
    slots.end(slot)
    events = []
    while slots.has_work():
        events += slots.step()
    assert isinstance(events[-1], Flushed)
    frames = events[-1].step  # the input, its partial frame and the flush, all buffered at once
    assert frames == -(-len(pcm) // FRAME) + slots.flush_frames
    assert [(e.step, e.buffered_samples) for e in events if isinstance(e, StepInfo)] == \
        [(step, (frames - step) * FRAME) for step in range(1, frames + 1)]
    return normalized(events)


def transcriber_events(lm, tokenizer, mimi, pcm: np.ndarray) -> list:
    collected: list = []
    Transcriber(lm, tokenizer, mimi).transcribe_pcm([pcm], on_events=collected.extend)
    return normalized(collected)


def word_events(events) -> list:
    """The events a transcript is made of (no text pieces, no step infos)."""
    return [e for e in events if isinstance(e, (Word, WordEnd, EndOfTurn, Flushed))]


def same_as_transcriber(events: list, single: list) -> None:
    """Word, WordEnd, EndOfTurn (time, step) and Flushed exactly as the `Transcriber`'s. Its
    LM runs 1 row over a growing cache, ours `capacity` rows over the whole ring: the float
    sums run in another order, so the VAD probability of an end of turn may differ in its
    last bits (measured: at most 1.2e-6)."""
    ours, theirs = word_events(events), word_events(single)

    def exact(e):
        return dataclasses.replace(e, probability=0.0) if isinstance(e, EndOfTurn) else e

    assert [exact(e) for e in ours] == [exact(e) for e in theirs]
    np.testing.assert_allclose([e.probability for e in ours if isinstance(e, EndOfTurn)],
                               [e.probability for e in theirs if isinstance(e, EndOfTurn)],
                               rtol=0, atol=1e-5)


def check_streams(lm, tokenizer, mimi, plans: list[Plan], got: list[list], capacity: int
                  ) -> None:
    for plan, events in zip(plans, got, strict=True):
        reference = alone(lm, tokenizer, mimi, plan.pcm, capacity)
        if plan.close_at is not None:  # closed early: exactly the start of its events
            assert 0 < len(events) < len(reference)
            assert events == reference[: len(events)]
            continue
        assert events == reference
        assert [e.step for e in events if isinstance(e, StepInfo)] == \
            list(range(1, events[-1].step + 1))
        same_as_transcriber(events, transcriber_events(lm, tokenizer, mimi, plan.pcm))
        assert any(isinstance(e, Word) for e in events)


# --------------------------------------------------------------------------- streams


def test_one_slot_pauses_closes_and_is_reused(lm, tokenizer, mimi, speech):
    plans = [Plan(clip(speech, 0.5, 1.2), join=0, chunk=3000, pause=range(4, 9)),
             Plan(clip(speech, 3.0, 1.6), join=45, chunk=2000, close_at=55),
             Plan(clip(speech, 6.0, 1.4), join=56, chunk=1000)]
    slots = SttSlots(lm, tokenizer, mimi, 1)
    got, used = run_schedule(slots, plans)
    assert used == [0, 0, 0]
    check_streams(lm, tokenizer, mimi, plans, got, 1)


def test_four_streams_join_pause_and_leave(lm, tokenizer, mimi, speech):
    plans = [Plan(clip(speech, 0.0, 1.5), join=0, chunk=2500),
             Plan(clip(speech, 2.0, 1.3), join=3, chunk=1920, pause=range(6, 14)),
             Plan(clip(speech, 4.0, 2.0), join=5, chunk=4000, close_at=16),
             Plan(clip(speech, 6.0, 1.1), join=9, chunk=700),
             Plan(clip(speech, 8.0, 1.4), join=20, chunk=3100)]  # takes the closed slot
    slots = SttSlots(lm, tokenizer, mimi, 4)
    got, used = run_schedule(slots, plans)
    assert used == [0, 1, 2, 3, 2]
    check_streams(lm, tokenizer, mimi, plans, got, 4)


def test_eight_streams_share_the_batch(lm, tokenizer, mimi, speech):
    plans = [Plan(clip(speech, 0.4 + 1.3 * i, 1.0 + 0.1 * (i % 3)), join=2 * i,
                  chunk=1500 + 600 * i, pause=range(8, 12) if i == 5 else range(0))
             for i in range(8)]
    slots = SttSlots(lm, tokenizer, mimi, 8)
    got, used = run_schedule(slots, plans)
    assert used == list(range(8))
    check_streams(lm, tokenizer, mimi, plans, got, 8)


def test_sampled_streams_draw_as_a_seeded_transcriber(lm, tokenizer, mimi, speech):
    pcms = [clip(speech, 1.0, 1.2), clip(speech, 5.0, 1.0)]
    plans = [Plan(pcms[0], join=0, chunk=2000), Plan(pcms[1], join=4, chunk=2900)]
    slots = SttSlots(lm, tokenizer, mimi, 2, temp=0.8, seed=7)
    got, _ = run_schedule(slots, plans)
    for pcm, events in zip(pcms, got, strict=True):
        collected: list = []
        Transcriber(lm, tokenizer, mimi, temp=0.8, seed=7).transcribe_pcm(
            [pcm], on_events=collected.extend)
        same_as_transcriber(events, normalized(collected))
    texts = [" ".join(e.text for e in events if isinstance(e, Word)) for events in got]
    greedy = [" ".join(e.text for e in transcriber_events(lm, tokenizer, mimi, pcm)
                       if isinstance(e, Word)) for pcm in pcms]
    assert texts != greedy  # the draws are real draws


def test_transcript_of_slot_events_equals_the_transcriber(lm, tokenizer, mimi, speech):
    pcm = clip(speech, 3.0, 2.0)
    events = alone(lm, tokenizer, mimi, pcm, 1)
    ours = transcript_from_events(events, "", len(pcm) / 24000,
                                  SttSlots(lm, tokenizer, mimi, 1).timing.text_time)
    reference = Transcriber(lm, tokenizer, mimi).transcribe_pcm([pcm])[0]
    assert ours.to_json_dict()["words"] == reference.to_json_dict()["words"]
    assert ours.end_of_turn == reference.end_of_turn and ours.steps == reference.steps


# --------------------------------------------------------------------------- Mimi rows


def test_row_masked_mimi_gives_single_stream_codes(mimi, speech):
    a, b = clip(speech, 0.0, 12 * FRAME / 24000), clip(speech, 6.0, 10 * FRAME / 24000)

    def single(pcm):
        stream = MimiStream(mimi)
        return np.concatenate([np.array(stream.encode_step(pcm[i * FRAME:(i + 1) * FRAME]))
                               for i in range(len(pcm) // FRAME)], axis=2)[0]

    expected_a, expected_b = single(a), single(b)
    state = mimi.new_row_encoder_state(3)
    got: dict[int, list] = {0: [], 2: []}
    noise = np.random.default_rng(0).normal(0, 0.1, (40, FRAME)).astype(np.float32)
    for step in range(40):
        active = np.zeros(3, dtype=bool)
        pcm = np.zeros((3, 1, FRAME), dtype=np.float32)
        done_a, done_b = len(got[0]), len(got[2])
        if done_a < 12 and step % 3 != 1:  # row 0 pauses every third step
            active[0], pcm[0, 0] = True, a[done_a * FRAME:(done_a + 1) * FRAME]
        if step >= 5 and done_b < 10:
            active[2], pcm[2, 0] = True, b[done_b * FRAME:(done_b + 1) * FRAME]
        active[1], pcm[1, 0] = step % 2 == 0, noise[step]  # another stream beside them
        if not active.any():
            continue
        state.set_active(active)
        codes = np.array(mimi.encode_step(pcm, state))
        for row in (0, 2):
            if active[row]:
                got[row].append(codes[row, :, 0])
    np.testing.assert_array_equal(np.stack(got[0], axis=1), expected_a)
    np.testing.assert_array_equal(np.stack(got[2], axis=1), expected_b)

    state.reset_rows([0])  # row 0 starts again: a new stream, b this time
    again = []
    for i in range(10):
        pcm = np.zeros((3, 1, FRAME), dtype=np.float32)
        pcm[0, 0], pcm[1, 0] = b[i * FRAME:(i + 1) * FRAME], noise[i]
        state.set_active(np.array([True, True, False]))
        again.append(np.array(mimi.encode_step(pcm, state))[0, :, 0])
    np.testing.assert_array_equal(np.stack(again, axis=1), expected_b)


# --------------------------------------------------------------------------- errors


def test_full_pool_and_closed_slots_raise_one_line_errors(lm, tokenizer, mimi, speech):
    slots = SttSlots(lm, tokenizer, mimi, 2)
    assert [slots.open(), slots.open()] == [0, 1]
    with pytest.raises(NoFreeSlot, match="^no free channels$"):
        slots.open()
    assert issubclass(NoFreeSlot, MoshiError)
    slots.close(0)
    for call in (lambda: slots.push(0, np.zeros(10)), lambda: slots.end(0),
                 lambda: slots.close(0), lambda: slots.text(0)):
        with pytest.raises(SlotError, match="^slot 0 is not open$"):
            call()
    with pytest.raises(SlotError, match="no slot 5"):
        slots.push(5, np.zeros(10))
    slots.end(1)
    with pytest.raises(SlotError, match="slot 1 has ended its input"):
        slots.push(1, np.zeros(10))
    slot = slots.open()
    assert slot == 0 and slots.steps_of(slot) == 0
    with pytest.raises(AudioError, match="NaN or infinite"):
        slots.push(slot, np.array([0.0, np.nan]))
    assert slots.buffered_samples(slot) == 0  # nothing of the refused chunk is kept
