from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# First, as in every entry point: on Linux this routes MLX's BLAS calls to an installed
# OpenBLAS (moshi_mlx.cli.blas), so the tests run the same numerics users get.
import moshi_mlx  # noqa: F401

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def converted_as_official(root: Path, source: Path, config: Path,
                          versions: tuple[tuple[str, int | None, Path], ...]) -> dict[str, Path]:
    """Our converter's output for each (name, bits, manifest of the official MLX file), every
    tensor's (dtype, shape, sha256 of its raw bytes) checked against that manifest: these ARE
    the official files. Each folder also holds the converter's config.json and manifest.json."""
    import json

    from references import assert_matches_manifest

    from weights_convert import convert

    files: dict[str, Path] = {}
    for name, bits, manifest in versions:
        result = convert(root / name, input_path=source, config=config, bits=bits)
        assert_matches_manifest(result.model_file, json.loads(manifest.read_text())["tensors"],
                                f"{name} against the official file")
        files[name] = result.model_file
    return files


@pytest.fixture(scope="session")
def official_mlx_files(tmp_path_factory) -> dict[str, Path]:
    """The official MLX-layout files of `lm_pytorch.safetensors`: {"bf16", "q8", "q4"} -> path
    (`converted_as_official`, against `lm_mlx{,.q8,.q4}.manifest.json`)."""
    return converted_as_official(
        tmp_path_factory.mktemp("official_mlx"), FIXTURES / "lm_pytorch.safetensors",
        FIXTURES / "lm_config.json",
        (("bf16", None, FIXTURES / "lm_mlx.manifest.json"),
         ("q8", 8, FIXTURES / "lm_mlx.q8.manifest.json"),
         ("q4", 4, FIXTURES / "lm_mlx.q4.manifest.json")))


@pytest.fixture(scope="session")
def stt_dir() -> Path:
    return FIXTURES / "stt"


