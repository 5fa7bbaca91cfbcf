"""Moshi LM against the official PyTorch goldens (tests/fixtures/lm_golden.npz, FIXTURES.md).

Float32 runs must reproduce PyTorch's greedy 40-step generation token for token (logits to
~1e-4), for the PyTorch-layout file, the MLX-layout file and the dequantized q8 / q4 files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshi_mlx import WeightsError, load_lm
from moshi_mlx.conversation.lm_gen import LmGen
from moshi_mlx.loading.models import read_lm_config
from moshi_mlx.models.lm_config import LmConfig

STEPS = 40
LOGIT_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "lm_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def config_path(fixtures_dir: Path) -> Path:
    return fixtures_dir / "lm_config.json"


@pytest.fixture(scope="module")
def weight_files(official_mlx_files, fixtures_dir: Path) -> dict[str, Path]:
    """The four checkpoints: PyTorch bf16 + the official MLX bf16 / q8 / q4 (derived by the
    converter and checked against the manifests' sha256 by the `official_mlx_files` fixture)."""
    return {
        "pytorch": fixtures_dir / "lm_pytorch.safetensors",
        "mlx": official_mlx_files["bf16"],
        "q8": official_mlx_files["q8"],
        "q4": official_mlx_files["q4"],
    }


def run_greedy(lm, user_codes: np.ndarray, steps: int = STEPS, force=None, compile=True):
    """Greedy generation; returns per-step text, raw audio, returned frame, logits."""
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0, compile=compile)
    texts, raws, outs, text_logits, audio_logits = [], [], [], [], []
    for t in range(steps):
        extra = {}
        if force is not None:
            extra = {"force_text": force[0][t : t + 1], "force_audio": force[1][t : t + 1]}
        text, frame = gen.step(user_codes[:, t][None], **extra)
        texts.append(int(text[0]))
        raws.append(np.array(gen.state.last_audio_tokens[0]))
        outs.append(None if frame is None else np.array(frame[0]))
        text_logits.append(np.array(gen.state.text_logits[0].astype(mx.float32)))
        audio_logits.append(
            np.stack([np.array(x[0].astype(mx.float32)) for x in gen.state.audio_logits])
        )
    return {
        "text": np.array(texts),
        "audio_raw": np.array(raws),
        "outs": outs,
        "text_logits": np.array(text_logits),
        "audio_logits": np.array(audio_logits),
    }


def assert_matches_golden(result: dict, golden: dict, prefix: str) -> None:
    np.testing.assert_array_equal(result["text"], golden[f"{prefix}_text"])
    np.testing.assert_array_equal(result["audio_raw"], golden[f"{prefix}_audio_raw"])
    expected_out = golden[f"{prefix}_out"]
    assert result["outs"][0] is None and (expected_out[0] == -1).all()
    for t in range(1, STEPS):
        # The reference frame is [text of step t-1, audio codes]; our step returns the audio.
        np.testing.assert_array_equal(result["outs"][t], expected_out[t, 1:])
        assert result["text"][t - 1] == expected_out[t, 0]
    np.testing.assert_allclose(
        result["text_logits"], golden[f"{prefix}_text_logits"], atol=LOGIT_TOLERANCE, rtol=0
    )
    np.testing.assert_allclose(
        result["audio_logits"], golden[f"{prefix}_audio_logits"], atol=LOGIT_TOLERANCE, rtol=0
    )


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [
        ("pytorch", "torch_f32"),
        ("mlx", "torch_f32"),
        ("q8", "torch_f32_deq_q8"),
        ("q4", "torch_f32_deq_q4"),
    ],
)
def test_float32_greedy_matches_pytorch(weight_files, config_path, golden, kind, prefix):
    # The converted MLX files come with a config.json beside them: load them without config=.
    config = config_path if kind == "pytorch" else None
    lm = load_lm(weight_files[kind], config=config, dtype=mx.float32)
    assert lm.cfg == read_lm_config(config_path)
    if kind in ("q8", "q4"):  # linear scales kept bf16 (half the memory), still exact
        kept = {type(m): m.scales.dtype for _, m in lm.named_modules() if hasattr(m, "scales")}
        assert kept[nn.QuantizedLinear] == mx.bfloat16
        assert kept.get(nn.QuantizedEmbedding, mx.float32) == mx.float32
    result = run_greedy(lm, golden["user_codes"])
    assert_matches_golden(result, golden, prefix)


def test_float32_greedy_matches_pytorch_without_compile(weight_files, config_path, golden):
    lm = load_lm(weight_files["pytorch"], config=config_path, dtype=mx.float32)
    result = run_greedy(lm, golden["user_codes"], compile=False)
    assert_matches_golden(result, golden, "torch_f32")


