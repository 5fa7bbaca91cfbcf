"""The `moshi` and `annotate` subcommands of `moshi-finetune` (python -m moshi_mlx.finetune):
LoRA on Moshi's LM (QLoRA on a quantized base) with moshi-finetune's data and loss through the
shared trainer, and word alignments written with our Kyutai STT.

Data (--data): moshi-finetune's .jsonl (or a folder with train.jsonl, valid.jsonl,
test.jsonl); a missing, unreadable or mono file refuses the run before training, naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moshi_mlx.errors import MoshiError


def _notice(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- moshi


# moshi-finetune adapts every Linear of the LM: so does --num-layers' default here.
MOSHI_NUM_LAYERS = -1


def add_moshi_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.cli.finetune_args import add_lora_group, add_model_group, add_training_group
    from moshi_mlx.loading.families import files_of
    from moshi_mlx.training.moshi_data import DURATION_SEC
    from moshi_mlx.training.moshi_lora import MOSHI_LORA_KEYS
    from moshi_mlx.training.moshi_loss import (
        FIRST_CODEBOOK_WEIGHT_MULTIPLIER,
        TEXT_PADDING_WEIGHT,
    )

    model = add_model_group(parser, "Moshi", files_of("moshi").default_repo(),
                            "text tokenizer (SentencePiece .model)")
    model.add_argument("--lora-weight", default=None,
                       help="a moshi-finetune lora.safetensors, fused into the base first")
    model.add_argument("--lora-config", default=None,
                       help="its config.json (lora_rank, lora_scaling; default: the one beside "
                            "it)")
    g = parser.add_argument_group("data (moshi-finetune's loss and data)")
    g.add_argument("--data", required=True, type=Path,
                   help="a .jsonl of stereo audio files (left Moshi, right the user), each with "
                        "a .json of word alignments; or a folder with train.jsonl, "
                        "valid.jsonl, test.jsonl")
    g.add_argument("--text-padding-weight", type=float, default=TEXT_PADDING_WEIGHT,
                   help="weight of PAD / EPAD text targets (default "
                        f"{TEXT_PADDING_WEIGHT}, moshi-finetune's)")
    g.add_argument("--first-codebook-weight-multiplier", type=float,
                   default=FIRST_CODEBOOK_WEIGHT_MULTIPLIER,
                   help="weight of audio codebook 0 (default "
                        f"{FIRST_CODEBOOK_WEIGHT_MULTIPLIER}; moshi-finetune's 7B example: 100)")
    g.add_argument("--duration-sec", type=float, default=DURATION_SEC,
                   help=f"chunk length in seconds (default {DURATION_SEC}); the last chunk of a "
                        "file is padded")
    g.add_argument("--mask-text-past-audio", action="store_true",
                   help="no text targets past the real audio of a padded last chunk "
                        "(moshi-finetune counts PAD there; default: as it does)")
    add_lora_group(parser, MOSHI_LORA_KEYS, MOSHI_NUM_LAYERS,
                   "adapt the last N layers of the temporal transformer and of the depformer "
                   "(the text head and each depformer step's input and output always)")
    add_training_group(parser, '{"loss", "text_loss", "audio_loss", "n_targets", "batches"}')


def load_moshi(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(the Moshi LM, its text tokenizer, the encoder of the data's audio) as the options say;
    --lora-weight fused into the LM."""
    import mlx.core as mx

    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.resolve import resolve
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.training.moshi_data import mimi_encoder
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    weight_file = args.model is not None and Path(args.model).is_file()
    files = resolve("moshi_mlx.local", None if weight_file else args.model,
                    quantize=args.quantize, weights=args.model if weight_file else None,
                    config=args.config, tokenizer=args.tokenizer, codec=args.mimi_weight)
    mx.random.seed(args.seed)
    # one thread: the row-split layers of inference bring nothing to training
    lm = load_lm(files.weight, config=files.config, quantize=args.quantize, dtype=args.dtype,
                 cpu_threads=1)
    if lm.depformer is None:
        raise MoshiError(f"{files.weight}: a speech-to-text model, not Moshi (no depformer)")
    LmAdapterOptions(lora_weight=args.lora_weight, lora_config=args.lora_config).apply(
        lm, cpu_threads=1)
    mimi = load_mimi(files.codec, num_codebooks=lm.cfg.dep_q)
    return lm, load_sentencepiece(files.tokenizer), mimi_encoder(mimi)


