"""python -m moshi_mlx.stt end to end: codes and audio input, formats, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
from cli_run import run_main
from references import rust_golden_words

from moshi_mlx.stt import main


@pytest.fixture(scope="module")
def model_args(stt_dir: Path) -> list[str]:
    return ["--moshi-weight", str(stt_dir / "stt_pytorch.safetensors"),
            "--config", str(stt_dir / "stt_config.json"),
            "--tokenizer", str(stt_dir / "stt_tokenizer.model")]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_main(main, argv, capsys)


def test_codes_input_gives_the_official_word_logic(tmp_path, stt_dir, stt_golden, model_args,
                                                   capsys):
    # Steps 0..175 as the golden Rust events (175 frames), then the end closes the last word.
    codes = tmp_path / "codes.npy"
    np.save(codes, stt_golden["codes_v1"][None, :, :175].astype(np.int32))  # [1, 32, T] accepted
    code, out, err = run_cli([*model_args, "--codes", str(codes), "--format", "json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(stt_dir / "stt_tokenizer.model"))
    expected = rust_golden_words(stt_golden, tokenizer.decode)
    words = [(w["word"], w["start"], w["end"]) for w in result["words"]]
    assert [w for w, _, _ in words[: len(expected)]] == [w for w, _, _ in expected]
    np.testing.assert_allclose([t for _, s, e in words[: len(expected)] for t in (s, e)],
                               [t for _, s, e in expected for t in (s, e)], atol=1e-3)
    # The tokens after the last EPAD (step 168) are the last word, closed at the end.
    tail = [int(t) for t in stt_golden["torch_f32_B_v1_text"][169:176] if t not in (0, 3)]
    # It ends at the last step: 175 / 12.5 - 0.5.
    assert words[len(expected):] == [(tokenizer.decode(tail), words[-1][1], 13.5)]
    assert result["text"].split()[:3] == expected[0][0].split() + expected[1][0].split() + \
        expected[2][0].split()
    assert result["end_of_turn"] and all(isinstance(t, float) for t in result["end_of_turn"])


def test_audio_file_end_to_end_with_a_real_size_mimi(tmp_path, fixtures_dir, model_args,
                                                     random_mimi_path, capsys):
    out_file = tmp_path / "speech.json"
    code, out, err = run_cli([*model_args, "--mimi-weight", str(random_mimi_path),
                              str(fixtures_dir / "speech.wav"), "--format", "json",
                              "-o", str(out_file)], capsys)
    assert code == 0, err
    assert "real-time factor" in err
    result = json.loads(out_file.read_text())
    assert set(result) == {"text", "words", "end_of_turn"}
    duration = 303360 / 24000
    words = result["words"]
    assert words and all(set(w) == {"word", "start", "end"} for w in words)
    starts = [w["start"] for w in words]
    ends = [w["end"] for w in words]
    assert all(0 <= s <= e <= duration for s, e in zip(starts, ends, strict=True))
    assert all(e <= s for e, s in zip(ends, starts[1:], strict=False))  # never back in time
    assert result["end_of_turn"] == sorted(result["end_of_turn"])
    # Without the flush the last step that could close a word is 158 (12.14 s); the last word
    # closes later: it came out during the flush.
    assert ends[-1] > 158 / 12.5 - 0.5
    # Every transcribed piece is in exactly one word.
    assert "".join(result["text"].split()) == "".join("".join(w["word"].split()) for w in words)


def test_srt_and_vtt_outputs(tmp_path, stt_golden, model_args, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, stt_golden["codes_v1"])
    for fmt in ("srt", "vtt"):
        code, out, err = run_cli([*model_args, "--codes", str(codes), "--format", fmt], capsys)
        assert code == 0, err
        blocks = [b for b in out.strip().split("\n\n") if "-->" in b]
        assert blocks
        if fmt == "vtt":
            assert out.startswith("WEBVTT\n")
        times = [line for b in blocks for line in b.splitlines() if "-->" in line]
        separator = "," if fmt == "srt" else "."
        assert all(len(t.split(" --> ")[0]) == 12 and separator in t for t in times)


# --------------------------------------------------------------------------- errors


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


def test_moshi_checkpoint_is_refused(fixtures_dir, stt_dir, tmp_path, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((32, 4), dtype=np.int32))
    moshi = ["--moshi-weight", str(fixtures_dir / "lm_pytorch.safetensors"),
             "--tokenizer", str(stt_dir / "stt_tokenizer.model"), "--codes", str(codes)]
    code, _, err = run_cli([*moshi, "--config", str(fixtures_dir / "lm_config.json")], capsys)
    assert_one_line_error(code, err, "describes a Moshi model")
    code, _, err = run_cli([*moshi, "--config", str(stt_dir / "stt_config.json")], capsys)
    assert_one_line_error(code, err, "is a Moshi checkpoint")


def test_wrong_quantization_is_refused(official_stt_mlx_files, stt_dir, tmp_path, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((32, 4), dtype=np.int32))
    code, _, err = run_cli(["--moshi-weight", str(official_stt_mlx_files["q4"]),
                            "--config", str(stt_dir / "stt_config.json"),
                            "--tokenizer", str(stt_dir / "stt_tokenizer.model"),
                            "-q", "8", "--codes", str(codes)], capsys)
    assert_one_line_error(code, err, "4-bit quantized, but -q 8")


def test_codes_with_the_wrong_codebook_count_are_refused(model_args, tmp_path, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((8, 10), dtype=np.int32))
    code, _, err = run_cli([*model_args, "--codes", str(codes)], capsys)
    assert_one_line_error(code, err, "holds 8 codebooks; the STT model reads 32")


def test_unreadable_audio_is_refused(model_args, tmp_path, capsys):
    bad = tmp_path / "talk.wav"
    bad.write_text("not audio")
    code, _, err = run_cli([*model_args, str(bad)], capsys)
    assert_one_line_error(code, err, "cannot read audio")
    code, _, err = run_cli([*model_args], capsys)
    assert_one_line_error(code, err, "give audio file(s), --codes FILE.npy or --mic")


class FakeInput:
    """A 48 kHz stereo input device that plays `pcm` (24 kHz mono) as fast as it is read."""

    def __init__(self, pcm: np.ndarray) -> None:
        import soxr

        self.audio = np.repeat(soxr.resample(pcm, 24000, 48000)[:, None], 2, axis=1)

    def __call__(self, kind, device, callback):
        import threading
        from types import SimpleNamespace

        audio = self.audio

        def play() -> None:
            for start in range(0, len(audio), 4800):
                callback(audio[start:start + 4800], 4800, None, None)

        stream = SimpleNamespace(start=lambda: threading.Thread(target=play).start(),
                                 stop=lambda: None, close=lambda: None)
        return SimpleNamespace(stream=stream, sample_rate=48000, channels=2, blocksize=4800,
                               name="fake mic")


def test_mic_live_transcript(monkeypatch, fixtures_dir, model_args, random_mimi_path, capsys):
    from moshi_mlx import stt
    from moshi_mlx.audio import capture, io

    speech = io.read_audio(fixtures_dir / "speech.wav")[: 24000 * 3]
    monkeypatch.setattr(stt, "check_input_device", lambda device: None)
    monkeypatch.setattr(capture.devices, "open_stream", FakeInput(speech))
    code, out, err = run_cli([*model_args, "--mimi-weight", str(random_mimi_path), "--mic",
                              "--duration", "2", "--format", "json"], capsys)
    assert code == 0, err
    assert "listening on fake mic" in err and "2.0 s of audio" in err
    result = json.loads(out)
    assert result["words"] and result["words"][-1]["end"] <= 2.0
    assert all(w["start"] <= w["end"] for w in result["words"])


def test_text_of_one_file_is_printed_as_it_comes(tmp_path, fixtures_dir, model_args,
                                                 random_mimi_path, capsys):
    import soundfile

    speech, rate = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    clip = tmp_path / "clip.wav"
    soundfile.write(str(clip), speech[: rate * 2], rate)
    mimi = ["--mimi-weight", str(random_mimi_path)]
    code, live, err = run_cli([*model_args, *mimi, str(clip)], capsys)
    assert code == 0, err
    code, out, err = run_cli([*model_args, *mimi, str(clip), "--format", "json"], capsys)
    assert code == 0, err
    text = json.loads(out)["text"]
    assert text and live.endswith("\n") and live.split() == text.split()