def assert_float32_agreement(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The same float32 logits computed with another summation order: a float matmul split
    into row blocks is not bit-identical (BLAS may block or pick its kernel by the block's
    shape; OpenBLAS: 3e-5 on logits of magnitude 30). The rounding error of a logit scales with
    the sums behind it, not with its own value: 1e-4 relative, or 1e-5 of the largest logit."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                               err_msg=what)


@pytest.mark.parametrize(("kind", "prefix"), [("pytorch", "torch_f32"), ("q4", "torch_f32_deq_q4")])
@pytest.mark.parametrize("threads", [2, 3])
def test_layers_split_over_cpu_threads_still_match_pytorch(
    weight_files, config_path, golden, kind, prefix, threads
):
    # The fixture's layers are below the default size threshold: force every one to split.
    config = config_path if kind == "pytorch" else None
    lm = load_lm(weight_files[kind], config=config, dtype=mx.float32, cpu_threads=1)
    plain = run_greedy(lm, golden["user_codes"])
    linears = [m for _, m in lm.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    assert lm.use_cpu_threads(threads, min_weights=0) == len(linears) > 0
    split = run_greedy(lm, golden["user_codes"])
    assert_matches_golden(split, golden, prefix)
    for key in ("text_logits", "audio_logits"):
        if kind == "q4":  # quantized matmul: a row block is the same computation, row by row
            np.testing.assert_array_equal(split[key], plain[key], err_msg=key)
        else:
            assert_float32_agreement(split[key], plain[key], key)
    assert lm.use_cpu_threads(1) == 0  # undone: the plain layers again
    assert all(type(m) in (nn.Linear, nn.QuantizedLinear) for m in linears)


@pytest.mark.parametrize(("bits", "prefix"), [(8, "torch_f32_deq_q8"), (4, "torch_f32_deq_q4")])
def test_quantize_on_load_matches_official_quantized_goldens(
    tmp_path, fixtures_dir, config_path, golden, bits, prefix
):
    # Quantizing the bf16 file on load must give the official q8/q4 weights, hence their goldens.
    # A folder holding only model.safetensors: `quantize` falls back to it and quantizes.
    shutil.copy(fixtures_dir / "lm_pytorch.safetensors", tmp_path / "model.safetensors")
    lm = load_lm(tmp_path, config=config_path, quantize=bits, dtype=mx.float32)
    result = run_greedy(lm, golden["user_codes"])
    np.testing.assert_array_equal(result["text"], golden[f"{prefix}_text"])
    np.testing.assert_array_equal(result["audio_raw"], golden[f"{prefix}_audio_raw"])


@pytest.mark.parametrize(("kind", "reference"), [("pytorch", "bf16"), ("q8", "q8"), ("q4", "q4")])
def test_bf16_teacher_forced_logits_within_reference_spread(
    weight_files, config_path, golden, kind, reference
):
    """bf16 cannot be compared token-exactly (two correct bf16 runs split within a few steps):
    teacher-force onto PyTorch bf16 and compare text logits. The official MLX package, forced
    the same way, sets the spread we must stay within."""
    lm = load_lm(weight_files[kind], config=config_path, dtype=mx.bfloat16)
    force = (golden["torch_bf16_text"], golden["torch_bf16_audio_raw"])
    result = run_greedy(lm, golden["user_codes"], force=force)
    ours = np.abs(result["text_logits"] - golden["torch_bf16_text_logits"]).max(axis=1)
    theirs = golden[f"mlx_{reference}_forced_text_logits_maxabs_vs_torch"]
    # Measured (bf16 file): ours median 0.154 / max 0.22, official MLX 0.283 / 0.468.
    assert np.median(ours) <= 1.1 * np.median(theirs)
    assert ours.max() <= 1.1 * theirs.max()
    our_agreement = (result["text_logits"].argmax(axis=1) == golden["torch_bf16_text"]).mean()
    their_agreement = (golden[f"mlx_{reference}_forced_text_argmax"]
                       == golden["torch_bf16_text"]).mean()
    assert our_agreement >= their_agreement - 0.05


def test_batch_rows_are_independent(weight_files, config_path, golden):
    lm = load_lm(weight_files["pytorch"], config=config_path, dtype=mx.float32)
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    other = np.random.default_rng(0).integers(0, 2048, size=golden["user_codes"].shape)
    texts = []
    for t in range(12):
        codes = np.stack([golden["user_codes"][:, t], other[:, t]])
        text, frame = gen.step(codes)
        assert text.shape == (2,)
        assert frame is None if t == 0 else frame.shape == (2, 8)
        texts.append(np.array(text))
    texts = np.array(texts)
    np.testing.assert_array_equal(texts[:, 0], golden["torch_f32_text"][:12])
    assert (texts[:, 1] != texts[:, 0]).any()


# --------------------------------------------------------------------------- config


def test_config_from_official_json(config_path):
    cfg = read_lm_config(config_path)
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.text_card) == (256, 4, 2, 1000)
    assert cfg.hidden_dim == 704  # FIXTURES: gating hidden 704 (linear_in has 1408 rows)
    assert cfg.depformer_hidden_dim == 128  # dim_feedforward 192 -> hidden 128
    assert cfg.delays == (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
    assert cfg.norm_eps == 1e-8 and cfg.norm_in_float32
    assert LmConfig.from_dict(cfg.to_dict()) == cfg


def test_moshi_7b_preset():
    cfg = LmConfig.moshi_7b()
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.text_card) == (4096, 32, 32, 32000)
    assert (cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_num_layers) == (1024, 16, 6)
    assert cfg.hidden_dim == 11264 and cfg.depformer_hidden_dim == 2816
    assert (cfg.n_q, cfg.dep_q, cfg.card, cfg.context) == (16, 8, 2048, 3000)


def test_unknown_config_key_is_a_clear_error(tmp_path, config_path):
    data = json.loads(config_path.read_text())
    data["num_experts"] = 8
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="unknown LM config key.*num_experts"):
        read_lm_config(bad)


