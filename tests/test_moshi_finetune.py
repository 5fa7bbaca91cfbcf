"""Moshi fine-tuning against kyutai-labs/moshi-finetune and Kyutai's moshi 0.2.13 (PyTorch):
the loss and its gradients, the data (Interleaver, chunks), Kyutai's LoRA files.

Goldens: tests/fixtures/moshi_finetune_golden.npz, made by tools/derive_moshi_finetune_golden.py
(float32, the tiny Moshi fixture).
"""

from __future__ import annotations

import argparse
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


# --------------------------------------------------------------------------- Kyutai LoRA files

def kyutai_lora_modules(cfg: dict) -> list[tuple[str, int, int]]:
    """Every Linear of Kyutai's LMModel that its LoRA wraps, in the golden tool's order:
    (PyTorch module name, in, out)."""
    dim, dep_dim = cfg["dim"], cfg["depformer_dim"]
    hidden, dep_hidden = 704, 2 * cfg["depformer_dim_feedforward"] // 3  # FIXTURES.md
    modules = []
    for layer in range(cfg["num_layers"]):
        base = f"transformer.layers.{layer}"
        modules += [(f"{base}.self_attn.in_projs.0", dim, 3 * dim),
                    (f"{base}.self_attn.out_projs.0", dim, dim),
                    (f"{base}.gating.linear_in", dim, 2 * hidden),
                    (f"{base}.gating.linear_out", hidden, dim)]
    modules.append(("text_linear", dim, cfg["text_card"]))
    for k in range(cfg["dep_q"]):
        modules += [(f"depformer_in.{k}", dim, dep_dim), (f"linears.{k}", dep_dim, cfg["card"])]
    for layer in range(cfg["depformer_num_layers"]):
        base = f"depformer.layers.{layer}"
        for k in range(cfg["dep_q"]):
            modules += [(f"{base}.self_attn.in_projs.{k}", dep_dim, 3 * dep_dim),
                        (f"{base}.self_attn.out_projs.{k}", dep_dim, dep_dim),
                        (f"{base}.gating.{k}.linear_in", dep_dim, 2 * dep_hidden),
                        (f"{base}.gating.{k}.linear_out", dep_hidden, dep_dim)]
    return modules


def seeded_kyutai_lora(cfg: dict, rank: int) -> dict[str, np.ndarray]:
    """The golden's LoRA: for each module in order, A then B, 0.1 x Gaussian (seed 7)."""
    rng = np.random.default_rng(7)
    tensors = {}
    for name, fan_in, fan_out in kyutai_lora_modules(cfg):
        tensors[f"{name}.lora_A.weight"] = (0.1 * rng.standard_normal((rank, fan_in))
                                            ).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = (0.1 * rng.standard_normal((fan_out, rank))
                                            ).astype(np.float32)
    return tensors


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        digest.update(f"{name}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def kyutai_lora_dir(golden, fixtures_dir, tmp_path_factory) -> Path:
    """moshi-finetune's checkpoint folder shape: lora.safetensors + config.json."""
    cfg = json.loads((fixtures_dir / "lm_config.json").read_text())
    tensors = seeded_kyutai_lora(cfg, int(golden["lora_rank"]))
    assert tensors_digest(tensors) == str(golden["lora_digest"])  # the golden's very LoRA
    folder = tmp_path_factory.mktemp("consolidated")
    mx.save_safetensors(str(folder / "lora.safetensors"),
                        {k: mx.array(v) for k, v in tensors.items()})
    (folder / "config.json").write_text(json.dumps(dict(
        cfg, lora=True, lora_rank=int(golden["lora_rank"]),
        lora_scaling=float(golden["lora_scaling"]))))
    return folder


@pytest.mark.parametrize("fuse", [True, False])
def test_kyutai_lora_fused_equals_kyutai_lora_model(golden, fixtures_dir, kyutai_lora_dir, fuse):
    """Kept apart (LoRA layers) or fused (training.lora's fuse), the LM with moshi-finetune's
    LoRA gives the official LoRA model's loss and logits."""
    from moshi_mlx.training.kyutai_lora import read_kyutai_lora
    from moshi_mlx.training.lora import fuse_lora
    from moshi_mlx.training.moshi_lora import apply_kyutai_lora, moshi_lora_paths
    from moshi_mlx.training.moshi_loss import forward_logits

    lora = read_kyutai_lora(kyutai_lora_dir / "lora.safetensors")
    assert (lora.rank, lora.scaling) == (int(golden["lora_rank"]), float(golden["lora_scaling"]))
    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                 config=fixtures_dir / "lm_config.json", dtype=mx.float32)
    linears = {name for name, module in lm.named_modules() if isinstance(module, nn.Linear)}
    assert set(lora.pairs) == linears  # every Linear of our LM, named as ours
    assert set(moshi_lora_paths(lm)) == linears  # what training adapts by default: the same
    apply_kyutai_lora(lm, kyutai_lora_dir / "lora.safetensors")
    if fuse:
        assert fuse_lora(lm) == len(linears)
    codes = mx.array(golden["codes"])
    _, _, parts = moshi_loss(lm, codes)
    assert_relative(parts["text_loss"].item(), float(golden["lora_text_loss"]), "text")
    assert_relative(parts["audio_loss"].item(), float(golden["lora_audio_loss"]), "audio")
    text_logits, audio_logits = (np.array(x) for x in forward_logits(lm, codes))
    books = golden["lora_logit_codebooks"]
    for row, (b, t) in enumerate(golden["lora_logit_rows"]):
        for got, want in ((text_logits[b, t], golden["lora_text_logits"][row]),
                          (audio_logits[b, books, t], golden["lora_audio_logits"][row])):
            assert np.abs(got - want).max() <= RELATIVE * np.abs(want).max()


