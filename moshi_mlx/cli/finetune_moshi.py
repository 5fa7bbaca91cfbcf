"""The `moshi` and `annotate` subcommands of `moshi-finetune` (python -m moshi_mlx.finetune):
Moshi's options, data, loss and Kyutai LoRA files; the entry point owns the shared options.

`run_moshi` reads, besides the options `add_moshi_args` adds, the entry point's shared ones:
`model` (a weight file, folder or repo), `tokenizer`, `config`, `mimi_weight`, `data`,
`batch_size`, `test`, `json`, and -q / --dtype / --cpu-threads / --seed (`add_run_args`).
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


def add_moshi_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.training.moshi_data import DURATION_SEC
    from moshi_mlx.training.moshi_loss import (
        FIRST_CODEBOOK_WEIGHT_MULTIPLIER,
        TEXT_PADDING_WEIGHT,
    )

    g = parser.add_argument_group("Moshi (moshi-finetune's loss and data)")
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
    g.add_argument("--lora-weight", default=None,
                   help="a moshi-finetune lora.safetensors, fused into the base before use")
    g.add_argument("--lora-config", default=None,
                   help="its config.json (lora_rank, lora_scaling; default: the one beside it)")


def prepare_moshi(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the Moshi LM, its MoshiDataset over --data) as the options say."""
    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.loading.resolve import resolve
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.training.moshi_data import MoshiDataset, mimi_encoder

    model = getattr(args, "model", None)
    weight_file = model is not None and Path(model).is_file()
    files = resolve("moshi_mlx.local", None if weight_file else model,
                    quantize=getattr(args, "quantize", None),
                    weights=model if weight_file else None, config=args.config,
                    tokenizer=args.tokenizer, codec=args.mimi_weight)
    options = ModelOptions.from_args(args)
    lm = load_lm(files.weight, config=files.config, **options.load_kwargs())
    if args.lora_weight is not None:
        fuse_kyutai_lora(lm, args.lora_weight, args.lora_config)
    tokenizer = load_sentencepiece(files.tokenizer)
    mimi = load_mimi(files.codec, num_codebooks=lm.cfg.dep_q)
    dataset = MoshiDataset(args.data, tokenizer, mimi_encoder(mimi), args.duration_sec,
                           pad_id=lm.cfg.existing_text_padding_id,
                           mask_text_past_audio=args.mask_text_past_audio, notice=_notice)
    return lm, dataset


def fuse_kyutai_lora(lm: Any, lora_weight: str, lora_config: str | None) -> None:
    """Fuse a moshi-finetune LoRA into a float LM in place."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from moshi_mlx.training.kyutai_lora import read_kyutai_lora

    if any(isinstance(m, nn.QuantizedLinear) for _, m in lm.named_modules()):
        raise MoshiError("--lora-weight is fused into float weights: load the base without "
                         "-q (a bf16 file)")
    lora = read_kyutai_lora(lora_weight, lora_config, dep_q=lm.cfg.dep_q)
    lm.load_weights(list(lora.fuse(dict(tree_flatten(lm.parameters()))).items()))


def run_moshi(args: argparse.Namespace) -> int:
    from moshi_mlx.training.moshi_loss import evaluate

    lm, dataset = prepare_moshi(args)
    if not args.test:
        raise MoshiError("training Moshi is not wired to the trainer yet; --test evaluates")
    result = evaluate(lm, dataset.batches(args.batch_size, drop_last=False),
                      args.text_padding_weight, args.first_codebook_weight_multiplier)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f} (text {result['text_loss']:.4f}, audio "
              f"{result['audio_loss']:.4f}) over {len(dataset)} chunks, "
              f"{result['n_targets']} targets")
    return 0


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
    from moshi_mlx.transcription.loader import transcriber_from_files

    files = resolve_stt_files(args, need_mimi=True)
    transcriber = transcriber_from_files(files, ModelOptions.from_args(args),
                                         vad_weights=args.vad_weights)
    annotate_jsonl(args.data, transcriber, args.overwrite,
                   notice=lambda line: print(line, file=sys.stderr))
    return 0