def test_config_feature_switches_are_accepted_only_when_off(config_path):
    data = json.loads(config_path.read_text())
    assert LmConfig.from_dict({**data, "cross_attention": False}) == LmConfig.from_dict(data)
    with pytest.raises(WeightsError, match="cross_attention = True is not supported"):
        LmConfig.from_dict({**data, "cross_attention": True})
    with pytest.raises(WeightsError, match="delays has 3 entries"):
        LmConfig.from_dict({**data, "delays": [0, 1, 1]})


def test_config_json_beside_weights_is_used(tmp_path, fixtures_dir, config_path, golden):
    shutil.copy(fixtures_dir / "lm_pytorch.safetensors", tmp_path / "model.safetensors")
    shutil.copy(config_path, tmp_path / "config.json")
    lm = load_lm(tmp_path, dtype=mx.float32)  # folder: model.safetensors + config.json
    assert lm.cfg == read_lm_config(config_path)
    result = run_greedy(lm, golden["user_codes"], steps=3)
    np.testing.assert_array_equal(result["text"], golden["torch_f32_text"][:3])


# --------------------------------------------------------------------------- bad input


def test_pytorch_file_with_wrong_config_is_a_clear_error(fixtures_dir):
    # No config.json beside the fixture file -> 7B preset, whose shapes do not match.
    with pytest.raises(WeightsError, match="lm_pytorch.safetensors"):
        load_lm(fixtures_dir / "lm_pytorch.safetensors")
    with pytest.raises(WeightsError, match="shape"):
        load_lm(fixtures_dir / "lm_pytorch.safetensors",
                config=read_lm_config(fixtures_dir / "lm_config.json").with_overrides(dim=128))


def test_q4_file_with_quantize_8_is_a_clear_error(weight_files, config_path):
    with pytest.raises(WeightsError, match=r"is 4-bit quantized, but -q 8 was asked"):
        load_lm(weight_files["q4"], config=config_path, quantize=8)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_file_is_a_clear_error(tmp_path, fixtures_dir, config_path, damage):
    data = (fixtures_dir / "lm_pytorch.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(b"\x00\x01not a safetensors file at all" * 100)
    else:
        bad.write_bytes(b"")
    with pytest.raises(WeightsError) as info:
        load_lm(bad, config=config_path)
    assert "\n" not in str(info.value)


def test_missing_file_or_bad_quantize_is_a_clear_error(tmp_path, fixtures_dir):
    with pytest.raises(WeightsError):
        load_lm(tmp_path / "nope" / "model.safetensors")
    with pytest.raises(WeightsError, match="quantize must be one of"):
        load_lm(fixtures_dir / "lm_pytorch.safetensors", quantize=3)


def test_library_default_dtype_is_the_cli_default(fixtures_dir, config_path):
    """dtype=None is `--dtype auto`: float32 on the CPU backend, bf16 on a GPU."""
    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors", config=config_path)
    expected = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert lm.text_emb.weight.dtype == expected
    assert lm.transformer.layers[0].self_attn.in_proj.weight.dtype == expected
