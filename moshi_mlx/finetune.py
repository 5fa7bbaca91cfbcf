"""python -m moshi_mlx.finetune: LoRA fine-tuning on MLX.

    python -m moshi_mlx.finetune csm --data convs.jsonl --adapter-path adapters/ --iters 200
    python -m moshi_mlx.finetune csm --data convs.jsonl --adapter-path adapters/ --test --json
    python -m moshi_mlx.tts "Hello." -o out.wav --adapter-path adapters/

Subcommands: csm (Sesame CSM, moshi_mlx.cli.finetune_csm), moshi and annotate (not yet here).
Ctrl-C during training saves the adapter and exits with status 130.
"""

from __future__ import annotations

import argparse
import sys

from moshi_mlx.errors import MoshiError, cli_errors

NOT_YET = {"moshi": "Moshi fine-tuning", "annotate": "word alignments with Kyutai STT"}


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.cli.finetune_csm import add_csm_args
    from moshi_mlx.cli.options import command_prog

    parser = argparse.ArgumentParser(prog=command_prog("moshi_mlx.finetune", "moshi-finetune"),
                                     description="LoRA fine-tuning on MLX (mlx-lm's options).")
    commands = parser.add_subparsers(dest="command", required=True)
    add_csm_args(commands.add_parser("csm", help="fine-tune Sesame CSM (text to speech)"))
    for name, what in NOT_YET.items():
        commands.add_parser(name, help=f"{what} (not available yet)")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in NOT_YET:
        raise MoshiError(f"moshi-finetune {args.command}: {NOT_YET[args.command]} is not "
                         "available yet")
    from moshi_mlx.cli.finetune_csm import run_csm

    return run_csm(args)


if __name__ == "__main__":
    sys.exit(main())