def run_moshi(args: argparse.Namespace) -> int:
    import numpy as np

    from moshi_mlx.cli.finetune_args import check_common, load_test_adapter, train_adapter
    from moshi_mlx.training.csm_data import data_files
    from moshi_mlx.training.lora import LoraSettings, apply_lora
    from moshi_mlx.training.moshi_data import MoshiDataset, training_batches
    from moshi_mlx.training.moshi_lora import FAMILY, moshi_lora_paths
    from moshi_mlx.training.moshi_loss import evaluate, moshi_loss

    keys = check_common(args)
    wanted = ["test"] if args.test else ["train", "valid"]
    splits = {name: data_files(args.data, name) for name in wanted}
    if splits[wanted[0]] is None:
        raise MoshiError(f"{args.data}: no {wanted[0]}.jsonl")
    if args.data.is_file() and not args.test:
        splits["valid"] = None  # one file: training only, no validation set
    lm, tokenizer, encode = load_moshi(args)
    data = {name: MoshiDataset(path, tokenizer, encode, args.duration_sec,
                               pad_id=lm.cfg.existing_text_padding_id,
                               mask_text_past_audio=args.mask_text_past_audio, notice=_notice)
            for name, path in splits.items() if path is not None}
    weights = (args.text_padding_weight, args.first_codebook_weight_multiplier)

    if args.test:
        load_test_adapter(lm, args, FAMILY)
        test = data["test"]
        result = evaluate(lm, test.batches(args.batch_size, drop_last=False), *weights)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"test loss {result['loss']:.4f} (text {result['text_loss']:.4f}, audio "
                  f"{result['audio_loss']:.4f}) over {len(test)} chunks, "
                  f"{result['n_targets']} targets")
        return 0

    def loss_fn(model: Any, batch: Any) -> Any:
        return moshi_loss(model, batch, *weights, checkpoint=args.grad_checkpoint)

    paths = moshi_lora_paths(lm, args.num_layers, keys)
    apply_lora(lm, paths, args.rank, args.scale, args.dropout)
    lora = LoraSettings(args.rank, args.scale, args.dropout, tuple(paths), FAMILY,
                        {"num_layers": args.num_layers, "duration_sec": args.duration_sec,
                         "text_padding_weight": weights[0],
                         "first_codebook_weight_multiplier": weights[1]})
    valid = data.get("valid")
    batches = training_batches(data["train"], args.batch_size, np.random.default_rng(args.seed))
    return train_adapter(
        lm, args, lora, loss_fn, batches,
        (lambda: valid.batches(args.batch_size, drop_last=False)) if valid else None,
        frames_of=lambda batch: batch.shape[0] * batch.shape[-1])


# --------------------------------------------------------------------------- annotate


def add_annotate_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.cli.options import add_stt_model_args

    parser.add_argument("data", help="the data .jsonl (stereo audio files: left Moshi, right "
                                     "the user); a .json of word alignments is written beside "
                                     "each file")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace alignment files that exist (default: keep them)")
    add_stt_model_args(parser)


def run_annotate(args: argparse.Namespace) -> int:
    from moshi_mlx.cli.options import resolve_stt_files
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.training.annotate import annotate_jsonl
    from moshi_mlx.training.moshi_data import read_jsonl
    from moshi_mlx.transcription.loader import transcriber_from_files

    read_jsonl(args.data)  # a bad data list is refused before the model loads
    files = resolve_stt_files(args, need_mimi=True)
    transcriber = transcriber_from_files(files, ModelOptions.from_args(args),
                                         vad_weights=args.vad_weights)
    annotate_jsonl(args.data, transcriber, args.overwrite,
                   notice=lambda line: print(line, file=sys.stderr))
    return 0
