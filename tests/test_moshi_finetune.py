"""Moshi fine-tuning against kyutai-labs/moshi-finetune and Kyutai's moshi 0.2.13 (PyTorch):
the loss and its gradients, the data (Interleaver, chunks), Kyutai's LoRA files.

Goldens: tests/fixtures/moshi_finetune_golden.npz, made by tools/derive_moshi_finetune_golden.py
(float32, the tiny Moshi fixture).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx import load_lm
from moshi_mlx.training.moshi_loss import moshi_loss

RELATIVE = 1e-4


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "moshi_finetune_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def lm32(fixtures_dir: Path):
    return load_lm(fixtures_dir / "lm_pytorch.safetensors",
                   config=fixtures_dir / "lm_config.json", dtype=mx.float32)


def assert_relative(got: float, want: float, what: str) -> None:
    assert abs(got - want) <= RELATIVE * abs(want), f"{what}: {got} vs {want}"


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("setting, weights", [("default", (0.5, 1.0)), ("7b", (0.5, 100.0))])
def test_loss_and_gradients_equal_moshi_finetune(lm32, golden, setting, weights):
    codes = mx.array(golden["codes"])
    loss, n_targets, parts = moshi_loss(lm32, codes, *weights)
    assert_relative(loss.item(), float(golden[f"{setting}_loss"]), "loss")
    assert_relative(parts["text_loss"].item(), float(golden[f"{setting}_text_loss"]), "text")
    assert_relative(parts["audio_loss"].item(), float(golden[f"{setting}_audio_loss"]), "audio")
    assert n_targets.item() == int(golden[f"{setting}_n_targets"])

    grads = dict(tree_flatten(nn.value_and_grad(
        lm32, lambda model: moshi_loss(model, codes, *weights)[0])(lm32)[1]))
    for index, name in enumerate(golden["grad_our_names"]):
        grad = np.array(grads[str(name)]).astype(np.float64)
        want_rows = golden[f"{setting}_grad{index}_rows"]
        rows = grad[list(golden["grad_rows"])]
        assert np.abs(rows - want_rows).max() <= RELATIVE * np.abs(want_rows).max(), name
        # The whole gradient, projected on the golden's seeded Gaussian matrix; relative to
        # the sum of the terms' magnitudes (the projection itself can cancel to near 0).
        probe = np.random.default_rng(int(golden["grad_probe_seed"]) + index).standard_normal(
            grad.shape)
        terms = grad * probe
        want = float(golden[f"{setting}_grad{index}_probe"])
        assert abs(terms.sum() - want) <= RELATIVE * np.abs(terms).sum(), name


def test_first_codebook_multiplier_changes_only_the_audio_part(lm32, golden):
    codes = mx.array(golden["codes"])
    _, _, plain = moshi_loss(lm32, codes, 0.5, 1.0)
    _, _, heavy = moshi_loss(lm32, codes, 0.5, 100.0)
    assert plain["text_loss"].item() == heavy["text_loss"].item()
    assert plain["audio_loss"].item() != heavy["audio_loss"].item()


# --------------------------------------------------------------------------- data

def frame_count_encoder(pcm: np.ndarray) -> np.ndarray:
    """A stand-in Mimi: the codes' values do not matter to the text, only the frame count
    (ceil(samples / 1920), as Mimi's whole-clip encode gives); values 7 to tell from -1."""
    return np.full((pcm.shape[0], 8, -(-pcm.shape[1] // 1920)), 7, dtype=np.int32)


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir: Path):
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece

    return load_sentencepiece(fixtures_dir / "tokenizer.model")


def write_stereo(path: Path, samples: int, rate: int = 24000, channels: int = 2) -> None:
    import soundfile

    noise = np.random.default_rng(samples).uniform(-0.1, 0.1, (samples, channels))
    soundfile.write(str(path), noise.astype(np.float32), rate, subtype="PCM_16")


def write_set(folder: Path, files: dict, name: str = "data.jsonl") -> Path:
    """files: stem -> (rate, samples, alignments[, channels]) -> a .jsonl with WAV + .json."""
    lines = []
    for stem, (rate, samples, alignments, *channels) in files.items():
        write_stereo(folder / f"{stem}.wav", samples, rate, *channels)
        (folder / f"{stem}.json").write_text(json.dumps({"alignments": alignments}))
        lines.append(json.dumps({"path": f"{stem}.wav", "duration": samples / rate}))
    jsonl = folder / name
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def test_interleaver_text_streams_equal_moshi_finetune(golden, tokenizer):
    from moshi_mlx.training.moshi_data import Word, text_stream

    for name, alignments, frames in json.loads(str(golden["interleave_cases"])):
        words = [Word(w, s, e, speaker) for w, (s, e), speaker in alignments]
        got = text_stream(words, frames, tokenizer)
        assert got == golden[f"interleave_{name}"].tolist(), name


def test_chunks_equal_moshi_finetune(golden, tokenizer, tmp_path):
    from moshi_mlx.training.moshi_data import MoshiDataset

    specs = {name: (rate, samples, alignments)
             for name, rate, samples, alignments in json.loads(str(golden["wav_specs"]))}
    chunks = json.loads(str(golden["chunks"]))
    index = 0
    for run, (duration_sec, names) in enumerate(json.loads(str(golden["chunk_runs"]))):
        jsonl = write_set(tmp_path, {n: specs[n] for n in names}, f"run{run}.jsonl")
        data = MoshiDataset(jsonl, tokenizer, frame_count_encoder, duration_sec, notice=print)
        want = [c for c in chunks if c[0] == run]
        assert [(data.entries[i].path.stem, start) for i, start in data.chunks] == \
            [(name, start) for _, name, start, _ in want]
        for item in range(len(data)):
            codes = data[item]
            assert codes.shape == (17, len(golden[f"chunk{index}_text"]))
            assert codes[0].tolist() == golden[f"chunk{index}_text"].tolist(), index
            assert ((codes[1:] == -1).all(0) == golden[f"chunk{index}_audio_pad"]).all(), index
            assert ((codes[1:] == 7) | (codes[1:] == -1)).all()
            index += 1
    assert index == len(chunks)


def test_mask_text_past_audio(golden, tokenizer, tmp_path):
    from moshi_mlx.training.moshi_data import MoshiDataset

    specs = {name: (rate, samples, alignments)
             for name, rate, samples, alignments in json.loads(str(golden["wav_specs"]))}
    jsonl = write_set(tmp_path, {"a": specs["a"]})
    notes = []
    data = MoshiDataset(jsonl, tokenizer, frame_count_encoder, 0.7, mask_text_past_audio=True,
                        notice=notes.append)
    last = data[3]  # 2 real frames; moshi-finetune puts "after" at frame 5 (golden chunk 3)
    assert last[0].tolist() == golden["chunk3_text"][:2].tolist() + [-1] * 7
    assert data[0][0].tolist() == golden["chunk0_text"].tolist()  # whole chunks unchanged
    assert notes == ["1 word(s) start after the end of their audio (dropped)"]


def test_other_rates_are_resampled_and_said_once(tokenizer, tmp_path):
    from moshi_mlx.training.moshi_data import MoshiDataset

    words = [["hi", [0.1, 0.3], "SPEAKER_MAIN"]]
    jsonl = write_set(tmp_path, {"x": (16000, 16000, words), "y": (48000, 30000, words),
                                 "z": (24000, 24000, [])})
    notes = []
    data = MoshiDataset(jsonl, tokenizer, frame_count_encoder, 1.0, notice=notes.append)
    assert notes == ["audio at 16000, 48000 Hz is resampled to 24000 Hz",
                     "1 file(s) hold no word of SPEAKER_MAIN: their text is all PAD"]
    assert [data[i].shape for i in range(len(data))] == [(17, 13)] * 3
    # 0.625 s = 15000 samples at 24 kHz: ceil(15000 / 1920) = 8 frames
    assert (data[1][1:] != -1).sum(axis=1).tolist() == [8] * 16
    assert (data[2][0] == 3).all()
    assert [b.shape for b in data.batches(2)] == [(2, 17, 13)]  # the incomplete one dropped


@pytest.mark.parametrize("damage, message", [
    ("missing", "x.wav: no such audio file"),
    ("garbage", "x.wav: cannot read audio"),
    ("mono", "x.wav: 1 channel(s); Moshi's data are stereo"),
    ("too_long", "x.wav: the data list says 2.000 s, the audio holds 1.000 s"),
    ("no_alignments", "x.json: no alignments file"),
    ("bad_alignments", "x.json: alignment 0 is not [word, [start, end], speaker]"),
    ("bad_line", "data.jsonl:1: expected"),
])
def test_bad_data_is_refused_naming_the_file(tokenizer, tmp_path, damage, message):
    from moshi_mlx.errors import TrainingDataError
    from moshi_mlx.training.moshi_data import MoshiDataset

    channels = 1 if damage == "mono" else 2
    jsonl = write_set(tmp_path, {"x": (24000, 24000, [["hi", [0.1, 0.3], "SPEAKER_MAIN"]],
                                       channels)})
    if damage == "missing":
        (tmp_path / "x.wav").unlink()
    elif damage == "garbage":
        (tmp_path / "x.wav").write_bytes(b"not a wav at all")
    elif damage == "too_long":
        jsonl.write_text(json.dumps({"path": "x.wav", "duration": 2.0}) + "\n")
    elif damage == "no_alignments":
        (tmp_path / "x.json").unlink()
    elif damage == "bad_alignments":
        (tmp_path / "x.json").write_text(json.dumps({"alignments": [["hi", 0.1, "A"]]}))
    elif damage == "bad_line":
        jsonl.write_text('{"path": "x.wav"}\n')
    with pytest.raises(TrainingDataError, match=re.escape(message)):
        MoshiDataset(jsonl, tokenizer, frame_count_encoder, 1.0, notice=print)