def test_kyutai_lora_as_adapter_tensors(kyutai_lora_dir):
    """mlx-lm's layer, y = x W.T + scale * (x @ lora_a @ lora_b), on the converted tensors
    equals Kyutai's y = W x + scaling * B (A x) on the file's tensors."""
    from moshi_mlx.training.kyutai_lora import read_kyutai_lora

    lora = read_kyutai_lora(kyutai_lora_dir / "lora.safetensors")
    adapters = lora.adapter_tensors()
    raw = mx.load(str(kyutai_lora_dir / "lora.safetensors"))
    x = mx.array(np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32))
    ours = "depformer.slices.3.transformer.layers.1.self_attn.in_proj"
    kyutai = "depformer.layers.1.self_attn.in_projs.3"
    a, b = raw[f"{kyutai}.lora_A.weight"], raw[f"{kyutai}.lora_B.weight"]
    want = lora.scaling * ((x @ a.T) @ b.T)
    got = lora.scaling * (x @ adapters[f"{ours}.lora_a"] @ adapters[f"{ours}.lora_b"])
    assert adapters[f"{ours}.lora_a"].shape == (64, 4)
    assert adapters[f"{ours}.lora_b"].shape == (4, 192)
    assert np.allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


def test_stacked_depformer_lora_names_split_per_step(kyutai_lora_dir, tmp_path):
    """Kyutai's loader also takes `self_attn.in_proj.lora_A.weight` holding every step's
    matrix stacked on dim 0; it maps to the same per-slice modules."""
    from moshi_mlx.training.kyutai_lora import read_kyutai_lora

    raw = mx.load(str(kyutai_lora_dir / "lora.safetensors"))
    stacked = {k: v for k, v in raw.items() if not k.startswith("depformer.layers.0.self_attn")}
    for proj in ("in", "out"):
        for part in ("A", "B"):
            stacked[f"depformer.layers.0.self_attn.{proj}_proj.lora_{part}.weight"] = \
                mx.concatenate([raw[f"depformer.layers.0.self_attn.{proj}_projs.{k}.lora_{part}"
                                    ".weight"] for k in range(8)])
    mx.save_safetensors(str(tmp_path / "lora.safetensors"), stacked)
    (tmp_path / "config.json").write_text((kyutai_lora_dir / "config.json").read_text())
    split = read_kyutai_lora(tmp_path / "lora.safetensors")
    per_step = read_kyutai_lora(kyutai_lora_dir / "lora.safetensors")
    assert set(split.pairs) == set(per_step.pairs)
    for module, (a, b) in per_step.pairs.items():
        assert mx.array_equal(split.pairs[module][0], a) and mx.array_equal(
            split.pairs[module][1], b), module


