"""Linux: MLX's CPU matrix products on an installed OpenBLAS instead of the wheel's own BLAS.

The Linux mlx[cpu] wheel bundles the netlib reference BLAS (one thread, unblocked): a 50x512
by 512x2048 float product takes ~15-30 ms with it and ~1.3-2.4 ms with OpenBLAS on a 2-core
machine. Loading an installed OpenBLAS into the global symbol scope before MLX's libraries
load makes the dynamic linker bind MLX's `cblas_*` calls to it, exactly as LD_PRELOAD would,
without restarting the process. `import moshi_mlx` does this (MOSHI_MLX_BLAS=bundled keeps the
wheel's BLAS); it cannot once `mlx.core` was imported first, and then says so once on stderr.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

ENV_SWITCH = "MOSHI_MLX_BLAS"
OPENBLAS_PATTERNS = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
BUNDLED_MARKER = "mlx_cpu.libs/libblas"
BUNDLED = "bundled reference BLAS"

_loaded: str | None = None
_warned = False


def find_openblas() -> str | None:
    for pattern in OPENBLAS_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def load_system_openblas() -> str | None:
    """Load an installed OpenBLAS for MLX to bind to; returns its path, or None where this
    does not apply (not Linux, switched off, MLX already imported, none installed)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    if sys.platform != "linux" or _switched_off():
        return None
    if "mlx.core" in sys.modules:  # MLX's symbols are bound already
        _warn_imported_too_late()
        return None
    path = find_openblas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _loaded = path
    return path


def _warn_imported_too_late() -> None:
    """Once per process, on stderr: mlx was imported before moshi_mlx, so an installed
    OpenBLAS could not be put under MLX, which stays ~3x slower for Mimi."""
    global _warned
    if _warned or blas_in_use() != BUNDLED:
        return
    installed = find_openblas()
    if installed is None:
        return
    _warned = True
    print(f"moshi_mlx: warning: mlx was imported before moshi_mlx, so MLX keeps its slow "
          f"reference BLAS (Mimi ~3x slower); import moshi_mlx first, or start with "
          f"LD_PRELOAD={installed} (MOSHI_MLX_BLAS=bundled silences this)", file=sys.stderr)


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").lower() == "bundled"


def _mapped_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def blas_in_use() -> str:
    """What MLX's float matmuls run on in this process, for benchmark reports."""
    if sys.platform != "linux":
        return "platform default"
    maps = _mapped_libraries()
    if "libopenblas" in maps:
        return "openblas"
    return BUNDLED if BUNDLED_MARKER in maps else "unknown"


def blas_hint() -> str | None:
    """A one-line hint for a process whose MLX runs on the wheel's reference BLAS with nothing
    faster loaded, or None (not Linux, another BLAS in use, or the user chose the bundled one).
    """
    if _switched_off() or blas_in_use() != BUNDLED:
        return None
    installed = find_openblas()
    if installed:
        return (f"MLX uses a slow reference BLAS here; import moshi_mlx before mlx, or start "
                f"with LD_PRELOAD={installed}, for ~5x faster Mimi")
    return ("MLX uses a slow reference BLAS here; installing OpenBLAS "
            "(apt install libopenblas0-pthread) makes Mimi ~5x faster")
