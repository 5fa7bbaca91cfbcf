"""What every command line shares: argument types and groups, the model-file options and how
they resolve (through `moshi_mlx.loading.resolve`), early checks, and the BLAS hint."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moshi_mlx.loading.resolve import ResolvedFiles

DTYPE_CHOICES = ("auto", "bf16", "f32")


# ---------------------------------------------------------------------------- argument types


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2**63 - 1, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_quantize_arg(group: Any, help_text: str) -> None:
    group.add_argument("-q", "--quantize", type=int, choices=(4, 8), default=None, help=help_text)


def add_compute_args(group: Any) -> None:
    """--dtype and --cpu-threads: how a loaded model computes (every model family)."""
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="activation dtype (default auto: bf16 on a GPU, f32 on the CPU "
                            "backend, where it is much faster)")
    group.add_argument("--cpu-threads", type=positive_int, default=None,
                       help="when computing on the CPU, split large layers over N threads "
                            "(default: one per core; 1 = no split)")


def print_blas_hint() -> None:
    """One stderr line when MLX runs on the slow reference BLAS (Linux)."""
    from moshi_mlx.cli.blas import blas_hint

    hint = blas_hint()
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


# ---------------------------------------------------------------------------- files


# ---------------------------------------------------------------------------- Moshi


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose and load the Moshi model (terminal and web front ends)."""
    from moshi_mlx.loading.families import files_of

    g = parser.add_argument_group("model")
    add_quantize_arg(g, "quantized weights: 4 or 8 bits (default: bf16)")
    g.add_argument("--hf-repo", default=None,
                   help="Hugging Face repo id or local folder holding the model files "
                        "(default: the official kyutai/<voice>-mlx-<q4|q8|bf16> repo)")
    voices = tuple(files_of("moshi").repos)  # the released ones: moshiko, moshika
    g.add_argument("--voice", choices=voices, default=voices[0],
                   help="which released voice to use when --hf-repo is not given")
    g.add_argument("--moshi-weight", default=None, help="Moshi weight file (path or repo name)")
    g.add_argument("--mimi-weight", default=None, help="Mimi weight file")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--config", default=None, help="Moshi config.json (default: the repo's)")
    add_compute_args(g)
    g.add_argument("--seed", type=seed, default=None, help="random seed for sampling (>= 0)")
    g.add_argument("--text-temp", type=float, default=0.7, help="text temperature (0 = greedy)")
    g.add_argument("--text-topk", type=int, default=25)
    g.add_argument("--audio-temp", type=float, default=0.8, help="audio temperature (0 = greedy)")
    g.add_argument("--audio-topk", type=int, default=250)
    g.add_argument("--mimi-backend", choices=("mlx", "rustymimi"), default="mlx",
                   help="Mimi implementation (default: our MLX one)")


def resolve_model_files(args: argparse.Namespace) -> ResolvedFiles:
    """The Moshi files the `add_model_args` options name (local paths, a folder or a hub repo,
    through moshi_mlx.loading.resolve), checked from their header before anything is loaded."""
    from moshi_mlx.loading.resolve import resolve

    return resolve("moshi_mlx.local", args.hf_repo, variant=getattr(args, "voice", None),
                   quantize=getattr(args, "quantize", None), weights=args.moshi_weight,
                   config=args.config, tokenizer=args.tokenizer, codec=args.mimi_weight)


def build_engine(args: argparse.Namespace) -> Any:
    """Resolve the files named by `add_model_args` options and load the engine."""
    from moshi_mlx.conversation.engine import Engine

    files = resolve_model_files(args)
    engine = Engine.from_files(
        files.weight,
        files.codec,
        files.tokenizer,
        config=files.config,
        quantize=files.quantize,
        dtype=args.dtype,
        seed=args.seed,
        text_temp=args.text_temp,
        text_topk=args.text_topk,
        audio_temp=args.audio_temp,
        audio_topk=args.audio_topk,
        mimi_backend=args.mimi_backend,
        cpu_threads=args.cpu_threads,
    )
    print_blas_hint()
    return engine

