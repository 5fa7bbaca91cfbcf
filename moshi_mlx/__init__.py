"""Moshi and Mimi in MLX. Public names are imported lazily so `import moshi_mlx` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

from .blas import load_system_openblas

__version__ = "0.1.0"

# Before any submodule imports MLX: on Linux its CPU matrix products then use an installed
# OpenBLAS instead of the wheel's reference BLAS (see moshi_mlx.blas).
load_system_openblas()

_EXPORTS = {
    "MoshiError": "moshi_mlx.errors",
    "WeightsError": "moshi_mlx.errors",
    "AudioError": "moshi_mlx.errors",
    "Mimi": "moshi_mlx.models.mimi",
    "MimiConfig": "moshi_mlx.models.mimi",
    "load_mimi": "moshi_mlx.models.mimi",
    "LmConfig": "moshi_mlx.models.lm_config",
    "Lm": "moshi_mlx.models.lm",
    "load_lm": "moshi_mlx.models.lm",
    "LmGen": "moshi_mlx.generate",
    "SttGen": "moshi_mlx.generate",
    "Transcriber": "moshi_mlx.transcriber",
    "Transcript": "moshi_mlx.transcriber",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moshi_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
