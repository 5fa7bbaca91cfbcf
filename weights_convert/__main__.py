"""Command line: python -m weights_convert (--hf-repo REPO | --input FILE) [-q 4|8] --out DIR"""

from __future__ import annotations

import argparse
import sys

from moshi_mlx.cli.options import add_quantize_arg, command_prog
from moshi_mlx.errors import cli_errors
from moshi_mlx.loading import hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_prog("weights_convert", "moshi-convert"),
        description="Convert a model checkpoint (Moshi, STT or CSM; any layout the loader reads, "
        "bf16 or float) into a local MLX model folder: bf16, or quantized like the official MLX "
        "files (-q 8: 8 bits, group 64; -q 4: 4 bits, group 32).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-repo", help="Hugging Face repo id or local folder holding "
                        "model.safetensors (and config.json, tokenizers when present)")
    source.add_argument("--input", help="a local model.safetensors (PyTorch or MLX bf16 layout)")
    parser.add_argument("--config", help="LM config.json (default: the one beside the weights, "
                        "else the released 7B config)")
    parser.add_argument("--tokenizer", help="text tokenizer to copy (default: the one named "
                        f"by the config, else {hub.MOSHI_TOKENIZER_NAME} (CSM: "
                        f"{hub.TOKENIZER_JSON_NAME}), beside the weights)")
    parser.add_argument("--mimi-weight", help="Mimi weights to copy (default: the config's "
                        f"mimi_name, else {hub.MIMI_NAME}, beside the weights)")
    add_quantize_arg(parser, "quantize to 4 or 8 bits (default: keep bf16)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the converter's files in a non-empty output folder")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from weights_convert.converter import convert  # after parsing: --help stays fast

    result = convert(
        args.out,
        hf_repo=args.hf_repo,
        input_path=args.input,
        config=args.config,
        tokenizer=args.tokenizer,
        mimi_weight=args.mimi_weight,
        bits=args.quantize,
        force=args.force,
    )
    for name, info in result.manifest["files"].items():
        print(f"{result.out_dir / name}  {info['bytes']} bytes  sha256 {info['sha256'][:16]}")
    print(f"{result.out_dir / 'manifest.json'}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def run() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: nothing was left under a final file name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
