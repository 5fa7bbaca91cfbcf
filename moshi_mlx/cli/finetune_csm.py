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
from moshi_mlx.training.lora import DEFAULT_NUM_LAYERS

FAMILY = "csm"
DEFAULT_DEPTH_RATIO = 1.0  # transformers' depth_decoder_labels_ratio default


def add_csm_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.cli.finetune_args import add_lora_group, add_model_group, add_training_group
    from moshi_mlx.loading.families import files_of

    add_model_group(parser, "CSM", files_of("csm").default_repo(),
                    "tokenizer.json (file, folder, repo)")
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
    add_lora_group(parser, CSM_LORA_KEYS, DEFAULT_NUM_LAYERS,
                   "adapt the last N layers of the backbone and of the depth decoder")
    add_training_group(parser, '{"loss", "backbone_loss", "depth_decoder_loss", "targets"}')


def _check(args: argparse.Namespace) -> list[str]:
    from moshi_mlx.cli.finetune_args import check_common

    keys = check_common(args)
    if not 0.0 <= args.depth_decoder_labels_ratio <= 1.0:
        raise MoshiError("--depth-decoder-labels-ratio must be in [0, 1], got "
                         f"{args.depth_decoder_labels_ratio}")
    return keys


def _raw_has_audio(path: Path) -> bool:
    from moshi_mlx.training.csm_data import read_raw_conversations

    return any(isinstance(turn, dict) and turn.get("audio")
               for conv in read_raw_conversations(path) if isinstance(conv, list)
               for turn in conv)


def run_csm(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.cli.finetune_args import load_test_adapter, train_adapter
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
    from moshi_mlx.training.lora import LoraSettings, apply_lora
    from moshi_mlx.training.trainer import evaluate

    keys = _check(args)
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
        load_test_adapter(model, args, FAMILY)
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
    lora = LoraSettings(args.rank, args.scale, args.dropout, tuple(lora_paths), FAMILY,
                        {"num_layers": args.num_layers, "train_on": args.train_on,
                         "depth_decoder_labels_ratio": ratio})
    rng = np.random.default_rng(args.seed)
    valid = examples.get("valid")
    return train_adapter(
        model, args, lora, loss_fn,
        training_batches(examples["train"], args.batch_size, rng, ratio),
        (lambda: evaluation_batches(valid, args.batch_size, ratio, args.seed))
        if valid else None)
