"""Independent re-derivations shared by several tests (numpy and the raw file format only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np


def numpy_rope(x: np.ndarray, positions: np.ndarray, max_period: float) -> np.ndarray:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position * max_period^(-2i/D)."""
    head_dim = x.shape[-1]
    freqs = max_period ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    angles = positions[:, None] * freqs[None, :]  # [T, D/2]
    cos, sin = np.cos(angles), np.sin(angles)
    real, imag = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = real * cos - imag * sin
    out[..., 1::2] = real * sin + imag * cos
    return out


def safetensors_entries(path: Path) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, sha256 of raw bytes), parsed straight from the file format."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        start, end = (8 + header_len + offset for offset in entry["data_offsets"])
        digest = hashlib.sha256(data[start:end]).hexdigest()
        entries[name] = (entry["dtype"], entry["shape"], digest)
    return entries


# Manifests name dtypes as safetensors does (the Moshi ones) or as MLX does (the STT ones).
_MLX_DTYPE_NAMES = {"bfloat16": "BF16", "uint32": "U32", "float32": "F32"}


def assert_matches_manifest(path: Path, manifest: dict[str, dict], what: str) -> None:
    """Every tensor of `path` has the (dtype, shape, sha256 of raw bytes) that a per-tensor
    manifest of a reference file records, and no tensor is missing or extra."""
    expected = {k: (_MLX_DTYPE_NAMES.get(v["dtype"], v["dtype"]), v["shape"], v["sha256"])
                for k, v in manifest.items()}
    got = safetensors_entries(path)
    assert got.keys() == expected.keys(), f"{what}: tensor names differ"
    wrong = sorted(k for k in expected if got[k] != expected[k])
    assert not wrong, f"{what}: {len(wrong)} tensors differ: {wrong[:3]}"


def rust_golden_words(golden: dict, decode) -> list[tuple[str, float, float]]:
    """(word, start, end) that the STT fixtures' `rustlike_events_*` (asr.rs logic, clock
    (step + 1 - 6) / 12.5) give on our clock step / 12.5 - 0.5 (prefix 0, delay 0.5 s), i.e.
    max(0, rust - 0.1). A word ends at the EPAD right after it, else at the PAD step that
    closed it; it starts no earlier than the word before ended."""
    kinds, steps = golden["rustlike_events_kind"], golden["rustlike_events_step"]
    times, tokens = golden["rustlike_events_time"], golden["rustlike_events_tokens"]
    words, previous_end = [], 0.0
    for i, kind in enumerate(kinds):
        if kind != 0:
            continue
        if i + 1 < len(kinds) and kinds[i + 1] == 1:
            end = max(0.0, float(times[i + 1]) - 0.1)
        else:
            end = max(0.0, int(steps[i]) / 12.5 - 0.5)
        start = max(max(0.0, float(times[i]) - 0.1), previous_end)
        previous_end = max(end, start)
        words.append((decode([int(t) for t in str(tokens[i]).split()]), start, previous_end))
    return words
