"""`python -m moshi_mlx.finetune csm`: LoRA fine-tuning of Sesame CSM, with mlx-lm's options.

Data (--data): a JSON / JSONL file of conversations (moshi_mlx.training.csm_data), or a folder
with train.jsonl (or .json) and optionally valid.* and test.*. Audio turns are encoded with
Mimi once and cached beside the data file. Bad data refuses the run before training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moshi_mlx.errors import MoshiError
from moshi_mlx.training.csm_data import TRAIN_ON
from moshi_mlx.training.csm_lora import CSM_LORA_KEYS
from moshi_mlx.training.lora import DEFAULT_NUM_LAYERS, DEFAULT_RANK, DEFAULT_SCALE

FAMILY = "csm"
DEFAULT_DEPTH_RATIO = 1.0  # transformers' depth_decoder_labels_ratio default


def add_csm_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.cli.options import add_compute_args, add_quantize_arg, positive_int, seed
    from moshi_mlx.loading.families import files_of

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="SRC",
                       help="CSM weights: a file, folder or repo id (default "
                            f"{files_of('csm').default_repo()})")
    model.add_argument("--config", default=None, help="CSM config.json (default: beside it)")
    model.add_argument("--tokenizer", default=None, help="tokenizer.json (file, folder, repo)")
    model.add_argument("--mimi-weight", default=None,
                       help="Mimi checkpoint that encodes the data's audio")
    add_quantize_arg(model, "quantize the base on load: 4 or 8 bits (QLoRA)")
    add_compute_args(model)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, type=Path,
                      help="conversations: a .json / .jsonl file, or a folder with "
                           "train.jsonl, valid.jsonl, test.jsonl")
    data.add_argument("--train-on", choices=TRAIN_ON, default="all",
                      help="which audio turns are targets: all (transformers' rule) or the "
                           "last turn of each conversation (default all)")
    data.add_argument("--depth-decoder-labels-ratio", type=float, default=DEFAULT_DEPTH_RATIO,
                      help="share of audio frames that train the depth decoder (transformers' "
                           f"depth_decoder_labels_ratio; default {DEFAULT_DEPTH_RATIO:g})")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--adapter-path", type=Path, default=Path("adapters"),
                      help="folder of adapters.safetensors + adapter_config.json (written by "
                           "training, read by --test; default ./adapters)")
    lora.add_argument("--rank", type=positive_int, default=DEFAULT_RANK,
                      help=f"LoRA rank (default {DEFAULT_RANK})")
    lora.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                      help=f"LoRA scale (default {DEFAULT_SCALE:g})")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    lora.add_argument("--num-layers", type=int, default=DEFAULT_NUM_LAYERS,
                      help="adapt the last N layers of the backbone and of the depth decoder "
                           f"(-1: all; default {DEFAULT_NUM_LAYERS})")
    lora.add_argument("--target-modules", default=",".join(CSM_LORA_KEYS),
                      help="comma-separated linears of each layer to adapt (default all: "
                           f"{','.join(CSM_LORA_KEYS)})")
    lora.add_argument("--resume-adapter-file", type=Path, default=None,
                      help="start from this adapters.safetensors (same rank and modules)")
    train = parser.add_argument_group("training")
    train.add_argument("--iters", type=positive_int, default=1000)
    train.add_argument("--batch-size", type=positive_int, default=4)
    train.add_argument("--learning-rate", type=float, default=1e-5)
    train.add_argument("--steps-per-report", type=positive_int, default=10)
    train.add_argument("--steps-per-eval", type=positive_int, default=200)
    train.add_argument("--val-batches", type=int, default=25,
                       help="validation batches per evaluation (-1: all; 0: none)")
    train.add_argument("--save-every", type=positive_int, default=100,
                       help="write NNNNNNN_adapters.safetensors every N steps")
    train.add_argument("--grad-checkpoint", action="store_true",
                       help="recompute each layer in the backward pass (less memory)")
    train.add_argument("--seed", type=seed, default=0)
    train.add_argument("--test", action="store_true",
                       help="only evaluate the loss over the test data (the --data file, or "
                            "test.jsonl of a folder) with the adapter of --adapter-path when "
                            "it has one, then exit")
    train.add_argument("--json", action="store_true",
                       help='with --test: print one JSON line {"loss", "backbone_loss", '
                            '"depth_decoder_loss", "targets"}')


def _check(args: argparse.Namespace) -> list[str]:
    if args.json and not args.test:
        raise MoshiError("--json goes with --test")
    if not 0.0 <= args.depth_decoder_labels_ratio <= 1.0:
        raise MoshiError("--depth-decoder-labels-ratio must be in [0, 1], got "
                         f"{args.depth_decoder_labels_ratio}")
    if not 0.0 <= args.dropout < 1.0:
        raise MoshiError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.resume_adapter_file is not None and not args.resume_adapter_file.is_file():
        raise MoshiError(f"{args.resume_adapter_file}: no such adapter file")
    return [key.strip() for key in args.target_modules.split(",") if key.strip()]


def _raw_has_audio(path: Path) -> bool:
    from moshi_mlx.training.csm_data import read_raw_conversations

    return any(isinstance(turn, dict) and turn.get("audio")
               for conv in read_raw_conversations(path) if isinstance(conv, list)
               for turn in conv)


def run_csm(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.loading.models import load_csm, load_mimi
    from moshi_mlx.loading.resolve import resolve
    from moshi_mlx.speech.generate import load_tokenizer
    from moshi_mlx.training.csm_data import (
        CodesCache,
        data_files,
        evaluation_batches,
        example_of,
        read_conversations,
        training_batches,
    )
    from moshi_mlx.training.csm_lora import csm_lora_paths
    from moshi_mlx.training.csm_loss import csm_loss
    from moshi_mlx.training.lora import (
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
        LoraSettings,
        apply_lora,
        load_adapter,
        load_adapter_weights,
        save_adapter,
        trainable_count,
    )
    from moshi_mlx.training.trainer import TrainingSettings, evaluate, train

    keys = _check(args)
    settings = TrainingSettings(args.iters, args.learning_rate, args.steps_per_report,
                                args.steps_per_eval, args.val_batches, args.save_every)
    splits = {name: data_files(args.data, name) for name in ("train", "valid", "test")}
    wanted = ["test"] if args.test else ["train", "valid"]
    if splits[wanted[0]] is None:
        raise MoshiError(f"{args.data}: no {wanted[0]}.jsonl or {wanted[0]}.json")
    if args.data.is_file() and not args.test:
        splits["valid"] = None  # one file: training only, no validation set
    paths = [splits[name] for name in wanted if splits[name] is not None]
    needs_mimi = any(_raw_has_audio(path) for path in paths)
    files = resolve("moshi_mlx.tts", args.model, quantize=args.quantize, config=args.config,
                    tokenizer=args.tokenizer, codec=args.mimi_weight, need_codec=needs_mimi)
    mx.random.seed(args.seed)
    model = load_csm(files.weight, config=files.config, quantize=args.quantize,
                     dtype=args.dtype, cpu_threads=1, float_decoder_on_cpu=False)
    tokenizer = load_tokenizer(files.tokenizer)
    k = model.cfg.num_codebooks
    mimi_id = f"{files.codec.name}:{files.codec.stat().st_size}" if needs_mimi else ""
    mimi = []  # loaded at the first audio the cache does not hold

    def encode(pcm: np.ndarray) -> np.ndarray:
        if not mimi:
            mimi.append(load_mimi(files.codec, num_codebooks=k))
        return np.asarray(mimi[0].encode(mx.array(pcm[None, None])))[0]

    examples = {}
    for name in wanted:
        if splits[name] is None:
            continue
        cache = CodesCache(splits[name], mimi_id, encode)
        conversations = read_conversations(splits[name], cache.of if needs_mimi else None, k)
        cache.save()
        if cache.resampled:
            rates = ", ".join(f"{r} Hz" for r in sorted(cache.resampled))
            print(f"note: {splits[name]}: audio at {rates} resampled to 24 kHz",
                  file=sys.stderr)
        examples[name] = [example_of(tokenizer, c, args.train_on, k,
                                     model.cfg.backbone.max_seq_len) for c in conversations]

    def loss_fn(m, batch):
        return csm_loss(m, batch, checkpoint=args.grad_checkpoint)

    ratio = args.depth_decoder_labels_ratio
    if args.test:
        if (args.adapter_path / ADAPTER_CONFIG_NAME).is_file():
            load_adapter(model, args.adapter_path, family=FAMILY)
        else:
            print(f"note: no adapter in {args.adapter_path}: the base model's loss",
                  file=sys.stderr)
        result = evaluate(model, loss_fn, evaluation_batches(examples["test"], args.batch_size,
                                                             ratio, args.seed))
        if args.json:
            print(json.dumps(result))
        else:
            print(f"test loss {result['loss']:.4f} (backbone {result['backbone_loss']:.4f}, "
                  f"depth decoder {result['depth_decoder_loss']:.4f}) over "
                  f"{int(result['targets'])} frames")
        return 0

    lora_paths = csm_lora_paths(model, args.num_layers, keys)
    apply_lora(model, lora_paths, args.rank, args.scale, args.dropout)
    if args.resume_adapter_file is not None:
        load_adapter_weights(model, args.resume_adapter_file)
    lora = LoraSettings(args.rank, args.scale, args.dropout, tuple(lora_paths), FAMILY,
                        {"num_layers": args.num_layers, "train_on": args.train_on,
                         "depth_decoder_labels_ratio": ratio})
    print(f"LoRA on {len(lora_paths)} linears: {trainable_count(model)} trainable parameters",
          file=sys.stderr)
    rng = np.random.default_rng(args.seed)

    def save(step: int | None) -> None:
        save_adapter(model, args.adapter_path, lora)
        if step is not None:
            save_adapter(model, args.adapter_path, lora, f"{step:07d}_{ADAPTER_WEIGHTS_NAME}")

    valid = examples.get("valid")
    result = train(
        model, loss_fn, training_batches(examples["train"], args.batch_size, rng, ratio),
        settings, save,
        validation=(lambda: evaluation_batches(valid, args.batch_size, ratio, args.seed))
        if valid else None,
        report=lambda line: print(line, flush=True))
    where = args.adapter_path / ADAPTER_WEIGHTS_NAME
    if result.interrupted:
        print(f"interrupted after {result.steps} steps: adapter saved to {where}",
              file=sys.stderr)
        return 130
    print(f"adapter saved to {where}", file=sys.stderr)
    return 0
