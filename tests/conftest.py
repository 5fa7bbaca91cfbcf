from __future__ import annotations

import os
from collections.abc import Iterator
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


# The STT manifests name dtypes as MLX does; safetensors_entries gives the file's names.
_MLX_DTYPE_NAMES = {"bfloat16": "BF16", "uint32": "U32", "float32": "F32"}


@pytest.fixture(scope="session")
def official_stt_mlx_files(tmp_path_factory) -> dict[str, Path]:
    """The official MLX-layout files of `stt/stt_pytorch.safetensors`: {"bf16", "q4"} -> path,
    made by our converter and checked tensor by tensor (dtype, shape, sha256) against the
    manifests of the files the official MLX package made (`stt/stt_mlx{,.q4}.manifest.json`).
    Each folder also holds the converter's config.json."""
    import json

    from references import safetensors_entries

    from weights_convert import convert

    stt = FIXTURES / "stt"
    root = tmp_path_factory.mktemp("official_stt_mlx")
    files: dict[str, Path] = {}
    for name, bits, manifest in (("bf16", None, "stt_mlx.manifest.json"),
                                 ("q4", 4, "stt_mlx.q4.manifest.json")):
        result = convert(root / name, input_path=stt / "stt_pytorch.safetensors",
                         config=stt / "stt_config.json", bits=bits)
        official = json.loads((stt / manifest).read_text())["tensors"]
        expected = {k: (_MLX_DTYPE_NAMES[v["dtype"]], v["shape"], v["sha256"])
                    for k, v in official.items()}
        got = safetensors_entries(result.model_file)
        assert got.keys() == expected.keys(), f"{name}: tensor names differ from the official file"
        wrong = sorted(k for k in expected if got[k] != expected[k])
        assert not wrong, f"{name}: {len(wrong)} tensors differ from the official file: {wrong[:3]}"
        files[name] = result.model_file
    return files


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
