from __future__ import annotations

from pathlib import Path

import pytest

# First, as in every entry point: on Linux this routes MLX's BLAS calls to an installed
# OpenBLAS (moshi_mlx.blas), so the tests run the same numerics users get.
import moshi_mlx  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def official_mlx_files(tmp_path_factory) -> dict[str, Path]:
    """The official MLX-layout files of `lm_pytorch.safetensors`: {"bf16", "q8", "q4"} -> path.

    Made by our converter (same code as `python -m weights_convert`) into a temp dir, then
    every tensor's (dtype, shape, sha256 of its raw bytes) is checked against the manifest of
    the file the official MLX package made (`lm_mlx{,.q8,.q4}.manifest.json`), so these ARE
    the official files. Each path's folder also holds the converter's `config.json` (LM config
    keys + "quantization") and `manifest.json`.
    """
    import json

    from references import safetensors_entries

    from weights_convert import convert

    root = tmp_path_factory.mktemp("official_mlx")
    files: dict[str, Path] = {}
    for name, bits, manifest in (
        ("bf16", None, "lm_mlx.manifest.json"),
        ("q8", 8, "lm_mlx.q8.manifest.json"),
        ("q4", 4, "lm_mlx.q4.manifest.json"),
    ):
        result = convert(
            root / name,
            input_path=FIXTURES / "lm_pytorch.safetensors",
            config=FIXTURES / "lm_config.json",
            bits=bits,
        )
        official = json.loads((FIXTURES / manifest).read_text())["tensors"]
        expected = {k: (v["dtype"], v["shape"], v["sha256"]) for k, v in official.items()}
        got = safetensors_entries(result.model_file)
        assert got.keys() == expected.keys(), f"{name}: tensor names differ from the official file"
        wrong = sorted(k for k in expected if got[k] != expected[k])
        assert not wrong, f"{name}: {len(wrong)} tensors differ from the official file: {wrong[:3]}"
        files[name] = result.model_file
    return files


@pytest.fixture(scope="session")
def random_mimi_path() -> Path:
    """A calibrated random real-size Mimi checkpoint in the official layout (cached under
    tests/.cache/, keyed by the generator version; see tests/mimi_random.py)."""
    from mimi_random import ensure_random_mimi

    return ensure_random_mimi(Path(__file__).parent / ".cache", FIXTURES)


@pytest.fixture(scope="session")
def transformers_moshi() -> Path:
    """The tiny Moshi LM as a transformers folder (config.json + model.safetensors), rebuilt
    from lm_pytorch.safetensors and checked tensor by tensor against the manifest of the file
    transformers' conversion script made (tests/transformers_layout.py)."""
    from transformers_layout import ensure_transformers_moshi

    return ensure_transformers_moshi(Path(__file__).parent / ".cache")
