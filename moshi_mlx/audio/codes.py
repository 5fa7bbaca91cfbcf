"""Mimi codes as .npy files: the reader and the atomic writer every command uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from moshi_mlx.errors import MoshiError


def load_codes(path: Path) -> np.ndarray:
    """Mimi codes from a .npy file: [K, frames] or [1, K, frames] -> int32 [K, frames]."""
    if not path.is_file():
        raise MoshiError(f"{path}: no such codes file")
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise MoshiError(f"{path}: not a .npy array of codes ({exc})") from None
    if not isinstance(codes, np.ndarray):  # an .npz archive
        codes.close()
        raise MoshiError(f"{path}: expected a .npy array of codes, not an .npz archive")
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2 or 0 in codes.shape or not np.issubdtype(codes.dtype, np.integer):
        raise MoshiError(f"{path}: expected integer codes [K, frames], got {codes.dtype} "
                         f"{codes.shape}")
    if codes.min() < 0 or codes.max() >= 2048:
        raise MoshiError(f"{path}: codes must be in 0..2047")
    return codes.astype(np.int32)


def save_npy(path: Path, array: np.ndarray) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=folder)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MoshiError(f"{path}: cannot write ({exc})") from None

