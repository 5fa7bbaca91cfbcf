"""`python -m moshi_mlx.mimi encode/decode` end to end, checked against rustymimi."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import rustymimi
import soundfile
import soxr

FRAME = 1920


def test_cli_encode_decode_roundtrip(random_mimi_path, fixtures_dir, tmp_path):
    speech, _ = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    clip = speech[20 * FRAME : 30 * FRAME]  # 10 frames
    # A 48 kHz stereo file: the CLI must bring it back to 24 kHz mono.
    at_48k = soxr.resample(clip, 24000, 48000)
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), np.stack([at_48k, 0.5 * at_48k], axis=1), 48000, subtype="FLOAT")
    expected_mono = soxr.resample(0.75 * at_48k, 48000, 24000, quality="HQ").astype(np.float32)

    codes_path = tmp_path / "codes.npy"
    weights = ["--weights", str(random_mimi_path)]
    run = [sys.executable, "-m", "moshi_mlx.mimi"]
    subprocess.run([*run, "encode", str(wav), str(codes_path), *weights], check=True, timeout=300)
    codes = np.load(codes_path)
    tok = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=8)
    reference = tok.encode(expected_mono[None, None])[0]
    assert codes.dtype == np.int32 and codes.shape == reference.shape == (8, 10)
    assert (codes == reference).mean() >= 0.99

    out_wav = tmp_path / "out.wav"
    subprocess.run([*run, "decode", str(codes_path), str(out_wav), *weights], check=True,
                   timeout=300)
    decoded, rate = soundfile.read(str(out_wav), dtype="float32")
    assert rate == 24000 and decoded.ndim == 1
    tok.reset()
    expected = tok.decode(np.ascontiguousarray(codes[None].astype(np.uint32)))[0, 0]
    assert decoded.shape == expected.shape == (10 * FRAME,)
    assert np.abs(decoded - expected).max() < 0.005

    # --codebooks: 3 codebooks out of the file's 8 decode like rustymimi with 3.
    subprocess.run([*run, "decode", str(codes_path), str(out_wav), "--codebooks", "3", *weights],
                   check=True, timeout=300)
    decoded3, _ = soundfile.read(str(out_wav), dtype="float32")
    tok3 = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=3)
    expected3 = tok3.decode(np.ascontiguousarray(codes[None, :3].astype(np.uint32)))[0, 0]
    assert np.abs(decoded3 - expected3).max() < 0.005