def test_bad_kyutai_lora_files_are_one_line_errors(kyutai_lora_dir, tmp_path):
    from moshi_mlx.errors import WeightsError
    from moshi_mlx.training.kyutai_lora import read_kyutai_lora

    lora_file = kyutai_lora_dir / "lora.safetensors"
    with pytest.raises(WeightsError, match="no such LoRA config"):
        read_kyutai_lora(lora_file, tmp_path / "config.json")
    mx.save_safetensors(str(tmp_path / "odd.safetensors"),
                        {"decoder.thing.lora_A.weight": mx.zeros((4, 8)),
                         "decoder.thing.lora_B.weight": mx.zeros((8, 4))})
    with pytest.raises(WeightsError, match="decoder.thing is not a module of a Moshi LM"):
        read_kyutai_lora(tmp_path / "odd.safetensors", kyutai_lora_dir / "config.json")
    mx.save_safetensors(str(tmp_path / "half.safetensors"),
                        {"text_linear.lora_A.weight": mx.zeros((4, 256))})
    with pytest.raises(WeightsError, match="text_linear has no lora_B"):
        read_kyutai_lora(tmp_path / "half.safetensors", kyutai_lora_dir / "config.json")
    lora = read_kyutai_lora(lora_file)
    shapes = {f"{m}.weight": (b.shape[0], a.shape[1]) for m, (a, b) in lora.pairs.items()}
    with pytest.raises(WeightsError, match=re.escape(
            "tensor text_linear.lora_b has shape (4, 1000), this model needs (4, 500)")):
        lora.deltas(shapes | {"text_linear.weight": (500, 256)})
    del shapes["depformer.slices.3.linear_out.weight"]
    with pytest.raises(WeightsError, match="adapts depformer.slices.3.linear_out, which this"):
        lora.deltas(shapes)


# --------------------------------------------------------------------------- evaluation, CLI

def test_evaluate_weights_batches_as_one(lm32, golden):
    """Two batches of one row each, evaluated together, give moshi-finetune's loss of the
    batch of both rows."""
    from moshi_mlx.training.moshi_loss import evaluate

    rows = [golden["codes"][:1], golden["codes"][1:]]
    result = evaluate(lm32, rows, 0.5, 100.0)
    assert_relative(result["loss"], float(golden["7b_loss"]), "loss")
    assert_relative(result["text_loss"], float(golden["7b_text_loss"]), "text")
    assert_relative(result["audio_loss"], float(golden["7b_audio_loss"]), "audio")
    assert (result["n_targets"], result["batches"]) == (int(golden["7b_n_targets"]), 2)


