"""python -m moshi_mlx.finetune: LoRA fine-tuning on MLX.

    python -m moshi_mlx.finetune csm --data convs.jsonl --adapter-path adapters/ --iters 200
    python -m moshi_mlx.finetune csm --data convs.jsonl --adapter-path adapters/ --test --json
    python -m moshi_mlx.tts "Hello." -o out.wav --adapter-path adapters/
    python -m moshi_mlx.finetune annotate data.jsonl
    python -m moshi_mlx.finetune moshi --data data.jsonl --adapter-path adapters/ -q 4
    python -m moshi_mlx.local --adapter-path adapters/

Subcommands: csm (Sesame CSM, moshi_mlx.cli.finetune_csm), moshi and annotate
(moshi_mlx.cli.finetune_moshi). Ctrl-C during training saves the adapter and exits with
status 130.
"""

from __future__ import annotations

import argparse
import sys

from moshi_mlx.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.cli.finetune_csm import add_csm_args
    from moshi_mlx.cli.finetune_moshi import add_annotate_args, add_moshi_args
    from moshi_mlx.cli.options import command_prog

    parser = argparse.ArgumentParser(prog=command_prog("moshi_mlx.finetune", "moshi-finetune"),
                                     description="LoRA fine-tuning on MLX (mlx-lm's options).")
    commands = parser.add_subparsers(dest="command", required=True)
    add_csm_args(commands.add_parser("csm", help="fine-tune Sesame CSM (text to speech)"))
    add_moshi_args(commands.add_parser("moshi", help="fine-tune Moshi on moshi-finetune's "
                                                     "data"))
    add_annotate_args(commands.add_parser(
        "annotate", help="write moshi-finetune's word alignments with Kyutai STT"))
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "moshi":
        from moshi_mlx.cli.finetune_moshi import run_moshi

        return run_moshi(args)
    if args.command == "annotate":
        from moshi_mlx.cli.finetune_moshi import run_annotate

        return run_annotate(args)
    from moshi_mlx.cli.finetune_csm import run_csm

    return run_csm(args)


if __name__ == "__main__":
    sys.exit(main())
