"""CSM's memory (issue 20): a bf16 checkpoint keeps its embeddings, heads and backbone matrices
bf16 under float32 compute and computes exactly what float32 copies of the same values compute;
loading holds one tensor beside the model, never the file's copy of the whole model.

The reference for the exactness is the same weights written as a float32 file (every bf16 value
is a float32), which the loader widens once while loading: another path to the same numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx.loading.models import load_csm
from moshi_mlx.loading.safetensors import (
    PlannedTensor,
    SafetensorsStreamWriter,
    read_safetensors,
    read_safetensors_header,
)
from moshi_mlx.speech.batch import SpeechRequest, generate_batch
from moshi_mlx.speech.generate import Segment, load_tokenizer, stream_speech

CSM = Path(__file__).parent / "fixtures" / "csm"
TEXT = "Numbers like seven and twelve are spoken slowly."
CONTEXT_TEXT = "The quick brown fox jumps over the lazy dog."


def write_rounded(folder: Path, file_dtype: str) -> Path:
    """The fixture's Sesame checkpoint with every tensor rounded to bf16, stored as BF16 or as
    F32 (the rounded values widened)."""
    folder.mkdir()
    for name in ("config.json", "flavors.json"):
        shutil.copy(CSM / "sesame" / name, folder / name)
    tensors = read_safetensors(CSM / "sesame" / "model.safetensors")
    dtype = mx.bfloat16 if file_dtype == "BF16" else mx.float32
    rounded = {k: v.astype(mx.bfloat16).astype(dtype) for k, v in tensors.items()}
    plan = [PlannedTensor(k, file_dtype, tuple(v.shape)) for k, v in rounded.items()]
    with open(folder / "model.safetensors", "wb") as f:
        writer = SafetensorsStreamWriter(f, plan)
        for k, v in rounded.items():
            writer.write(k, v)
        writer.finish()
    return folder


@pytest.fixture(scope="module")
def rounded(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("csm-rounded")
    return {"bf16": write_rounded(root / "bf16", "BF16"), "f32": write_rounded(root / "f32", "F32")}


@pytest.fixture(scope="module")
def context() -> list[Segment]:
    with np.load(CSM / "csm_golden.npz") as golden:
        return [Segment(1, CONTEXT_TEXT, codes=golden["context_codes"])]


def test_bf16_file_keeps_its_matrices_as_stored_under_float32_compute(rounded):
    model = load_csm(rounded["bf16"], dtype=mx.float32)
    assert model.compute_dtype == mx.float32
    assert "text_embeddings.weight" not in dict(tree_flatten(model.parameters()))
    for key, value in tree_flatten(model.parameters()):
        float32 = key.endswith("norm.weight") or key.startswith("decoder.")
        want = mx.float32 if float32 else mx.bfloat16
        assert value.dtype == want, key
    wide = load_csm(rounded["f32"], dtype=mx.float32)
    assert {v.dtype for _, v in tree_flatten(wide.parameters())} == {mx.float32}


@pytest.mark.parametrize("compiled", [True, False])
def test_bf16_weights_compute_exactly_as_their_float32_copies(rounded, context, compiled):
    tokenizer = load_tokenizer(CSM / "tokenizer.json")
    runs = []
    for name in ("bf16", "f32"):
        model = load_csm(rounded[name], dtype=mx.float32)
        stream = stream_speech(model, tokenizer, TEXT, 1, context, temperature=0, max_frames=10,
                               allow_non_codes=True, record_logits=True, stop="eos",
                               compiled=compiled)
        frames = np.stack(list(stream))
        runs.append((frames, np.stack(stream.c0_logits), np.stack(stream.depth_logits)))
    assert len(runs[0][0]) == 10
    for narrow, wide in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(narrow, wide)


def test_bf16_weights_batch_exactly_as_their_float32_copies(rounded, context):
    tokenizer = load_tokenizer(CSM / "tokenizer.json")
    requests = [SpeechRequest(TEXT, 1, context, 6), SpeechRequest("Hello from Sesame.", 0, (), 4)]
    outputs = [generate_batch(load_csm(rounded[name], dtype=mx.float32), tokenizer, requests,
                              temperature=0, stop="eos", allow_non_codes=True)
               for name in ("bf16", "f32")]
    assert [len(f) for f in outputs[0]] == [6, 4]
    for narrow, wide in zip(*outputs, strict=True):
        np.testing.assert_array_equal(narrow, wide)


@pytest.mark.parametrize("bits", [None, 4])
def test_loading_holds_one_tensor_beside_the_model(rounded, bits):
    """The old loader read every tensor, then made the model's copies: its peak was the file's
    bf16 tensors plus their float32 copies. Now the peak stays within the loaded model plus the
    largest tensor of the file."""
    header = read_safetensors_header(rounded["bf16"] / "model.safetensors")
    largest = max(info.nbytes for info in header.tensors.values())
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    model = load_csm(rounded["bf16"], quantize=bits, dtype=mx.float32, float_decoder_on_cpu=False)
    loaded = mx.get_active_memory() - before
    peak = mx.get_peak_memory() - before
    kept = sum(info.nbytes * (2 if name.startswith("decoder.") or name.endswith(".scale") else 1)
               for name, info in header.tensors.items()  # float32: decoder and norms
               if name != "text_embeddings.weight")  # left in the file
    assert loaded <= kept + 4096, (loaded, kept)
    assert peak <= loaded + largest, (peak, loaded, largest)
    del model


@pytest.mark.parametrize("layout, bits", [("sesame-bf16", None), ("sesame-bf16", 4),
                                         ("sesame-f32", None), ("transformers", None),
                                         ("mlx-audio", None)])
def test_text_embeddings_stay_in_the_file_and_read_its_rows(rounded, layout, bits, tmp_path):
    """The text table is not loaded (-q leaves it unquantized): its rows come from the file as
    stored, which MLX's own safetensors reader confirms, in every float layout."""
    from csm_layouts import write_mlx_audio_csm, write_transformers_csm

    from moshi_mlx.loading.file_rows import FileRows

    if layout == "transformers":
        folder, name = write_transformers_csm(tmp_path / "hf"), "embed_text_tokens.weight"
    elif layout == "mlx-audio":
        folder, name = write_mlx_audio_csm(tmp_path / "ma"), "model.text_embeddings.weight"
    else:
        folder, name = rounded[layout.split("-")[1]], "text_embeddings.weight"
    stored = mx.load(str(folder / "model.safetensors"))[name]
    model = load_csm(folder, quantize=bits, dtype=mx.float32)
    assert isinstance(model.text_embeddings, FileRows)
    assert "text_embeddings.weight" not in dict(tree_flatten(model.parameters()))
    ids = np.array([[0, 7, stored.shape[0] - 1], [3, 3, 1]], np.int32)
    rows = model.text_embeddings(mx.array(ids))
    assert rows.shape == (2, 3, stored.shape[1])
    assert rows.dtype == stored.dtype
    def bits(x: mx.array) -> np.ndarray:
        return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)

    np.testing.assert_array_equal(bits(rows), bits(stored)[ids])
    with pytest.raises(IndexError, match="token id out of range"):
        model.text_embeddings(mx.array([stored.shape[0]]))


