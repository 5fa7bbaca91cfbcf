"""Sesame's watermark through silentcipher. The real package needs torch and downloads its
model from the hub, neither of which these machines have, so a stand-in `silentcipher` module
(the documented `get_model` / `encode_wav` API of silentcipher 1.0.x) checks what we ask of
it and what we do with its answer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from moshi_mlx.speech.watermark import (
    MESSAGE_SDR_DB,
    SESAME_WATERMARK_KEY,
    WatermarkUnavailable,
    load_watermarker,
)
from moshi_mlx.tts import main

CSM = Path(__file__).parent / "fixtures" / "csm"
MODEL_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]

STAND_IN = '''
calls = []
fail = None


class Model:
    def encode_wav(self, y, orig_sr, message_list, message_sdr=None, calc_sdr=True,
                   disable_checks=False):
        calls.append({"samples": len(y), "sr": orig_sr, "message": list(message_list),
                      "message_sdr": message_sdr, "calc_sdr": calc_sdr})
        # a resampling round trip that drops the last sample, and a visible "mark"
        return y[:-1] * 0.5 + 0.001, 0


def get_model(model_type="44.1k", device="cpu", **kwargs):
    if fail:
        raise OSError(fail)
    assert model_type == "44.1k" and device == "cpu"
    return Model()
'''


@pytest.fixture
def silentcipher(tmp_path, monkeypatch):
    package = tmp_path / "stand_in" / "silentcipher"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "silentcipher", raising=False)
    import silentcipher

    yield silentcipher
    sys.modules.pop("silentcipher", None)


def test_applies_sesames_key_and_keeps_the_length(silentcipher):
    audio = np.linspace(-0.5, 0.5, 4800, dtype=np.float32)
    marked = load_watermarker().apply(audio, 24000)
    assert silentcipher.calls == [{"samples": 4800, "sr": 24000,
                                   "message": list(SESAME_WATERMARK_KEY),
                                   "message_sdr": MESSAGE_SDR_DB, "calc_sdr": False}]
    assert marked.dtype == np.float32 and marked.shape == audio.shape
    np.testing.assert_allclose(marked[:-1], audio[:-1] * 0.5 + 0.001, rtol=1e-6)
    assert marked[-1] == 0.0  # the sample silentcipher's resampling lost is padded, not dropped


def test_silence_is_left_alone(silentcipher):
    assert not load_watermarker().apply(np.zeros(1920, np.float32), 24000).any()
    assert silentcipher.calls == []


def test_unavailable_is_one_line(silentcipher, monkeypatch):
    monkeypatch.setattr(silentcipher, "fail", "Cannot reach the Hugging Face hub\nsecond line")
    with pytest.raises(WatermarkUnavailable, match="could not load its model: Cannot reach") \
            as exc:
        load_watermarker()
    assert "\n" not in str(exc.value)


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "silentcipher", None)  # import fails
    with pytest.raises(WatermarkUnavailable, match="silentcipher not installed"):
        load_watermarker()


def _speak(tmp_path, random_mimi_path, *extra) -> np.ndarray:
    wav = tmp_path / "out.wav"
    assert main(["Hello from Sesame.", "-o", str(wav), *MODEL_ARGS, "--mimi-weight",
                 str(random_mimi_path), "--temperature", "0", "--max-frames", "4", *extra]) == 0
    return soundfile.read(str(wav), dtype="float32")[0]


def test_cli_marks_the_whole_wav(silentcipher, random_mimi_path, tmp_path, capsys):
    plain = _speak(tmp_path, random_mimi_path, "--no-watermark")
    assert silentcipher.calls == []
    marked = _speak(tmp_path, random_mimi_path)
    assert "watermarked with silentcipher" in capsys.readouterr().err
    assert len(silentcipher.calls) == 1 and silentcipher.calls[0]["samples"] == len(plain)
    assert marked.shape == plain.shape
    np.testing.assert_allclose(marked[:-1], plain[:-1] * 0.5 + 0.001, atol=1e-6)


def test_cli_writes_the_audio_when_silentcipher_fails(silentcipher, random_mimi_path, tmp_path,
                                                      monkeypatch, capsys):
    plain = _speak(tmp_path, random_mimi_path, "--no-watermark")
    monkeypatch.setattr(silentcipher, "fail", "offline")
    audio = _speak(tmp_path, random_mimi_path)
    err = capsys.readouterr().err
    assert "note: audio not watermarked (silentcipher could not load its model: offline)" in err
    np.testing.assert_array_equal(audio, plain)
