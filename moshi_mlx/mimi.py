"""Mimi from the command line.

    python -m moshi_mlx.mimi encode speech.wav codes.npy [--weights PATH_OR_REPO] [--codebooks 8]
    python -m moshi_mlx.mimi decode codes.npy out.wav [--weights PATH_OR_REPO]

Input audio of any sample rate / channel count is converted to 24 kHz mono. Codes are saved
as an int32 .npy array [K, frames]; decoded audio is written as a 24 kHz mono WAV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moshi_mlx.audio.codes import load_codes, save_npy
from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.cli.options import command_prog, print_blas_hint
from moshi_mlx.cli.outputs import output_file
from moshi_mlx.errors import MoshiError, cli_errors


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.loading.families import files_of

    default_weights = files_of("mimi").default_repo()
    parser = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.mimi", "moshi-mimi"),
        description="Encode audio to Mimi codes and back.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, src, dst in (
        ("encode", "audio file to encode", "where to write the codes (.npy; a folder, ending "
         "in / when it is to be created, gets INPUT_NAME.npy)"),
        ("decode", "codes (.npy, [K, frames] or [1, K, frames])", "where to write the WAV (a "
         "folder, ending in / when it is to be created, gets INPUT_NAME.wav)"),
    ):
        cmd = sub.add_parser(name, help=f"{name} with Mimi")
        cmd.add_argument("input", type=Path, help=src)
        cmd.add_argument("output", help=dst)
        cmd.add_argument(
            "--weights",
            default=default_weights,
            help="Mimi checkpoint: a .safetensors file, a folder holding it (a weights_convert "
            f"model folder too), or a Hugging Face repo id (default {default_weights})",
        )
        cmd.add_argument(
            "--codebooks",
            type=int,
            default=None,
            help="codebooks to use, 1-32 (default: 8 to encode, all in the file to decode)",
        )
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_blas_hint()
    from moshi_mlx.audio.io import read_audio, write_audio
    from moshi_mlx.loading.models import load_mimi
    from moshi_mlx.loading.resolve import resolve

    if args.codebooks is not None and not 1 <= args.codebooks <= 32:
        raise MoshiError(f"--codebooks must be 1..32, got {args.codebooks}")
    if args.command == "encode":
        pcm = read_audio(args.input)  # errors before the (slow) weight load
        output = output_file(args.output, f"{args.input.stem}.npy")
        mimi = load_mimi(resolve("moshi_mlx.mimi", args.weights).weight,
                         num_codebooks=args.codebooks or 8)
        codes = np.asarray(mimi.encode(pcm[None, None]))[0]
        save_npy(output, codes.astype(np.int32))
        seconds = len(pcm) / SAMPLE_RATE
        print(f"{args.input}: {seconds:.2f} s -> codes {codes.shape}", file=sys.stderr)
    else:
        codes = load_codes(args.input)
        if args.codebooks is not None:
            if args.codebooks > codes.shape[0]:
                raise MoshiError(
                    f"{args.input} holds {codes.shape[0]} codebooks, --codebooks {args.codebooks}"
                )
            codes = codes[: args.codebooks]
        if codes.shape[0] > 32:
            raise MoshiError(f"{args.input}: {codes.shape[0]} codebooks, Mimi has at most 32")
        output = output_file(args.output, f"{args.input.stem}.wav")
        mimi = load_mimi(resolve("moshi_mlx.mimi", args.weights).weight,
                         num_codebooks=codes.shape[0])
        pcm = np.asarray(mimi.decode(codes[None]))[0, 0]
        write_audio(output, pcm)
        seconds = len(pcm) / SAMPLE_RATE
        print(f"{args.input}: codes {codes.shape} -> {seconds:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
