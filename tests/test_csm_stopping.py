"""The CSM stop rules (moshi_mlx.speech.stopping) on planted frames and audio: each reason is
triggered where it should be, and a normal end is never cut."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from moshi_mlx.errors import MoshiError
from moshi_mlx.loading.models import load_csm, read_csm_config
from moshi_mlx.speech.generate import (
    build_prompt,
    frames_to_audio,
    generate_speech,
    stream_decoded,
    stream_speech,
)
from moshi_mlx.speech.stopping import (
    KEPT_PAUSE_FRAMES,
    SESAME_MAX_FRAMES,
    StopRules,
    frame_budget,
)
from moshi_mlx.tts import main

CSM = Path(__file__).parent / "fixtures" / "csm"
FRAME = 1920
K = 32
MODEL_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]
LOUD, QUIET = 1000, 1  # codebook 1 of a planted frame: its audio level (see FakeMimi)


def frame(index: int, level: int = LOUD) -> np.ndarray:
    """A frame unlike every other index (codebook 0), whose FakeMimi audio has `level`."""
    codes = np.full(K, 7, np.int32)
    codes[0], codes[1] = 1 + index % 2000, level
    return codes


def policy(rules: str = "all", limit: int = 10_000, reason: str = "max", **kw):
    return StopRules(rules, **kw).policy(limit, reason)


def feed(stop, frames) -> list[str | None]:
    return [stop.on_frame(f) for f in frames]


class FakeMimi:
    """A Mimi stand-in: a frame decodes to 1920 samples of a constant, codebook 1 / 2047 * 0.5
    (LOUD: -12 dBFS, QUIET: -72 dBFS)."""

    def new_decoder_state(self):
        return None

    def decode_step(self, codes: np.ndarray, state) -> np.ndarray:
        return np.full((1, 1, FRAME), codes[0, 1, 0] / 2047 * 0.5, np.float32)


class PlantedSpeech:
    """Planted frames behind a StopPolicy, with SpeechStream's stop surface (hear, trim_frames,
    may_trim, stop_reason)."""

    def __init__(self, frames: list[np.ndarray], **rules) -> None:
        self.frames, self.policy = list(frames), policy(**rules)
        self.stop_reason: str | None = None
        self._pending: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._pending or not self.frames:
            self.stop_reason = self.stop_reason or self._pending or "end"
            raise StopIteration
        codes = self.frames.pop(0)
        self._pending = self.policy.on_frame(codes)
        if self._pending == "eos":  # not emitted, as in SpeechStream
            self.stop_reason = "eos"
            raise StopIteration
        return codes

    def hear(self, pcm):
        reason = self.policy.on_audio(pcm)
        self._pending = self._pending or reason
        return reason

    @property
    def trim_frames(self) -> int:
        return self.policy.trim_frames

    @property
    def may_trim(self) -> int:
        return self.policy.may_trim


def pcm_at(db: float) -> np.ndarray:
    return np.full(FRAME, 10 ** (db / 20), np.float32)


# ---------------------------------------------------------------- each reason


def test_the_all_zero_frame_is_eos_in_both_rule_sets():
    for rules in ("all", "eos"):
        stop = policy(rules)
        assert feed(stop, [frame(i) for i in range(5)]) == [None] * 5
        assert stop.on_frame(np.zeros(K, np.int32)) == "eos"
        assert stop.frames == 5  # the zero frame is not counted


def test_one_frame_repeated_eight_times_is_a_repeat():
    stop = policy()
    assert feed(stop, [frame(i) for i in range(4)]) == [None] * 4
    same = frame(99)
    assert feed(stop, [same] * 7) == [None] * 7  # seven copies: a plateau, not yet a loop
    assert stop.on_frame(same) == "repeat"


@pytest.mark.parametrize("cycle, copies", [(2, 4), (3, 3)])
def test_a_short_cycle_repeated_is_a_repeat(cycle, copies):
    stop = policy()
    assert feed(stop, [frame(i) for i in range(3)]) == [None] * 3
    loop = [frame(50 + i) for i in range(cycle)] * copies
    assert feed(stop, loop[:-1]) == [None] * (len(loop) - 1)
    assert stop.on_frame(loop[-1]) == "repeat"


def test_repeats_are_sesame_s_business_with_stop_eos():
    stop = policy("eos")
    assert feed(stop, [frame(3)] * 40) == [None] * 40


def test_a_long_quiet_tail_after_speech_is_silence_trimmed_to_a_short_pause():
    stop = policy(max_silence=1.0)  # 12.5 frames -> the 13th quiet frame stops
    assert [stop.on_audio(pcm_at(-20)) for _ in range(6)] == [None] * 6
    quiet = [stop.on_audio(pcm_at(-60)) for _ in range(13)]
    assert quiet == [None] * 12 + ["silence"]
    assert stop.trim_frames == 13 - KEPT_PAUSE_FRAMES


def test_the_default_silence_is_two_seconds_at_minus_40_dbfs():
    stop = policy()
    stop.on_audio(pcm_at(-39))  # speech: at or above the level
    assert [stop.on_audio(pcm_at(-41)) for _ in range(25)] == [None] * 24 + ["silence"]
    assert stop.trim_frames == 25 - KEPT_PAUSE_FRAMES


def test_the_budget_grows_with_the_text():
    assert frame_budget("a" * 10) == 25 + 3 * 10
    assert frame_budget("Hello   from\nSesame.") == 25 + 3 * len("Hello from Sesame.")
    assert frame_budget("a" * 5000) == SESAME_MAX_FRAMES
    assert StopRules().limit("a" * 10, room=500, max_frames=None) == (55, "budget")
    assert StopRules().limit("a" * 10, room=500, max_frames=7) == (7, "max")
    assert StopRules("eos").limit("a" * 10, room=2000, max_frames=None) == (1125, "max")
    stop = policy(limit=3, reason="budget")
    assert feed(stop, [frame(i) for i in range(3)]) == [None, None, "budget"]


def test_the_context_limit_is_the_reason_when_it_binds_first():
    assert StopRules().limit("a" * 100, room=40, max_frames=None) == (40, "context")
    assert StopRules("eos").limit("a", room=40, max_frames=None) == (40, "context")
    stop = policy(limit=40, reason="context")
    assert feed(stop, [frame(i) for i in range(40)])[-2:] == [None, "context"]


def test_a_stream_reports_its_budget_and_context(csm_library):
    model, tokenizer = csm_library
    text = "Numbers like seven and twelve are spoken slowly."
    stream = stream_speech(model, tokenizer, text, 0, temperature=0)
    assert (stream.max_frames, stream.policy.limit_reason) == (frame_budget(text), "budget")
    frames = list(stream)
    assert stream.stop_reason == "budget" and len(frames) == frame_budget(text)

    full = read_csm_config(CSM / "sesame" / "config.json")
    small = dataclasses.replace(full, backbone=dataclasses.replace(full.backbone, max_seq_len=64))
    tiny = load_csm(CSM / "sesame", config=small, dtype=mx.float32)
    stream = stream_speech(tiny, tokenizer, text, 0, temperature=0)
    room = 64 - 1 - len(build_prompt(tokenizer, [], 0, text)[0])
    assert room < frame_budget(text)
    frames, reason = generate_speech(tiny, tokenizer, text, 0, temperature=0, return_stop=True)
    assert (len(frames), reason) == (room, "context")


def test_bad_rules_are_refused():
    with pytest.raises(MoshiError, match="stop rules must be one of all, eos"):
        StopRules("never")
    with pytest.raises(MoshiError, match="max_silence must be > 0"):
        StopRules(max_silence=0)


# ---------------------------------------------------------------- a normal end is never cut


def test_speech_with_pauses_shorter_than_max_silence_runs_to_its_end():
    stop = policy()
    reasons = []
    for _ in range(6):
        reasons += [stop.on_audio(pcm_at(-18)) for _ in range(10)]
        reasons += [stop.on_audio(pcm_at(-70)) for _ in range(24)]  # 1.92 s < 2 s
    assert reasons == [None] * len(reasons)


def test_quiet_audio_before_speech_starts_does_not_stop():
    stop = policy(max_silence=0.5)
    assert [stop.on_audio(pcm_at(-70)) for _ in range(100)] == [None] * 100
    assert stop.may_trim == 0


def test_varied_frames_never_repeat():
    rng = np.random.default_rng(0)
    stop = policy()
    frames = rng.integers(0, 2048, (300, K), dtype=np.int32)
    assert feed(stop, frames) == [None] * 300
    # a code shared by neighbours (a slow codebook) is not a repeated frame
    frames[:, :8] = 5
    assert feed(policy(), frames) == [None] * 300


# ---------------------------------------------------------------- decoding and trimming


def test_stream_decoded_holds_back_only_what_a_silence_could_trim():
    frames = [frame(i) for i in range(5)] + [frame(10 + i, QUIET) for i in range(10)] + \
        [frame(30 + i) for i in range(3)] + [frame(40 + i, QUIET) for i in range(40)]
    speech = PlantedSpeech(frames)
    heard = []
    out = list(stream_decoded(FakeMimi(), speech, on_audio=heard.append))
    assert speech.stop_reason == "silence"
    assert speech.trim_frames == 25 - KEPT_PAUSE_FRAMES
    # the 1.0 s pause is kept; of the last quiet run, 3 frames are kept
    kept = frames[: 5 + 10 + 3 + KEPT_PAUSE_FRAMES]
    assert len(out) == len(kept)
    for (got, pcm), want in zip(out, kept, strict=True):
        np.testing.assert_array_equal(got, want)
        assert pcm.shape == (FRAME,)
    assert len(heard) == 5 + 10 + 3 + 25  # the speaker heard every decoded frame


def test_an_eos_inside_a_pause_keeps_the_whole_pause():
    frames = [frame(i) for i in range(4)] + [frame(10 + i, QUIET) for i in range(8)] + \
        [np.zeros(K, np.int32)]
    speech = PlantedSpeech(frames)
    out = list(stream_decoded(FakeMimi(), speech))
    assert speech.stop_reason == "eos" and len(out) == 12


def test_the_trimmed_tail_is_not_written(tmp_path):
    from moshi_mlx.speech.output import decode_all, write_streaming

    frames = [frame(i) for i in range(6)] + [frame(20 + i, QUIET) for i in range(30)]
    wav = tmp_path / "streamed.wav"
    written = write_streaming(wav, PlantedSpeech(frames), FakeMimi())
    assert len(written) == 6 + KEPT_PAUSE_FRAMES
    assert soundfile.info(str(wav)).frames == (6 + KEPT_PAUSE_FRAMES) * FRAME
    kept, audio = decode_all(PlantedSpeech(frames), FakeMimi())
    assert len(kept) == 6 + KEPT_PAUSE_FRAMES and audio.shape == (len(kept) * FRAME,)


# ---------------------------------------------------------------- the command


def test_the_cli_prints_the_reason_and_stop_eos_is_sesame_s_behaviour(
        random_mimi_path, csm_library, mimi32, tmp_path, capsys):
    text = "Hello from Sesame."
    codes = tmp_path / "codes.npy"
    assert main([text, "--codes-out", str(codes), *MODEL_ARGS, "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{frame_budget(text)} frames" in err and "stopped: budget\n" in err, err
    assert np.load(codes).shape == (K, frame_budget(text))

    wav = tmp_path / "eos.wav"
    assert main([text, "-o", str(wav), "--codes-out", str(codes), *MODEL_ARGS,
                 "--mimi-weight", str(random_mimi_path), "--temperature", "0.9", "--seed", "2",
                 "--max-frames", "6", "--stop", "eos", "--no-watermark"]) == 0
    assert "stopped: max\n" in capsys.readouterr().err
    expected, reason = generate_speech(*csm_library, text, 0, temperature=0.9, seed=2,
                                       max_frames=6, stop="eos", return_stop=True)
    assert reason == "max"
    np.testing.assert_array_equal(np.load(codes).T, expected)
    pcm, _ = soundfile.read(str(wav), dtype="float32")
    np.testing.assert_array_equal(pcm, frames_to_audio(mimi32, expected))  # the whole-clip decode


def test_cli_rejects_a_bad_max_silence(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["Hi.", "--codes-out", str(tmp_path / "c.npy"), *MODEL_ARGS,
              "--max-silence", "0"])
    assert exit_info.value.code == 1
    assert "--max-silence must be > 0 seconds" in capsys.readouterr().err


class ScriptedMimi:
    """Audio by the order of decoding: `levels[i]` dBFS for the i-th frame decoded."""

    def __init__(self, levels: list[float]) -> None:
        self.levels = list(levels)

    def new_decoder_state(self):
        return None

    def decode_step(self, codes: np.ndarray, state) -> np.ndarray:
        return pcm_at(self.levels.pop(0))[None, None]


def test_a_silent_tail_ends_its_sentence_and_leaves_the_context(csm_library):
    """Sentence one turns quiet after 3 frames: with max_silence 0.5 s it stops at the 7th
    quiet frame, its last 4 frames are dropped, and sentence two is conditioned on the 6
    frames kept (what a library call with that context gives)."""
    from moshi_mlx.speech.generate import Segment, stream_long_speech

    model, tokenizer = csm_library
    one, two = "Hello from Sesame.", "Slowly now."
    rules = StopRules(max_silence=0.5)
    speech = stream_long_speech(model, tokenizer, f"{one} {two}", 0, temperature=0, stop=rules)
    mimi = ScriptedMimi([-20] * 3 + [-60] * 7 + [-20] * 200)
    out = np.stack([f for f, _ in stream_decoded(mimi, speech)])
    assert speech.stop_reasons[0] == "silence" and speech.trimmed_frames == 4
    alone = generate_speech(model, tokenizer, one, 0, temperature=0, max_frames=6)
    np.testing.assert_array_equal(out[:6], alone)
    after = generate_speech(model, tokenizer, two, 0, [Segment(0, one, codes=alone.T)],
                            temperature=0, stop=rules)
    np.testing.assert_array_equal(out[6:], after)
    assert speech.stop_reasons[1] in ("eos", "repeat", "budget")
