"""Word timestamps, end of turn and flush of the STT `Transcriber`.

Word logic: both official readings reproduce the goldens (`dsm_*`: DSM
`tokens_to_timestamped_text` run on the PyTorch timing-A tokens; `rustlike_events_*`: the
moshi-core asr.rs logic on the timing-B tokens, asr_delay_in_tokens 6).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece

from moshi_mlx import load_lm, load_mimi
from moshi_mlx.audio.io import read_audio
from moshi_mlx.models.lm_config import SttConfig
from moshi_mlx.transcription.transcriber import (
    EndOfTurn,
    Flushed,
    TextPiece,
    Transcriber,
    Word,
    WordEnd,
)
from moshi_mlx.transcription.words import WordTracker, segment_words


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


# --------------------------------------------------------------------------- official logic


def test_dsm_segment_words_reproduce_the_official_function(stt_golden, tokenizer):
    # The script's arguments: EPAD 0, padding 3, offset int(0 / 12.5) + 0.5 s, 165 steps.
    steps = int(stt_golden["dsm_steps"])
    words = segment_words(stt_golden["torch_f32_A_v1_text"][:steps], tokenizer, offset_seconds=0.5)
    assert [w for w, _, _ in words] == stt_golden["dsm_words"].tolist()
    times = np.array([(start, end) for _, start, end in words])
    np.testing.assert_allclose(times, stt_golden["dsm_word_times"], atol=1e-5, rtol=0)


def test_word_tracker_reproduces_the_rust_events(stt_golden):
    # asr.rs: step_idx counts from 1, tokens are read from step_idx >= 6, times
    # (step_idx - 6) / 12.5.
    delay = 6
    tracker = WordTracker(lambda step: (step + 1 - delay) / 12.5, first_step=delay - 1)
    events = []
    for step, token in enumerate(stt_golden["torch_f32_B_v1_text"][:176]):
        events += tracker.push(int(token), step)
    assert [0 if isinstance(e, Word) else 1 for e in events] == \
        stt_golden["rustlike_events_kind"].tolist()
    assert [e.step for e in events] == stt_golden["rustlike_events_step"].tolist()
    times = [e.start if isinstance(e, Word) else e.end for e in events]
    np.testing.assert_allclose(times, stt_golden["rustlike_events_time"], atol=1e-9, rtol=0)
    tokens = [" ".join(map(str, e.tokens)) if isinstance(e, Word) else "" for e in events]
    assert tokens == stt_golden["rustlike_events_tokens"].tolist()


# --------------------------------------------------------------------------- transcriber


def rust_events_in_our_time(stt_golden, tokenizer) -> list[tuple]:
    """The golden Rust events with our clock: step / 12.5 - prefix (0) - delay (0.5), where the
    Rust clock is (step + 1 - 6) / 12.5 = step / 12.5 - 0.4: ours = max(0, rust - 0.1)."""
    expected = []
    for kind, step, time, tokens in zip(stt_golden["rustlike_events_kind"],
                                        stt_golden["rustlike_events_step"],
                                        stt_golden["rustlike_events_time"],
                                        stt_golden["rustlike_events_tokens"], strict=True):
        if kind == 0:
            text = tokenizer.decode([int(t) for t in str(tokens).split()])
            expected.append(("word", text, max(0.0, time - 0.1), int(step)))
        else:
            expected.append(("end", max(0.0, time - 0.1), int(step)))
    return expected


def as_tuples(events) -> list[tuple]:
    out = []
    for e in events:
        if isinstance(e, Word):
            out.append(("word", e.text, e.start, e.step))
        elif isinstance(e, WordEnd):
            out.append(("end", e.end, e.step))
    return out


def test_transcriber_words_follow_the_official_logic_on_codes(lm, tokenizer, stt_golden):
    transcriber = Transcriber(lm, tokenizer)
    events = transcriber.feed_codes(stt_golden["codes_v1"][:, :175])  # steps 0..175, as golden
    assert transcriber.first_text_step == 7  # ceil((0 + 0.5) * 12.5): earlier text is < 0 s
    got = as_tuples(events)
    expected = rust_events_in_our_time(stt_golden, tokenizer)
    assert [g[:2] + g[3:] for g in got if g[0] == "word"] == \
        [e[:2] + e[3:] for e in expected if e[0] == "word"]
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[-2] for g in got], [e[-2] for e in expected], atol=1e-9)
    # Pieces stream as they come (a word closed by PAD may continue without a space).
    last_word_step = max(e.step for e in events if isinstance(e, Word))
    pieces = "".join(e.text for e in events if isinstance(e, TextPiece) and e.step < last_word_step)
    words = "".join(e.text for e in events if isinstance(e, Word))
    assert pieces.replace(" ", "") == words.replace(" ", "")


def test_transcript_word_ends(lm, tokenizer, stt_golden):
    transcriber = Transcriber(lm, tokenizer)
    events = transcriber.feed_codes(stt_golden["codes_v1"][:, :175]) + transcriber.flush()
    assert isinstance(events[-1], Flushed) and events[-1].duration == pytest.approx(175 / 12.5)
    from moshi_mlx.transcription.transcriber import transcript_from_events

    transcript = transcript_from_events(events, "", 14.0, transcriber.text_time)
    expected = rust_events_in_our_time(stt_golden, tokenizer)
    words = [i for i, e in enumerate(expected) if e[0] == "word"]
    assert [w.word for w in transcript.words[: len(words)]] == [expected[i][1] for i in words]
    previous_end = 0.0
    for word, i in zip(transcript.words, words, strict=False):
        # end: the EPAD right after the word, else the PAD step that closed it; a word never
        # starts before the one before it ended.
        following = expected[i + 1] if i + 1 < len(expected) else None
        end = following[1] if following and following[0] == "end" else (expected[i][3] / 12.5
                                                                          - 0.5)
        assert word.start == pytest.approx(max(expected[i][2], previous_end))
        assert word.end == pytest.approx(end)
        previous_end = end


def expected_end_of_turn_steps(vad: np.ndarray, text: np.ndarray, first_text_step: int,
                               threshold: float = 0.5, rearm: float = 0.4) -> list[int]:
    """The documented rule on the golden arrays: fire when p > threshold, once there was text
    since the last firing and p fell below the re-arm level since then."""
    steps, has_text, below = [], False, True
    for step, (p, token) in enumerate(zip(vad, text, strict=True)):
        if step >= first_text_step and token not in (0, 3):
            has_text = True
        if p < rearm:
            below = True
        if has_text and below and p > threshold:
            steps.append(step)
            has_text = below = False
    return steps


def test_end_of_turn_from_vad_head_2_with_hysteresis(lm, tokenizer, stt_golden):
    transcriber = Transcriber(lm, tokenizer)
    events = transcriber.feed_codes(stt_golden["codes_v1"])
    got = [e for e in events if isinstance(e, EndOfTurn)]
    expected = expected_end_of_turn_steps(stt_golden["torch_f32_B_v1_vad"][:, 2, 0],
                                          stt_golden["torch_f32_B_v1_text"], 7)
    assert [e.step for e in got] == expected and len(expected) >= 3
    assert [e.time for e in got] == pytest.approx([s / 12.5 for s in expected])
    assert all(e.probability > 0.5 for e in got)
    # A plain "p > 0.5" test fires on many more steps (FIXTURES: 18 of 184).
    assert (stt_golden["torch_f32_B_v1_vad"][:, 2, 0] > 0.5).sum() > len(expected)


def test_prefix_and_flush_follow_stt_config(lm, tokenizer):
    # stt-2.6b-en: prefix 1.0 s, delay 2.5 s.
    transcriber = Transcriber(lm, tokenizer, stt_config=SttConfig(2.5, 1.0))
    assert transcriber.prefix_samples == 24000
    assert transcriber.flush_frames == 33  # ceil(2.5 * 12.5) + 1
    assert transcriber.first_text_step == 44  # ceil(3.5 * 12.5)
    # prefix + input = (24000 + 19201) / 1920 = 22.5 frames: 23 with the zero-padded last one
    assert transcriber.end_step(1920 * 10 + 1) == 23 + 33
    assert transcriber.text_time(44) == pytest.approx(0.02)


# --------------------------------------------------------------------------- audio


def test_streaming_audio_equals_codes_and_flush_emits_the_last_words(lm, tokenizer, mimi):
    pcm = read_audio(Path(__file__).parent / "fixtures" / "speech.wav")[: 24000 * 2 + 700]
    transcriber = Transcriber(lm, tokenizer, mimi)
    events = []
    for start in range(0, len(pcm), 5000):  # odd chunk sizes: partial frames are kept
        events += transcriber.feed(pcm[start:start + 5000])
    before_flush = transcriber.gen.state.steps
    assert before_flush == len(pcm) // 1920
    flushed = transcriber.flush()
    input_frames = -(-len(pcm) // 1920)
    assert transcriber.gen.state.steps == input_frames + 8  # ceil(0.5 * 12.5) + 1 silent frames
    assert isinstance(flushed[-1], Flushed) and flushed[-1].step == input_frames + 8
    assert any(isinstance(e, Word) for e in flushed)  # the last words come out in the flush

    # The same audio padded as the flush pads it, encoded whole, through feed_codes.
    padded = np.zeros((input_frames + 8) * 1920, dtype=np.float32)
    padded[: len(pcm)] = pcm
    codes = np.array(mimi.encode(padded[None, None]))[0]
    reference = Transcriber(lm, tokenizer)
    expected = reference.feed_codes(codes) + reference.flush()
    assert as_tuples(events + flushed) == as_tuples(expected)


def test_batch_of_two_inputs_equals_single_runs(lm, tokenizer, mimi):
    speech = read_audio(Path(__file__).parent / "fixtures" / "speech.wav")
    long, short = speech[24000 * 3: 24000 * 5], speech[24000 * 6: 24000 * 7 + 1000]
    transcriber = Transcriber(lm, tokenizer, mimi)
    both = transcriber.transcribe_pcm([long, short], chunk_frames=4)
    alone = [transcriber.transcribe_pcm([pcm], chunk_frames=4)[0] for pcm in (long, short)]
    for batched, single in zip(both, alone, strict=True):
        assert batched.to_json_dict() == single.to_json_dict()
        assert batched.steps == single.steps
    assert both[1].steps == -(-len(short) // 1920) + 8 < both[0].steps
