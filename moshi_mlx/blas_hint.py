"""A one-line hint for Linux users whose MLX runs on the wheel's slow reference BLAS."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

OPENBLAS_PATTERNS = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def _mapped_libraries() -> str:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return ""


def openblas_preload_hint() -> str | None:
    """The LD_PRELOAD setting that routes MLX's CPU matrix products to an installed OpenBLAS
    (about 10x faster GEMMs than the reference BLAS bundled in the Linux mlx[cpu] wheel), or
    None where it does not apply: not Linux, not that wheel's BLAS, already preloaded, or no
    OpenBLAS installed."""
    if sys.platform != "linux" or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return None
    if "mlx_cpu.libs/libblas" not in _mapped_libraries():
        return None
    for pattern in OPENBLAS_PATTERNS:
        found = sorted(glob.glob(pattern))
        if found:
            return f"LD_PRELOAD={found[0]}"
    return None
