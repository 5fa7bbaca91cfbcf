"""Mimi from the command line.

    python -m moshi_mlx.mimi encode speech.wav codes.npy [--weights PATH_OR_REPO] [--codebooks 8]
    python -m moshi_mlx.mimi decode codes.npy out.wav [--weights PATH_OR_REPO]

Input audio of any sample rate / channel count is converted to 24 kHz mono. Codes are saved
as an int32 .npy array [K, frames]; decoded audio is written as a 24 kHz mono WAV.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import MoshiError, cli_errors

DEFAULT_WEIGHTS = "kyutai/moshiko-pytorch-bf16"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moshi_mlx.mimi", description="Encode audio to Mimi codes and back."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, src, dst in (
        ("encode", "audio file to encode", "where to write the codes (.npy)"),
        ("decode", "codes (.npy, [K, frames] or [1, K, frames])", "where to write the WAV"),
    ):
        cmd = sub.add_parser(name, help=f"{name} with Mimi")
        cmd.add_argument("input", type=Path, help=src)
        cmd.add_argument("output", type=Path, help=dst)
        cmd.add_argument(
            "--weights",
            default=DEFAULT_WEIGHTS,
            help="Mimi checkpoint: a .safetensors file, a folder holding it, or a Hugging Face "
            f"repo id (default {DEFAULT_WEIGHTS})",
        )
        cmd.add_argument(
            "--codebooks",
            type=int,
            default=None,
            help="codebooks to use, 1-32 (default: 8 to encode, all in the file to decode)",
        )
    return parser


def _load_codes(path: Path) -> np.ndarray:
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


def _save_npy(path: Path, array: np.ndarray) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=folder)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MoshiError(f"{path}: cannot write ({exc})") from None


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .audio.io import read_audio, write_audio
    from .models.mimi import load_mimi

    if args.codebooks is not None and not 1 <= args.codebooks <= 32:
        raise MoshiError(f"--codebooks must be 1..32, got {args.codebooks}")
    if args.command == "encode":
        pcm = read_audio(args.input)  # errors before the (slow) weight load
        if not args.output.parent.is_dir() and str(args.output.parent):
            raise MoshiError(f"{args.output}: folder does not exist")
        mimi = load_mimi(args.weights, num_codebooks=args.codebooks or 8)
        codes = np.asarray(mimi.encode(pcm[None, None]))[0]
        _save_npy(args.output, codes.astype(np.int32))
        print(f"{args.input}: {len(pcm) / 24000:.2f} s -> codes {codes.shape}", file=sys.stderr)
    else:
        codes = _load_codes(args.input)
        if args.codebooks is not None:
            if args.codebooks > codes.shape[0]:
                raise MoshiError(
                    f"{args.input} holds {codes.shape[0]} codebooks, --codebooks {args.codebooks}"
                )
            codes = codes[: args.codebooks]
        if codes.shape[0] > 32:
            raise MoshiError(f"{args.input}: {codes.shape[0]} codebooks, Mimi has at most 32")
        mimi = load_mimi(args.weights, num_codebooks=codes.shape[0])
        pcm = np.asarray(mimi.decode(codes[None]))[0, 0]
        write_audio(args.output, pcm)
        print(f"{args.input}: codes {codes.shape} -> {len(pcm) / 24000:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    main()
