"""The options every `moshi-finetune` subcommand that trains shares (mlx-lm's spellings): the
model's files, the LoRA, the training loop, --test; each subcommand adds its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moshi_mlx.errors import MoshiError
from moshi_mlx.training.lora import DEFAULT_RANK, DEFAULT_SCALE


def add_model_group(parser: argparse.ArgumentParser, what: str, default_repo: str,
                    tokenizer_help: str) -> Any:
    """--model, --config, --tokenizer, --mimi-weight, -q, --dtype, --cpu-threads."""
    from moshi_mlx.cli.options import add_compute_args, add_quantize_arg

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="SRC",
                       help=f"{what} weights: a file, folder or repo id (default {default_repo})")
    model.add_argument("--config", default=None, help=f"{what} config.json (default: beside it)")
    model.add_argument("--tokenizer", default=None, help=tokenizer_help)
    model.add_argument("--mimi-weight", default=None,
                       help="Mimi checkpoint that encodes the data's audio")
    add_quantize_arg(model, "quantize the base on load: 4 or 8 bits (QLoRA)")
    add_compute_args(model)
    return model


def add_lora_group(parser: argparse.ArgumentParser, keys: Sequence[str], num_layers: int,
                   layers_help: str) -> Any:
    """--adapter-path, --rank, --scale, --dropout, --num-layers, --target-modules,
    --resume-adapter-file."""
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--adapter-path", type=Path, default=Path("adapters"),
                      help="folder of adapters.safetensors + adapter_config.json (written by "
                           "training, read by --test; default ./adapters)")
    lora.add_argument("--rank", type=_positive_int, default=DEFAULT_RANK,
                      help=f"LoRA rank (default {DEFAULT_RANK})")
    lora.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                      help=f"LoRA scale (default {DEFAULT_SCALE:g})")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    lora.add_argument("--num-layers", type=int, default=num_layers,
                      help=f"{layers_help} (-1: all; default {num_layers})")
    lora.add_argument("--target-modules", default=",".join(keys),
                      help="comma-separated linears of each layer to adapt (default all: "
                           f"{','.join(keys)})")
    lora.add_argument("--resume-adapter-file", type=Path, default=None,
                      help="start from this adapters.safetensors (same rank and modules)")
    return lora


def add_training_group(parser: argparse.ArgumentParser, json_keys: str) -> Any:
    """The loop (--iters ... --seed) and --test / --json."""
    from moshi_mlx.cli.options import seed

    train = parser.add_argument_group("training")
    train.add_argument("--iters", type=_positive_int, default=1000)
    train.add_argument("--batch-size", type=_positive_int, default=4)
    train.add_argument("--learning-rate", type=float, default=1e-5)
    train.add_argument("--steps-per-report", type=_positive_int, default=10)
    train.add_argument("--steps-per-eval", type=_positive_int, default=200)
    train.add_argument("--val-batches", type=int, default=25,
                       help="validation batches per evaluation (-1: all; 0: none)")
    train.add_argument("--save-every", type=_positive_int, default=100,
                       help="write NNNNNNN_adapters.safetensors every N steps")
    train.add_argument("--grad-checkpoint", action="store_true",
                       help="recompute each layer in the backward pass (less memory)")
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument("--test", action="store_true",
                       help="only evaluate the loss over the test data (the --data file, or "
                            "test.jsonl of a folder) with the adapter of --adapter-path when "
                            "it has one, then exit")
    train.add_argument("--json", action="store_true",
                       help=f"with --test: print one JSON line {json_keys}")
    return train


def _positive_int(text: str) -> int:
    from moshi_mlx.cli.options import positive_int

    return positive_int(text)


def check_common(args: argparse.Namespace) -> list[str]:
    """Refuse what the shared options cannot mean; returns the --target-modules keys."""
    if args.json and not args.test:
        raise MoshiError("--json goes with --test")
    if not 0.0 <= args.dropout < 1.0:
        raise MoshiError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.resume_adapter_file is not None and not args.resume_adapter_file.is_file():
        raise MoshiError(f"{args.resume_adapter_file}: no such adapter file")
    return [key.strip() for key in args.target_modules.split(",") if key.strip()]


def training_settings(args: argparse.Namespace) -> Any:
    from moshi_mlx.training.trainer import TrainingSettings

    return TrainingSettings(args.iters, args.learning_rate, args.steps_per_report,
                            args.steps_per_eval, args.val_batches, args.save_every)


def load_test_adapter(model: Any, args: argparse.Namespace, family: str) -> None:
    """--test: the adapter of --adapter-path when it has one, else the base (said)."""
    from moshi_mlx.training.lora import ADAPTER_CONFIG_NAME, load_adapter

    if (args.adapter_path / ADAPTER_CONFIG_NAME).is_file():
        load_adapter(model, args.adapter_path, family=family)
    else:
        print(f"note: no adapter in {args.adapter_path}: the base model's loss",
              file=sys.stderr)


def train_adapter(model: Any, args: argparse.Namespace, lora: Any, loss_fn: Callable,
                  batches: Any, validation: Callable[[], Any] | None,
                  frames_of: Callable[[Any], int] | None = None) -> int:
    """Train the LoRA already applied to `model` (starting from --resume-adapter-file when
    given), saving to --adapter-path as `lora` (LoraSettings) says; the exit status (130
    when Ctrl-C stopped it, the adapter saved)."""
    from moshi_mlx.training.lora import (
        ADAPTER_WEIGHTS_NAME,
        load_adapter_weights,
        save_adapter,
        trainable_count,
    )
    from moshi_mlx.training.trainer import train

    if args.resume_adapter_file is not None:
        load_adapter_weights(model, args.resume_adapter_file)
    print(f"LoRA on {len(lora.paths)} linears: {trainable_count(model)} trainable parameters",
          file=sys.stderr)

    def save(step: int | None) -> None:
        save_adapter(model, args.adapter_path, lora)
        if step is not None:
            save_adapter(model, args.adapter_path, lora, f"{step:07d}_{ADAPTER_WEIGHTS_NAME}")

    extra = {} if frames_of is None else {"frames_of": frames_of}
    result = train(model, loss_fn, batches, training_settings(args), save,
                   validation=validation, report=lambda line: print(line, flush=True), **extra)
    where = args.adapter_path / ADAPTER_WEIGHTS_NAME
    if result.interrupted:
        print(f"interrupted after {result.steps} steps: adapter saved to {where}",
              file=sys.stderr)
        return 130
    print(f"adapter saved to {where}", file=sys.stderr)
    return 0
