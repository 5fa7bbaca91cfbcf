"""`python -m moshi_mlx.tts` end to end: the tiny reference CSM + a real-size random Mimi."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from moshi_mlx.audio.io import read_audio
from moshi_mlx.speech.generate import Segment, generate_speech
from moshi_mlx.tts import main

CSM = Path(__file__).parent / "fixtures" / "csm"
FRAME = 1920
MODEL_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]
CONTEXT_TEXT = "The quick brown fox jumps over the lazy dog."
TEXT = "Numbers like seven and twelve are spoken slowly."


def test_wav_and_codes_match_the_library(random_mimi_path, csm_library, tmp_path):
    wav, codes = tmp_path / "out.wav", tmp_path / "codes.npy"
    assert main(["Hello from Sesame.", "-o", str(wav), "--codes-out", str(codes), *MODEL_ARGS,
                 "--mimi-weight", str(random_mimi_path), "--temperature", "0.9", "--seed", "5",
                 "--max-frames", "8"]) == 0
    expected = generate_speech(*csm_library, "Hello from Sesame.", 0, temperature=0.9,
                               max_frames=8, seed=5)
    written = np.load(codes)
    assert written.shape == (32, len(expected)) and len(expected) > 0
    np.testing.assert_array_equal(written.T, expected)
    pcm, rate = soundfile.read(str(wav), dtype="float32")
    assert rate == 24000 and pcm.shape == (len(expected) * FRAME,)
    assert np.abs(pcm).max() > 0


def test_codes_only_does_not_load_mimi(tmp_path, csm_library):
    codes = tmp_path / "codes.npy"
    assert main(["Hello from Sesame.", "--codes-out", str(codes), *MODEL_ARGS,
                 "--mimi-weight", str(tmp_path / "no_such_mimi.safetensors"),
                 "--temperature", "0", "--max-seconds", "0.8"]) == 0
    expected = generate_speech(*csm_library, "Hello from Sesame.", 0, temperature=0, max_frames=10)
    np.testing.assert_array_equal(np.load(codes).T, expected)


def test_context_from_a_wav(random_mimi_path, csm_library, mimi32, tmp_path):
    wav, codes = tmp_path / "out.wav", tmp_path / "codes.npy"
    clip = CSM / "context_speech.wav"
    assert main([TEXT, "-o", str(wav), "--codes-out", str(codes), *MODEL_ARGS,
                 "--mimi-weight", str(random_mimi_path), "--speaker", "1",
                 "--context-audio", str(clip), "--context-text", CONTEXT_TEXT,
                 "--context-speaker", "1", "--temperature", "0", "--max-frames", "6"]) == 0
    context = [Segment(1, CONTEXT_TEXT, audio=read_audio(clip))]
    expected = generate_speech(*csm_library, TEXT, 1, context, temperature=0, max_frames=6,
                               mimi=mimi32)
    np.testing.assert_array_equal(np.load(codes).T, expected)
    assert soundfile.info(str(wav)).frames == len(expected) * FRAME
    # The context really conditions the output: without it the frames differ.
    alone = generate_speech(*csm_library, TEXT, 1, temperature=0, max_frames=6)
    assert not np.array_equal(alone, expected)

    # Same context through a JSON file (paths relative to it).
    (tmp_path / "ctx.json").write_text(json.dumps(
        [{"speaker": 1, "text": CONTEXT_TEXT, "audio": str(clip.resolve())}]))
    codes2 = tmp_path / "codes2.npy"
    assert main([TEXT, "--codes-out", str(codes2), *MODEL_ARGS, "--speaker", "1",
                 "--mimi-weight", str(random_mimi_path), "--context", str(tmp_path / "ctx.json"),
                 "--temperature", "0", "--max-frames", "6"]) == 0
    np.testing.assert_array_equal(np.load(codes2), np.load(codes))


def test_stream_writes_the_same_audio(random_mimi_path, tmp_path):
    whole, streamed = tmp_path / "whole.wav", tmp_path / "streamed.wav"
    common = ["Hello from Sesame.", *MODEL_ARGS, "--mimi-weight", str(random_mimi_path),
              "--temperature", "0", "--max-frames", "5"]
    assert main([*common, "-o", str(whole)]) == 0
    assert main([*common, "-o", str(streamed), "--stream"]) == 0
    a, _ = soundfile.read(str(whole), dtype="float32")
    b, _ = soundfile.read(str(streamed), dtype="float32")
    assert a.shape == b.shape == (5 * FRAME,)
    np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize("extra, message", [
    (["--speaker", "alice"], "--speaker must be an int"),
    (["-q", "3"], "-q must be 4 or 8"),
    (["--context-audio", str(CSM / "context_speech.wav"), "--context-audio",
      str(CSM / "context_speech.wav"), "--context-text", "Hi."], "needs its --context-text"),
    (["--max-frames", "2040"], "too long"),
    (["--play", "--prebuffer", "-1"], "--prebuffer must be >= 0 seconds"),
])
def test_bad_arguments_are_one_line_errors(extra, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.tts", "Hello.", "--codes-out", str(tmp_path / "c.npy"),
         *MODEL_ARGS, *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_a_moshi_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"dim": 64, "text_card": 10, "dep_q": 8}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"x": mx.zeros((1,))})
    with pytest.raises(SystemExit) as exit_info:
        main(["Hello.", "--codes-out", str(tmp_path / "c.npy"), "--weights", str(tmp_path),
              "--tokenizer", str(CSM / "tokenizer.json")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "describes a Moshi model" in err and "python -m moshi_mlx.local" in err


def test_ctrl_c_while_streaming_leaves_a_valid_wav(mimi32, csm_library, tmp_path):
    from moshi_mlx.speech.output import write_streaming

    frames = generate_speech(*csm_library, "Hello from Sesame.", 0, temperature=0, max_frames=3)

    def interrupted():
        yield frames[0]
        yield frames[1]
        raise KeyboardInterrupt

    wav = tmp_path / "cut.wav"
    kept = write_streaming(wav, interrupted(), mimi32)
    assert len(kept) == 2
    pcm, rate = soundfile.read(str(wav), dtype="float32")
    assert rate == 24000 and pcm.shape == (2 * FRAME,)