@pytest.fixture(scope="session")
def stt_golden(stt_dir: Path) -> dict:
    """The Kyutai STT goldens (official PyTorch / MLX runs, FIXTURES.md of the STT fixtures)."""
    import numpy as np

    with np.load(stt_dir / "stt_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def csm_library():
    """The CSM fixture model (float32) and its tokenizer, as the library loads them."""
    import mlx.core as mx

    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.speech.generate import load_tokenizer

    csm = FIXTURES / "csm"
    return load_csm(csm / "sesame", dtype=mx.float32), load_tokenizer(csm / "tokenizer.json")


@pytest.fixture(scope="session")
def mimi32(random_mimi_path):
    """The real-size random Mimi with all 32 codebooks (CSM's)."""
    from moshi_mlx.loading.models import load_mimi

    return load_mimi(random_mimi_path, num_codebooks=32)


@pytest.fixture(scope="session")
def stt_command_args(stt_dir: Path, random_mimi_path: Path) -> list[str]:
    """The fixture STT model's files as `python -m moshi_mlx.stt` options."""
    return ["--moshi-weight", str(stt_dir / "stt_pytorch.safetensors"),
            "--config", str(stt_dir / "stt_config.json"),
            "--tokenizer", str(stt_dir / "stt_tokenizer.model"),
            "--mimi-weight", str(random_mimi_path)]


@pytest.fixture(scope="session")
def random_mimi_path() -> Path:
    """A calibrated random real-size Mimi checkpoint in the official layout (cached under
    tests/.cache/, keyed by the generator version; see tests/mimi_random.py)."""
    from mimi_random import ensure_random_mimi

    return ensure_random_mimi(Path(__file__).parent / ".cache", FIXTURES)


@pytest.fixture(scope="session")
def official_stt_mlx_files(tmp_path_factory) -> dict[str, Path]:
    """The official MLX-layout files of `stt/stt_pytorch.safetensors`: {"bf16", "q4"} -> path
    (`converted_as_official`, against `stt/stt_mlx{,.q4}.manifest.json`)."""
    stt = FIXTURES / "stt"
    return converted_as_official(
        tmp_path_factory.mktemp("official_stt_mlx"), stt / "stt_pytorch.safetensors",
        stt / "stt_config.json",
        (("bf16", None, stt / "stt_mlx.manifest.json"),
         ("q4", 4, stt / "stt_mlx.q4.manifest.json")))


# --------------------------------------------------------------------------- devices, browsers
# Tests that need a sound daemon or a browser ask for these fixtures. What cannot be provided
# skips the test with the reason (fails it under CI=true: prerequisites.unavailable).


@pytest.fixture(scope="session")
def sound_card() -> Iterator[str]:
    """The virtual sound card (tests/virtual_audio.py) running: its PULSE_SERVER address,
    also set in os.environ for the session (PortAudio in this process, paplay / parec and child
    processes reach the card through it). As root, missing packages are apt-get installed
    first. Started here unless it was running already, and then stopped at the end."""
    import virtual_audio
    from prerequisites import unavailable

    if virtual_audio.missing_packages() and os.geteuid() == 0:
        try:
            virtual_audio.install()
        except virtual_audio.VirtualAudioError as exc:
            unavailable(f"virtual sound card: {exc}")
    absent = virtual_audio.missing_packages()
    if absent:
        unavailable(f"virtual sound card: packages {' '.join(absent)} missing (as root: "
                    "python tests/virtual_audio.py install)")
    try:
        started = virtual_audio.start()
    except virtual_audio.VirtualAudioError as exc:
        unavailable(f"virtual sound card did not start: {exc}")
    address = virtual_audio.server_address()
    previous = os.environ.get("PULSE_SERVER")
    os.environ["PULSE_SERVER"] = address
    from moshi_mlx.audio.devices import refresh_devices

    refresh_devices()  # PortAudio lists only the devices there were when it initialised
    yield address
    if previous is None:
        os.environ.pop("PULSE_SERVER", None)
    else:
        os.environ["PULSE_SERVER"] = previous
    if started:
        virtual_audio.stop()


@pytest.fixture(scope="session")
def chromium_executable() -> str | None:
    """Debian's Chromium when installed, else None for playwright's own downloaded one; skips
    when there is neither (or no playwright)."""
    from prerequisites import unavailable

    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e '.[dev]')")
    system = "/usr/bin/chromium"
    if os.access(system, os.X_OK):
        return system
    try:
        with sync_playwright() as pw:
            pw.chromium.launch(headless=True).close()
    except Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        unavailable(f"no Chromium: /usr/bin/chromium is missing (apt-get install chromium) and "
                    f"playwright's does not start ({first}; `playwright install chromium`)")
    return None


@pytest.fixture(scope="session")
def firefox_executable() -> str:
    """Debian's Firefox ESR (driven over WebDriver BiDi, tests/bidi.py); skips when missing."""
    from bidi import FIREFOX
    from prerequisites import unavailable

    if not os.access(FIREFOX, os.X_OK):
        unavailable(f"no Firefox ESR: {FIREFOX} is missing (apt-get install firefox-esr)")
    return FIREFOX


@pytest.fixture(scope="session")
def transformers_moshi() -> Path:
    """The tiny Moshi LM as a transformers folder (config.json + model.safetensors), rebuilt
    from lm_pytorch.safetensors and checked tensor by tensor against the manifest of the file
    transformers' conversion script made (tests/transformers_layout.py)."""
    from transformers_layout import ensure_transformers_moshi

    return ensure_transformers_moshi(Path(__file__).parent / ".cache")


@pytest.fixture(scope="session")
def transformers_stt() -> Path:
    """The tiny STT as a transformers folder (config.json, preprocessor_config.json,
    model.safetensors), rebuilt from stt/stt_pytorch.safetensors and checked tensor by tensor
    against the manifest of the file transformers' conversion script made
    (tests/transformers_layout.py)."""
    from transformers_layout import ensure_transformers_stt

    return ensure_transformers_stt(Path(__file__).parent / ".cache")
