"""Kyutai STT LM (dep_q 0 + VAD extra heads) against the official PyTorch goldens
(tests/fixtures/stt/stt_golden.npz, trimmed from the shared STT fixtures; FIXTURES.md there).

Timing B: `SttGen.reset()` runs official step 0 (initial tokens only), `step(frame t)` runs
official step t + 1. Float32 runs must reproduce PyTorch token for token, VAD to ~1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from moshi_mlx import SttGen, WeightsError, load_lm
from moshi_mlx.loading.models import read_lm_config
from moshi_mlx.loading.safetensors import read_safetensors_header
from moshi_mlx.models.lm_config import LmConfig, SttConfig

VAD_TOLERANCE = 1e-4  # probabilities in [0, 1]; measured differences ~2e-6
LOGIT_TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def config_path(stt_dir: Path) -> Path:
    return stt_dir / "stt_config.json"


@pytest.fixture(scope="module")
def lm_f32(stt_dir: Path, config_path: Path):
    return load_lm(stt_dir / "stt_pytorch.safetensors", config=config_path, dtype=mx.float32)


def run_stt(lm, codes: np.ndarray, compile: bool = True) -> dict[str, np.ndarray]:
    """Greedy run over codes [B, 32, T] (or [32, T]): the tokens/VAD of official steps 0..T."""
    if codes.ndim == 2:
        codes = codes[None]
    gen = SttGen(lm, temp=0.0, batch_size=codes.shape[0], compile=compile)
    texts, vads, logits = [np.array(gen.initial_text)], [np.array(gen.initial_vad)], []
    logits.append(np.array(gen.state.text_logits))
    for t in range(codes.shape[2]):
        text, vad = gen.step(codes[:, :, t])
        texts.append(np.array(text))
        vads.append(np.array(vad))
        if t < 15:
            logits.append(np.array(gen.state.text_logits))
    return {"text": np.stack(texts, axis=1), "vad": np.stack(vads, axis=1),
            "logits": np.stack(logits, axis=1), "gen": gen}


def assert_matches(result: dict, stt_golden: dict, prefix: str, row: int = 0) -> None:
    steps = result["text"].shape[1]
    np.testing.assert_array_equal(result["text"][row], stt_golden[f"{prefix}_text"][:steps])
    np.testing.assert_allclose(result["vad"][row], stt_golden[f"{prefix}_vad"][:steps],
                               atol=VAD_TOLERANCE, rtol=0)


# --------------------------------------------------------------------------- config / loading


def test_stt_config_keys_are_read(config_path):
    cfg = read_lm_config(config_path)
    assert cfg.is_stt and cfg.dep_q == 0
    assert (cfg.extra_heads_num_heads, cfg.extra_heads_dim) == (4, 6)
    assert cfg.stt_config == SttConfig(audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0)
    assert (cfg.dim, cfg.context, cfg.n_q, cfg.text_card) == (128, 40, 32, 1000)
    assert cfg.hidden_dim == 352  # FIXTURES: gating hidden 11 * 128 / 4
    assert LmConfig.from_dict(cfg.to_dict()) == cfg
    data = json.loads(config_path.read_text())
    with pytest.raises(WeightsError, match="unknown stt_config key.*delay"):
        LmConfig.from_dict({**data, "stt_config": {"delay": 1.0}})


def test_stt_model_has_extra_heads_and_no_depformer(lm_f32):
    assert lm_f32.depformer is None
    assert len(lm_f32.extra_heads) == 4
    assert lm_f32.extra_heads[0].weight.shape == (6, 128)
    assert "bias" not in lm_f32.extra_heads[0]


@pytest.mark.parametrize("kind", ["bf16", "q4"])
def test_official_mlx_files_load(official_stt_mlx_files, config_path, kind):
    lm = load_lm(official_stt_mlx_files[kind], config=config_path, dtype=mx.float32)
    assert lm.cfg.extra_heads_num_heads == 4 and lm.depformer is None
    expected = nn.QuantizedLinear if kind == "q4" else nn.Linear
    assert type(lm.extra_heads[2]) is expected


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_float32_matches_pytorch_timing_b(lm_f32, stt_golden, version):
    result = run_stt(lm_f32, stt_golden[f"codes_{version}"])
    assert result["text"].shape[1] == stt_golden[f"torch_f32_B_{version}_text"].size
    assert_matches(result, stt_golden, f"torch_f32_B_{version}")
    if version == "v1":
        expected = stt_golden["torch_f32_B_v1_text_logits_first16"]
        np.testing.assert_allclose(result["logits"][0], expected, atol=LOGIT_TOLERANCE, rtol=0)


def test_float32_without_compile_matches_pytorch(lm_f32, stt_golden):
    result = run_stt(lm_f32, stt_golden["codes_v1"][:, :60], compile=False)
    assert_matches(result, stt_golden, "torch_f32_B_v1")


def test_long_run_past_4096_steps_matches_pytorch_with_constant_memory(lm_f32, stt_golden):
    # FIXTURES: long_codes = codes_v1 tiled to 4200 frames; 4201 steps cross the 40-step
    # window ~100 times and the 4096 steps where the official MLX cache went wrong.
    v1 = stt_golden["codes_v1"]
    codes = np.tile(v1, (1, 4200 // v1.shape[1] + 1))[:, :4200]
    gen = SttGen(lm_f32)
    texts, vad = [int(gen.initial_text[0])], [float(gen.initial_vad[0, 2, 0])]
    sizes = set()
    for t in range(codes.shape[1]):
        text, probs = gen.step(codes[None, :, t])
        texts.append(int(text[0]))
        vad.append(float(probs[0, 2, 0]))
        if t >= 100:
            sizes.add(tuple(c.keys.shape for c in gen.state.caches))
    np.testing.assert_array_equal(np.array(texts), stt_golden["torch_f32_B_long_text"])
    np.testing.assert_allclose(np.array(vad), stt_golden["torch_f32_B_long_vad_h2c0"],
                               atol=VAD_TOLERANCE, rtol=0)
    assert sizes == {((1, 4, 40, 32),) * 2}  # the ring holds exactly `context` steps


def test_q4_file_with_float32_activations_matches_dequantized_golden(
    official_stt_mlx_files, config_path, stt_golden
):
    lm = load_lm(official_stt_mlx_files["q4"], config=config_path, dtype=mx.float32)
    assert_matches(run_stt(lm, stt_golden["codes_v1"]), stt_golden, "torch_f32_deq_q4_B_v1")


def test_quantize_on_load_reproduces_the_q4_golden(stt_dir, config_path, stt_golden):
    lm = load_lm(stt_dir / "stt_pytorch.safetensors", config=config_path, quantize=4,
                 dtype=mx.float32)
    assert_matches(run_stt(lm, stt_golden["codes_v1"]), stt_golden, "torch_f32_deq_q4_B_v1")


def test_batch_rows_are_independent(lm_f32, stt_golden):
    steps = stt_golden["codes_v1"].shape[1]
    both = np.stack([stt_golden["codes_v1"], stt_golden["codes_v3"][:, :steps]])
    result = run_stt(lm_f32, both)
    assert_matches(result, stt_golden, "torch_f32_B_v1", row=0)
    assert_matches(result, stt_golden, "torch_f32_B_v3", row=1)


# --------------------------------------------------------------------------- VAD heads


def _without_extra_heads(source: Path, target: Path) -> Path:
    tensors = mx.load(str(source))
    mx.save_safetensors(str(target), {k: v for k, v in tensors.items()
                                      if not k.startswith("extra_heads.")})
    return target


def test_file_without_vad_heads_loads_without_them(official_stt_mlx_files, config_path,
                                                   stt_golden, tmp_path):
    bare = _without_extra_heads(official_stt_mlx_files["bf16"], tmp_path / "model.safetensors")
    lm = load_lm(bare, config=config_path, dtype=mx.float32)
    assert lm.cfg.extra_heads_num_heads == 0 and lm.extra_heads == []
    text, vad = SttGen(lm).step(stt_golden["codes_v1"][None, :, 0])
    assert vad is None and text.shape == (1,)


def test_vad_weights_from_a_pytorch_file_complete_a_q4_file(official_stt_mlx_files, stt_dir,
                                                             config_path, stt_golden, tmp_path):
    # The official MLX STT files have no heads; the -candle (PyTorch layout) file has them.
    bare = _without_extra_heads(official_stt_mlx_files["q4"], tmp_path / "model.q4.safetensors")
    assert not any(k.startswith("extra_heads") for k in read_safetensors_header(bare).tensors)
    lm = load_lm(bare, config=config_path, dtype=mx.float32,
                 vad_weights=stt_dir / "stt_pytorch.safetensors")
    assert type(lm.extra_heads[0]) is nn.QuantizedLinear  # quantized like the file
    assert_matches(run_stt(lm, stt_golden["codes_v1"]), stt_golden, "torch_f32_deq_q4_B_v1")


def test_vad_weights_without_heads_is_a_clear_error(official_stt_mlx_files, config_path,
                                                    tmp_path):
    bare = _without_extra_heads(official_stt_mlx_files["bf16"], tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="has no VAD heads"):
        load_lm(official_stt_mlx_files["bf16"], config=config_path, vad_weights=bare)


def test_moshi_lm_is_refused_by_stt_gen(fixtures_dir):
    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors", config=fixtures_dir / "lm_config.json")
    with pytest.raises(ValueError, match="speech-to-text LM"):
        SttGen(lm)
