"""Command line: python -m weights_convert (--hf-repo REPO | --input FILE) [-q 4|8] --out DIR"""

from __future__ import annotations

import argparse
import sys

from moshi_mlx.cli.options import add_quantize_arg, command_prog
from moshi_mlx.errors import cli_errors


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
    parser.add_argument("--config", help="the model's config.json (default: the one in the repo "
                        "or beside the input, else the released Moshi 7B config)")
    parser.add_argument("--tokenizer", help="text tokenizer to put in the folder (default: the "
                        "one the config names, else the family's own name, beside the weights)")
    parser.add_argument("--mimi-weight", help="Mimi weights to put in the folder (default: the "
                        "config's mimi_name beside the weights, or the Mimi a transformers "
                        "checkpoint bundles)")
    parser.add_argument("--adapter-path", help="a LoRA adapter folder (adapters.safetensors + "
                        "adapter_config.json, python -m moshi_mlx.finetune) to fuse into the "
                        "weights: W + scale * B A, before -q quantizes; for Moshi also "
                        "moshi-finetune's lora.safetensors (config.json beside it)")
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
        adapter_path=args.adapter_path,
    )
    for name, info in result.manifest["files"].items():
        print(f"{result.out_dir / name}  {info['bytes']} bytes  sha256 {info['sha256'][:16]}")
    print(f"{result.out_dir / 'manifest.json'}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def run() -> int:
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: nothing was left under a final file name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
