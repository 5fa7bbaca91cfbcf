"""moshi_mlx.loading with the Moshi family: layout mapping and quantization against the official
MLX files' manifests, the packed format re-derived in numpy, and clear errors for broken
checkpoints (checked from the header, before any data is read)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.checkpoint import inspect_checkpoint
from moshi_mlx.loading.quantization import (
    QUANTIZATIONS,
    Quantization,
    quantizable_weights,
    quantize_tensors,
)
from moshi_mlx.models import lm
from moshi_mlx.models.lm_layouts import pytorch_to_mlx

FIXTURES = Path(__file__).parent / "fixtures"
PYTORCH_FILE = FIXTURES / "lm_pytorch.safetensors"
CONFIG = json.loads((FIXTURES / "lm_config.json").read_text())
QUANTIZABLE = quantizable_weights(lm, lm.LmConfig.from_dict(CONFIG))


def read_lm_checkpoint(path: Path, config=None) -> tuple[dict[str, mx.array], Quantization]:
    """Header checks, then every tensor in our layout, and the file's quantization."""
    checkpoint = inspect_checkpoint(path, config)
    return checkpoint.read(), checkpoint.quantization
SAFETENSORS_NAMES = {mx.bfloat16: "BF16", mx.uint32: "U32", mx.float32: "F32"}


def manifest(name: str) -> dict[str, dict]:
    return json.loads((FIXTURES / f"{name}.manifest.json").read_text())["tensors"]


def raw_bytes(array: mx.array) -> bytes:
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.array(array).tobytes()


def describe(tensors: dict[str, mx.array]) -> dict[str, tuple[str, list[int], str]]:
    return {
        k: (SAFETENSORS_NAMES[v.dtype], list(v.shape), hashlib.sha256(raw_bytes(v)).hexdigest())
        for k, v in tensors.items()
    }


def official(name: str) -> dict[str, tuple[str, list[int], str]]:
    return {k: (v["dtype"], v["shape"], v["sha256"]) for k, v in manifest(name).items()}


@pytest.fixture(scope="module")
def pytorch_as_mlx() -> dict[str, mx.array]:
    tensors, quantization = read_lm_checkpoint(PYTORCH_FILE, CONFIG)
    assert quantization is None
    return tensors


def test_pytorch_layout_maps_to_the_official_bf16_file(pytorch_as_mlx):
    assert describe(pytorch_as_mlx) == official("lm_mlx")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_is_bit_identical_to_the_official_files(pytorch_as_mlx, bits):
    quantized = quantize_tensors(pytorch_as_mlx, QUANTIZABLE, QUANTIZATIONS[bits])
    assert describe(quantized) == official(f"lm_mlx.q{bits}")


def test_quantization_settings_are_the_official_ones():
    assert QUANTIZATIONS == {4: Quantization(4, 32), 8: Quantization(8, 64)}


def test_is_quantizable_matches_the_official_q4_file():
    q4 = manifest("lm_mlx.q4")
    packed = {k for k, v in q4.items() if v["dtype"] == "U32"}
    weights = {k for k in q4 if k.endswith(".weight")}
    assert {k for k in weights if k in QUANTIZABLE} == packed
    assert len(packed) == 114 and len(weights - packed) == 37  # 37 RMSNorm gains stay bf16


def test_depformer_attention_fans_out_to_slices():
    stacked = mx.arange(8 * 6 * 2).reshape(8 * 6, 2).astype(mx.bfloat16)
    parts = dict(pytorch_to_mlx("depformer.layers.1.self_attn.in_proj_weight", stacked, dep_q=8))
    assert len(parts) == 8
    slice3 = parts["depformer.slices.3.transformer.layers.1.self_attn.in_proj.weight"]
    np.testing.assert_array_equal(np.array(slice3.astype(mx.float32)),
                                  np.arange(36, 48).reshape(6, 2))
    gains = dict(pytorch_to_mlx("depformer.layers.0.norm2.alpha", mx.ones((1, 1, 4)), dep_q=8))
    assert sorted(gains) == sorted(
        f"depformer.slices.{k}.transformer.layers.0.norm2.weight" for k in range(8))
    assert all(g.shape == (4,) for g in gains.values())
    with pytest.raises(WeightsError, match="layer_scale"):
        pytorch_to_mlx("transformer.layers.0.layer_scale_1.scale", mx.ones((4,)), dep_q=8)