def test_dequantized_product_is_the_whole_product_a_block_at_a_time(monkeypatch):
    """A prompt through a quantized layer on the CPU: the product on the whole dequantized
    matrix (to float32 rounding), with about one block of float weights alive instead of it."""
    import mlx.nn as nn

    import moshi_mlx.models.csm as csm
    from moshi_mlx.modules.parallel import dequantized_weight

    mx.random.seed(3)
    linear = nn.Linear(1024, 4096, bias=False)
    layer = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=4)
    x = mx.random.normal((1, 40, 1024))
    mx.eval(layer.parameters(), x)
    whole = x @ dequantized_weight(layer, mx.float32).T
    mx.eval(whole)
    matrix_bytes = 4096 * 1024 * 4
    monkeypatch.setattr(csm, "DEQUANTIZED_BLOCK", 1 << 18)  # 1 MB blocks, 16 of them
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    blocked = csm.dequantized_product(layer, x)
    mx.eval(blocked)
    peak = mx.get_peak_memory() - before
    # The same dot products; OpenBLAS's Haswell kernels sum a 256-column product in another
    # order than a 4096-column one (its Cooperlake kernels do not): float32 rounding apart.
    np.testing.assert_allclose(np.array(blocked), np.array(whole), rtol=0,
                               atol=1e-5 * float(mx.abs(whole).max()))
    assert peak < matrix_bytes / 2, (peak, matrix_bytes)  # the whole: twice the matrix
