"""moshi_mlx.audio.io: any rate / channel count in, 24 kHz mono out; atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from moshi_mlx.audio.io import read_audio, resample, write_audio


def _tone(freq: float, rate: int, seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_frequency(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_read_converts_rate_and_channels(tmp_path, rate):
    left = _tone(440.0, rate, 1.0, 0.4)
    right = _tone(1000.0, rate, 1.0, 0.2)
    path = tmp_path / "stereo.wav"
    soundfile.write(str(path), np.stack([left, right], axis=1), rate, subtype="PCM_16")
    pcm = read_audio(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(len(pcm) - 24000) <= 1
    # The mono mix is the channel mean: both tones at half their amplitude.
    middle = pcm[2400:-2400]
    spectrum = np.abs(np.fft.rfft(middle)) * 2 / len(middle)
    freqs = np.fft.rfftfreq(len(middle), 1 / 24000)
    for freq, amplitude in ((440.0, 0.2), (1000.0, 0.1)):
        near = np.abs(freqs - freq) < 3
        assert abs(spectrum[near].max() - amplitude) < 0.02


def test_read_24k_mono_is_unchanged(fixtures_dir):
    pcm = read_audio(fixtures_dir / "speech.wav")
    raw, _ = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    np.testing.assert_array_equal(pcm, raw)


def test_resample_keeps_the_pitch():
    tone = _tone(1500.0, 44100, 0.5, 0.5)
    out = resample(tone, 44100, 24000)
    assert abs(len(out) - 12000) <= 1
    assert abs(_peak_frequency(out, 24000) - 1500.0) < 5


def test_write_mono_and_multichannel(tmp_path):
    mono = _tone(300.0, 24000, 0.2, 0.5)
    write_audio(tmp_path / "mono.wav", mono)
    back, rate = soundfile.read(str(tmp_path / "mono.wav"), dtype="float32")
    assert rate == 24000
    np.testing.assert_allclose(back, mono, atol=1e-6)
    stereo = np.stack([mono, -mono], axis=1)
    write_audio(tmp_path / "stereo.wav", stereo, sample_rate=48000)
    back, rate = soundfile.read(str(tmp_path / "stereo.wav"), dtype="float32")
    assert rate == 48000 and back.shape == stereo.shape
    np.testing.assert_allclose(back, stereo, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mono.wav", "stereo.wav"]  # no temps


def test_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.wav"
    path.write_bytes(b"old")
    write_audio(path, np.zeros(100, np.float32))
    assert soundfile.info(str(path)).frames == 100