def unpack_numpy(words: np.ndarray, bits: int) -> np.ndarray:
    """FIXTURES.md: element j of a row sits in bits [j*bits mod 32, +bits) of word j*bits/32."""
    per_word = 32 // bits
    shifts = np.arange(per_word, dtype=np.uint32) * bits
    values = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return values.reshape(words.shape[0], -1)


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_format_dequantizes_close_to_the_bf16_weights(pytorch_as_mlx, bits):
    q = QUANTIZATIONS[bits]
    original = np.array(pytorch_as_mlx["text_linear.weight"].astype(mx.float32))
    quantized = quantize_tensors({"text_linear.weight": pytorch_as_mlx["text_linear.weight"]},
                                 QUANTIZABLE, q)
    codes = unpack_numpy(np.array(quantized["text_linear.weight"]), bits).astype(np.float32)
    scales = np.array(quantized["text_linear.scales"].astype(mx.float32))
    biases = np.array(quantized["text_linear.biases"].astype(mx.float32))
    dequantized = (codes.reshape(codes.shape[0], -1, q.group_size) * scales[..., None]
                   + biases[..., None]).reshape(original.shape)
    # the layout FIXTURES.md describes is the one MLX itself decodes (float32 scales, biases)
    by_mlx = mx.dequantize(quantized["text_linear.weight"], mx.array(scales), mx.array(biases),
                           group_size=q.group_size, bits=bits)
    np.testing.assert_array_equal(dequantized, np.array(by_mlx))
    # and it is an affine rounding of the bf16 weights: errors of the order of the step size
    error = np.abs(dequantized - original) / np.repeat(np.abs(scales), q.group_size, axis=1)
    assert error.max() <= 2.0 and error.mean() <= 0.4
    assert codes.max() == 2**bits - 1 and codes.min() == 0


def test_reads_the_official_mlx_files(official_mlx_files, pytorch_as_mlx):
    expected_quant = {"bf16": None, "q8": QUANTIZATIONS[8], "q4": QUANTIZATIONS[4]}
    for name, path in official_mlx_files.items():
        tensors, quantization = read_lm_checkpoint(path)
        assert quantization == expected_quant[name]
        manifest_name = "lm_mlx" if name == "bf16" else f"lm_mlx.{name}"
        assert describe(tensors) == official(manifest_name)


# ------------------------------------------------------------------------------ bad files


def save(path: Path, tensors: dict[str, mx.array]) -> Path:
    mx.save_safetensors(str(path), tensors)
    return path


@pytest.fixture(scope="module")
def source_tensors() -> dict[str, mx.array]:
    return mx.load(str(PYTORCH_FILE))


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        read_lm_checkpoint(tmp_path / "model.safetensors")


def test_truncated_file(tmp_path):
    data = PYTORCH_FILE.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        read_lm_checkpoint(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......",
                                     b"PK\x03\x04 this is a zip file, not weights" * 4])
def test_not_a_safetensors_file(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_lm_checkpoint(tmp_path / "bad.safetensors")


def test_not_a_moshi_checkpoint(tmp_path):
    path = save(tmp_path / "other.safetensors", {"encoder.weight": mx.zeros((4, 4))})
    with pytest.raises(WeightsError, match="not a Moshi LM checkpoint"):
        read_lm_checkpoint(path)


def test_missing_tensor(tmp_path, source_tensors):
    tensors = dict(source_tensors)
    del tensors["transformer.layers.1.gating.linear_out.weight"]
    path = save(tmp_path / "m.safetensors", tensors)
    missing = r"missing tensor transformer\.layers\.1\.gating\.linear_out\.weight"
    with pytest.raises(WeightsError, match=missing):
        read_lm_checkpoint(path, CONFIG)


def test_wrong_dtype(tmp_path, source_tensors):
    tensors = dict(source_tensors)
    tensors["text_linear.weight"] = tensors["text_linear.weight"].astype(mx.float32)
    path = save(tmp_path / "m.safetensors", tensors)
    with pytest.raises(WeightsError, match="text_linear.weight has dtype F32, expected BF16"):
        read_lm_checkpoint(path, CONFIG)


def test_unexpected_tensor(tmp_path, source_tensors):
    tensors = dict(source_tensors)
    tensors["transformer.layers.0.layer_scale_1.scale"] = mx.ones((256,), dtype=mx.bfloat16)
    path = save(tmp_path / "m.safetensors", tensors)
    with pytest.raises(WeightsError, match="layer_scale_1"):
        read_lm_checkpoint(path, CONFIG)


def test_config_mismatch(tmp_path):
    wrong = dict(CONFIG, num_layers=3)
    with pytest.raises(WeightsError, match=r"missing tensor transformer\.layers\.2"):
        read_lm_checkpoint(PYTORCH_FILE, wrong)
    with pytest.raises(WeightsError, match=r"shape .*expected"):
        read_lm_checkpoint(PYTORCH_FILE, dict(CONFIG, text_card=2000))


def test_partly_broken_quantized_file(tmp_path, official_mlx_files):
    tensors = mx.load(str(official_mlx_files["q4"]))
    del tensors["transformer.layers.0.self_attn.in_proj.scales"]
    path = save(tmp_path / "q.safetensors", tensors)
    with pytest.raises(WeightsError, match=r"missing tensor .*in_proj\.scales"):
        read_lm_checkpoint(path, CONFIG)
