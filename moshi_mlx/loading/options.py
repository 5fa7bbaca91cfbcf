"""How a model is loaded and run: the options every family's loader takes, built once from
the command line (moshi_mlx.cli.options.add_run_args) or by a library user."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelOptions:
    """How a model is loaded and run, for every family: the shared -q / --dtype /
    --cpu-threads / --seed (`add_run_args`). quantize: None or bits of `QUANTIZATIONS`;
    dtype: "auto", "bf16" or "f32"; cpu_threads: None = one per core; seed: None = fresh."""

    quantize: int | None = None
    dtype: str = "auto"
    cpu_threads: int | None = None
    seed: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(args.quantize, args.dtype, args.cpu_threads, args.seed)

    def load_kwargs(self) -> dict[str, Any]:
        """The keyword arguments every loader takes (load_lm, load_csm)."""
        return {"quantize": self.quantize, "dtype": self.dtype, "cpu_threads": self.cpu_threads}
