"""`python -m moshi_mlx.local` in file mode: the conversation loop on a recording."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from moshi_mlx.audio.display import TextDisplay
from moshi_mlx.audio.fileloop import run_file
from moshi_mlx.conversation.engine import Engine, EngineOptions
from moshi_mlx.local import main
from moshi_mlx.modules.sampling import SamplingSettings

FIXTURES = Path(__file__).parent / "fixtures"
SPEECH = FIXTURES / "speech.wav"


def _model_argv(mimi: Path, backend: str = "rustymimi") -> list[str]:
    return [
        "--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
        "--config", str(FIXTURES / "lm_config.json"),
        "--tokenizer", str(FIXTURES / "tokenizer.model"),
        "--mimi-weight", str(mimi),
        "--mimi-backend", backend,
        "--text-temp", "0", "--audio-temp", "0", "--seed", "7",
    ]


def _parse_transcript(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        start, word = line.split("\t")
        rows.append((float(start), word))
    return rows


def test_file_mode_on_speech_is_frame_exact_reproducible_and_transcribed(
    random_mimi_path, tmp_path, capsys
):
    speech_int16, rate = soundfile.read(str(SPEECH), dtype="int16")
    assert rate == 24000 and len(speech_int16) == 303360

    mono, text1 = tmp_path / "mono.wav", tmp_path / "mono.txt"
    assert main([*_model_argv(random_mimi_path), "--input-file", str(SPEECH),
                 "--output-file", str(mono), "--transcript", str(text1)]) == 0
    out1 = capsys.readouterr()
    stereo, text2 = tmp_path / "stereo.wav", tmp_path / "stereo.txt"
    assert main([*_model_argv(random_mimi_path), "--input-file", str(SPEECH),
                 "--output-file", str(stereo), "--transcript", str(text2), "--stereo"]) == 0
    out2 = capsys.readouterr()

    moshi, rate = soundfile.read(str(mono), dtype="int16")
    assert rate == 24000 and moshi.ndim == 1
    assert len(moshi) == len(speech_int16)  # same length as the input, to the sample
    assert np.abs(moshi[1920:]).max() > 300  # Moshi says something after the first frame
    assert np.all(moshi[:1920] == 0)  # nothing yet at step 0

    both, _ = soundfile.read(str(stereo), dtype="int16")
    assert both.shape == (len(speech_int16), 2)
    np.testing.assert_array_equal(both[:, 0], moshi)  # greedy: the same conversation again
    np.testing.assert_array_equal(both[:, 1], speech_int16)  # the user, untouched

    # transcript: time-stamped words, identical across runs, the same words as printed live
    rows = _parse_transcript(text1)
    assert rows and rows == _parse_transcript(text2)
    starts = [s for s, _ in rows]
    assert starts == sorted(starts) and starts[-1] < 303360 / 24000
    assert all(abs(s / 0.08 - round(s / 0.08)) < 1e-6 for s in starts)
    assert [w for _, w in rows] == out1.out.split() == out2.out.split()
    assert "\x1b" not in out1.out  # plain text when not a terminal
    summary = out1.err.strip().splitlines()[-1]
    assert "frames 158" in summary and "late frames" in summary and "latency" in summary


def test_odd_length_input_keeps_its_length(random_mimi_path, tmp_path):
    speech, _ = soundfile.read(str(SPEECH), dtype="float32")
    clip = tmp_path / "clip.wav"
    soundfile.write(str(clip), speech[: 2 * 1920 + 777], 24000, subtype="PCM_16")
    out = tmp_path / "out.wav"
    assert main([*_model_argv(random_mimi_path), "--input-file", str(clip),
                 "--output-file", str(out), "--stereo"]) == 0
    data, _ = soundfile.read(str(out), dtype="float32")
    assert data.shape == (2 * 1920 + 777, 2)


def test_sampling_is_reproducible_with_a_seed(random_mimi_path, tmp_path):
    def run(seed: int) -> tuple[bytes, str]:
        out, text = tmp_path / f"o{seed}.wav", tmp_path / f"t{seed}.txt"
        # the files and backend of _model_argv, default temperatures, this seed
        argv = _model_argv(random_mimi_path)[:10] + ["--seed", str(seed)]
        clip = tmp_path / "clip.wav"
        speech, _ = soundfile.read(str(SPEECH), dtype="float32")
        soundfile.write(str(clip), speech[: 12 * 1920], 24000, subtype="PCM_16")
        assert main([*argv, "--input-file", str(clip), "--output-file", str(out),
                     "--transcript", str(text)]) == 0
        return out.read_bytes(), text.read_text()

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other  # sampling is on (default temperatures) and the seed matters


class _InterruptAfter:
    """The real engine, with Ctrl-C arriving during frame `n`."""

    def __init__(self, engine: Engine, n: int):
        self.engine, self.n, self.calls = engine, n, 0

    def process(self, pcm):
        self.calls += 1
        if self.calls > self.n:
            raise KeyboardInterrupt
        return self.engine.process(pcm)


def test_interrupted_run_leaves_valid_files(random_mimi_path, tmp_path):
    engine = Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", random_mimi_path, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json",
        options=EngineOptions(sampling=SamplingSettings(text_temp=0.0, audio_temp=0.0)),
    )  # default MLX Mimi
    out, text = tmp_path / "cut.wav", tmp_path / "cut.txt"
    stats = run_file(_InterruptAfter(engine, 4), SPEECH, out, text, stereo=True,
                     display=TextDisplay(tty=False))
    assert stats.frames == 4
    info = soundfile.info(str(out))
    assert info.frames == 4 * 1920 and info.channels == 2
    data, _ = soundfile.read(str(out), dtype="int16")
    speech, _ = soundfile.read(str(SPEECH), dtype="int16")
    np.testing.assert_array_equal(data[:, 1], speech[: 4 * 1920])
    assert text.exists()


@pytest.mark.parametrize(
    "argv",
    [["--output-file", "x.wav"], ["--input-file", str(SPEECH)], ["--stereo"]],
)
def test_file_mode_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
