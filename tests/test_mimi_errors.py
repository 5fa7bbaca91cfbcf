"""Bad weights and bad audio give one clear WeightsError/AudioError line (and exit 1 in the CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from moshi_mlx.errors import AudioError, WeightsError
from moshi_mlx.loading.models import load_mimi


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_missing_weights(tmp_path):
    with pytest.raises(WeightsError) as exc:
        load_mimi(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in _one_line(exc)


def test_folder_without_the_checkpoint(tmp_path):
    with pytest.raises(WeightsError) as exc:
        load_mimi(tmp_path)
    assert "tokenizer-e351c8d8-checkpoint125.safetensors" in _one_line(exc)


@pytest.mark.parametrize("keep", [10, 50_000, 200_000_000])
def test_truncated_weights(random_mimi_path, tmp_path, keep):
    broken = tmp_path / "truncated.safetensors"
    with open(random_mimi_path, "rb") as src:
        broken.write_bytes(src.read(keep))
    with pytest.raises(WeightsError) as exc:
        load_mimi(broken)
    assert "truncated.safetensors" in _one_line(exc)


def test_not_a_safetensors_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(WeightsError) as exc:
        load_mimi(junk)
    _one_line(exc)


def test_not_a_mimi_checkpoint(fixtures_dir):
    with pytest.raises(WeightsError) as exc:
        load_mimi(fixtures_dir / "lm_pytorch.safetensors")  # a Moshi LM, not Mimi
    assert "not a Mimi checkpoint" in _one_line(exc)


def test_mimi_checkpoint_with_a_wrong_shape(tmp_path):
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    from moshi_mlx.models.mimi import Mimi

    # Every expected tensor present (names mapped back to the official ones), one of them
    # with the wrong shape.
    tensors = {}
    for key, value in tree_flatten(Mimi().parameters()):
        key = key.replace(".codebook.", "._codebook.").replace(
            ".self_attn.in_proj.weight", ".self_attn.in_proj_weight"
        )
        tensors[key] = np.zeros((1,) if value.ndim == 1 else (2, 2, 2)[: value.ndim], np.float32)
    path = tmp_path / "shapes.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsError) as exc:
        load_mimi(path)
    assert "shape" in _one_line(exc)


@pytest.fixture
def bad_wavs(tmp_path) -> dict[str, Path]:
    files = {}
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    files["empty"] = empty
    zero = tmp_path / "zero.wav"
    soundfile.write(str(zero), np.zeros(0, np.float32), 24000, subtype="PCM_16")
    files["zero_length"] = zero
    nan = tmp_path / "nan.wav"
    pcm = np.zeros(4000, np.float32)
    pcm[1234] = np.nan
    soundfile.write(str(nan), pcm, 24000, subtype="FLOAT")
    files["nan"] = nan
    files["missing"] = tmp_path / "missing.wav"
    text = tmp_path / "text.wav"
    text.write_text("hello")
    files["not_audio"] = text
    return files


@pytest.mark.parametrize("kind", ["empty", "zero_length", "nan", "missing", "not_audio"])
def test_read_audio_rejects(bad_wavs, kind):
    from moshi_mlx.audio.io import read_audio

    with pytest.raises(AudioError) as exc:
        read_audio(bad_wavs[kind])
    assert bad_wavs[kind].name in _one_line(exc)


def _model_without_weights():
    from moshi_mlx.models.mimi import Mimi

    return Mimi()  # zero weights suffice: these inputs must be refused before any compute


@pytest.mark.parametrize("as_mx", [False, True])
def test_encode_rejects_nan_and_empty(as_mx):
    import mlx.core as mx

    mimi = _model_without_weights()
    nan = np.zeros((1, 1, 1920), np.float32)
    nan[0, 0, 7] = np.nan
    for bad in (nan, np.zeros((1, 1, 0), np.float32)):
        data = mx.array(bad) if as_mx else bad
        with pytest.raises(AudioError):
            mimi.encode(data)
        with pytest.raises(AudioError):
            mimi.encode_step(data, mimi.new_encoder_state())
    with pytest.raises(AudioError):  # not a whole frame
        mimi.encode_step(np.zeros((1, 1, 1000), np.float32), mimi.new_encoder_state())
    with pytest.raises(TypeError, match="EncoderState"):
        mimi.encode_step(np.zeros((1, 1, 1920), np.float32), mimi.new_decoder_state())
    with pytest.raises(ValueError):
        mimi.decode(np.full((1, 8, 2), 2048, np.int32))  # out of the codebook


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moshi_mlx.mimi", *args], capture_output=True, text=True, timeout=120
    )


def _assert_cli_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


@pytest.mark.parametrize("kind", ["empty", "zero_length", "nan", "missing"])
def test_cli_encode_bad_audio(bad_wavs, tmp_path, kind):
    result = _cli("encode", str(bad_wavs[kind]), str(tmp_path / "codes.npy"))
    _assert_cli_error(result, bad_wavs[kind].name)
    assert not (tmp_path / "codes.npy").exists()


def test_cli_bad_weights(fixtures_dir, tmp_path):
    wav = fixtures_dir / "speech.wav"
    _assert_cli_error(
        _cli("encode", str(wav), str(tmp_path / "c.npy"), "--weights", str(tmp_path / "no.st")),
        "no.st",
    )
    lm = fixtures_dir / "lm_pytorch.safetensors"
    _assert_cli_error(
        _cli("encode", str(wav), str(tmp_path / "c.npy"), "--weights", str(lm)),
        "not a Mimi checkpoint",
    )
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(lm.read_bytes()[:5000])
    _assert_cli_error(
        _cli("encode", str(wav), str(tmp_path / "c.npy"), "--weights", str(truncated)),
        "t.safetensors",
    )


def test_cli_decode_bad_codes(tmp_path):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.full((8, 3), 5000, np.int64))
    _assert_cli_error(_cli("decode", str(codes), str(tmp_path / "o.wav")), "0..2047")
    np.save(codes, np.zeros((8, 0), np.int64))
    _assert_cli_error(_cli("decode", str(codes), str(tmp_path / "o.wav")), "codes")
    assert not (tmp_path / "o.wav").exists()


def test_load_from_a_folder_uses_the_official_file_name(random_mimi_path, tmp_path):
    (tmp_path / "tokenizer-e351c8d8-checkpoint125.safetensors").symlink_to(random_mimi_path)
    mimi = load_mimi(tmp_path, num_codebooks=3)
    assert mimi.num_codebooks == 3
    assert mimi.encode(np.zeros(1920, np.float32)).shape == (1, 3, 1)


def test_cli_repo_id_not_in_the_offline_cache(fixtures_dir, tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.mimi", "encode", str(fixtures_dir / "speech.wav"),
         str(tmp_path / "c.npy"), "--weights", "kyutai/moshiko-pytorch-bf16"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    _assert_cli_error(result, "tokenizer-e351c8d8-checkpoint125.safetensors")