@pytest.fixture(scope="module")
def stereo_set(fixtures_dir, tmp_path_factory) -> Path:
    """A .jsonl of two stereo files cut from the fixture speech (left: speech, right: the
    speech reversed), with hand-made alignments."""
    import soundfile

    from moshi_mlx.audio.io import read_audio

    folder = tmp_path_factory.mktemp("stereo_set")
    speech = read_audio(fixtures_dir / "speech.wav")
    lines = []
    for name, start, seconds in (("one", 0.0, 2.3), ("two", 3.0, 1.5)):
        left = speech[int(start * 24000): int((start + seconds) * 24000)]
        soundfile.write(str(folder / f"{name}.wav"), np.stack([left, left[::-1]], axis=1),
                        24000, subtype="FLOAT")
        words = [["hello", [0.2, 0.5], "SPEAKER_MAIN"], ["there", [0.6, 0.9], "SPEAKER_OTHER"],
                 ["again", [1.1, 1.4], "SPEAKER_MAIN"]]
        (folder / f"{name}.json").write_text(json.dumps({"alignments": words}))
        lines.append(json.dumps({"path": f"{name}.wav", "duration": seconds}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_moshi_test_run_prints_the_loss_of_all_chunks(fixtures_dir, random_mimi_path,
                                                     stereo_set, lm32, capsys):
    from moshi_mlx.finetune import main
    from moshi_mlx.loading.models import load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.training.moshi_data import MoshiDataset, mimi_encoder

    assert main(["moshi", "--duration-sec", "1.0", "--text-padding-weight", "0.3",
                 "--dtype", "f32", "--model", str(fixtures_dir / "lm_pytorch.safetensors"),
                 "--config", str(fixtures_dir / "lm_config.json"), "--tokenizer",
                 str(fixtures_dir / "tokenizer.model"), "--mimi-weight", str(random_mimi_path),
                 "--data", str(stereo_set), "--batch-size", "2", "--test", "--json",
                 "--adapter-path", str(stereo_set.parent / "none")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The reference: every chunk (3 of the first file, 2 of the second) in ONE batch.
    data = MoshiDataset(stereo_set, load_sentencepiece(fixtures_dir / "tokenizer.model"),
                        mimi_encoder(load_mimi(random_mimi_path)), 1.0, notice=print)
    everything = mx.array(np.stack([data[i] for i in range(len(data))]))
    loss, n_targets, parts = moshi_loss(lm32, everything, 0.3, 1.0)
    assert len(data) == 5
    assert_relative(printed["loss"], loss.item(), "loss")
    assert_relative(printed["text_loss"], parts["text_loss"].item(), "text")
    assert printed["n_targets"] == n_targets.item() and printed["batches"] == 3


def test_annotate_writes_both_channels_in_moshi_finetune_format(stt_dir, random_mimi_path,
                                                               stereo_set, tmp_path):
    """Each channel's words as the STT finds them alone, left as SPEAKER_MAIN, right as
    SPEAKER_OTHER, in start order; an existing file is kept unless --overwrite."""
    from moshi_mlx.audio.io import read_audio_channels
    from moshi_mlx.cli.finetune_moshi import add_annotate_args, run_annotate
    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.training.moshi_data import read_alignments
    from moshi_mlx.transcription.transcriber import Transcriber

    jsonl = tmp_path / "data.jsonl"
    first = json.loads(stereo_set.read_text().splitlines()[0])
    (tmp_path / "one.wav").write_bytes((stereo_set.parent / "one.wav").read_bytes())
    jsonl.write_text(json.dumps(first) + "\n")
    parser = argparse.ArgumentParser()
    add_annotate_args(parser)
    args = parser.parse_args([str(jsonl), "--moshi-weight",
                              str(stt_dir / "stt_pytorch.safetensors"), "--config",
                              str(stt_dir / "stt_config.json"), "--tokenizer",
                              str(stt_dir / "stt_tokenizer.model"), "--mimi-weight",
                              str(random_mimi_path), "--dtype", "f32"])
    assert run_annotate(args) == 0
    words = read_alignments(tmp_path / "one.json")

    lm = load_lm(stt_dir / "stt_pytorch.safetensors", config=stt_dir / "stt_config.json",
                 dtype="f32")
    alone = Transcriber(lm, load_sentencepiece(stt_dir / "stt_tokenizer.model"),
                        load_mimi(random_mimi_path, num_codebooks=lm.cfg.n_q))
    pcm, _ = read_audio_channels(tmp_path / "one.wav")
    expected = []
    for channel, speaker in ((0, "SPEAKER_MAIN"), (1, "SPEAKER_OTHER")):
        transcript = alone.transcribe_pcm([pcm[:, channel].copy()])[0]
        expected += [(w.word, round(w.start, 3), round(w.end, 3), speaker)
                     for w in transcript.words]
    assert expected and {w.speaker for w in words} == {"SPEAKER_MAIN", "SPEAKER_OTHER"}
    assert sorted(tuple(w) for w in words) == sorted(expected)
    assert [w.start for w in words] == sorted(w.start for w in words)

    (tmp_path / "one.json").write_text('{"alignments": []}')
    assert run_annotate(args) == 0
    assert read_alignments(tmp_path / "one.json") == []


def _margins(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """How far each target's logit leads the best other one (negative: another wins)."""
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, targets[..., None], -np.inf, axis=-1)
    return picked - others.max(-1)


def test_overfit_sample_is_then_generated_greedily(fixtures_dir, golden):
    """Training and generation agree on which step predicts which token: after fitting one
    sample with this loss (all weights, Adam), streaming greedy generation (LmGen, fed the
    user's frame j at step j + 1) reproduces its text, codebook 0 and the delayed codebooks."""
    import mlx.optimizers as optim

    from moshi_mlx.conversation.lm_gen import LmGen
    from moshi_mlx.training.moshi_loss import forward_logits

    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                 config=fixtures_dir / "lm_config.json", dtype=mx.float32)
    steps = 16
    rng = np.random.default_rng(0)
    text = rng.integers(4, 1000, steps)
    text[[0, 3, 4, 9]], text[5] = 3, 0  # PAD, EPAD
    audio = rng.integers(0, 2048, (8, steps))
    user = golden["codes"][0, 9:, :steps].astype(np.int64)
    codes = mx.array(np.concatenate([text[None], audio, user])[None].astype(np.int32))
    optimizer = optim.Adam(learning_rate=3e-3)
    loss_and_grad = nn.value_and_grad(lm, lambda model: moshi_loss(model, codes)[0])
    # Fitted once every target leads by a margin: streaming generation computes the same
    # logits along another path (other product shapes), which may round a near tie the other
    # way on another CPU's BLAS kernels.
    margin_wanted = 1.0
    for _ in range(300):
        _, grads = loss_and_grad(lm)
        optimizer.update(lm, grads)
        mx.eval(lm.parameters(), optimizer.state)
        text_logits, audio_logits = forward_logits(lm, codes)
        audio_logits = np.array(audio_logits)[0]
        margins = [_margins(np.array(text_logits)[0], text),
                   _margins(audio_logits[0], audio[0]),
                   _margins(audio_logits[1:, : steps - 1], audio[1:, : steps - 1])]
        if min(m.min() for m in margins) >= margin_wanted:
            break
    else:
        pytest.fail(f"the sample was not fitted with margin {margin_wanted} in 300 steps")

    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    texts, raw = [], []
    for t in range(steps):
        frame = user[:, t - 1] if t else np.zeros(8, np.int64)  # step 0 reads initial tokens
        token, _ = gen.step(mx.array(frame[None].astype(np.int32)))
        texts.append(int(token[0]))
        raw.append(np.array(gen.state.last_audio_tokens[0]))
    raw = np.array(raw)  # step t: codebook 0 of frame t, codebooks 1..7 of frame t - 1
    assert texts == text.tolist()
    assert (raw[:, 0] == audio[0]).all()
    assert (raw[1:, 1:].T == audio[1:, : steps - 1]).all()


def test_lora_leaf_gradients_follow_moshi_finetunes_weight_gradients(fixtures_dir, golden):
    """LoRA over the golden's 7 linears (B = 0 as at the start of training, A random): the
    gradient of B is scale * A^T dL/dW^T, column j from moshi-finetune's row j of dL/dW, and
    the gradient of A is 0."""
    from moshi_mlx.training.lora import apply_lora

    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                 config=fixtures_dir / "lm_config.json", dtype=mx.float32)
    paths = [str(name).removesuffix(".weight") for name in golden["grad_our_names"]]
    scale = 2.0
    apply_lora(lm, paths, rank=4, scale=scale)
    modules = dict(lm.named_modules())
    rng = np.random.default_rng(7)
    for path in paths:
        layer = modules[path]
        layer.lora_a = mx.array(rng.standard_normal(layer.lora_a.shape).astype(np.float32))
    codes = mx.array(golden["codes"])
    grads = dict(tree_flatten(nn.value_and_grad(
        lm, lambda model: moshi_loss(model, codes, 0.5, 1.0)[0])(lm)[1]))
    rows = list(golden["grad_rows"])
    for index, path in enumerate(paths):
        lora_a = np.array(modules[path].lora_a).astype(np.float64)
        weight_rows = golden[f"default_grad{index}_rows"].astype(np.float64)  # [rows, in]
        want = scale * lora_a.T @ weight_rows.T  # [r, rows]
        bound = RELATIVE * (scale * np.abs(lora_a.T) @ np.abs(weight_rows.T)).max()
        got = np.array(grads[f"{path}.lora_b"]).astype(np.float64)[:, rows]
        assert np.abs(got - want).max() <= bound, path
        assert not np.array(grads[f"{path}.lora_a"]).any(), path
