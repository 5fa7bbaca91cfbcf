"""A ready Transcriber from released or local files: the LM, its SentencePiece tokenizer and
Mimi, resolved exactly as `python -m moshi_mlx.stt` resolves them."""

from __future__ import annotations

import os
from typing import Any

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.loading.resolve import ResolvedFiles, resolve
from moshi_mlx.transcription.transcriber import Transcriber

PathLike = str | os.PathLike


def stt_parts_from_files(files: ResolvedFiles, options: ModelOptions | None = None, *,
                         vad_weights: PathLike | None = None) -> tuple[Any, Any, Any]:
    """(lm, tokenizer, mimi) of resolved STT files (`loading.resolve.resolve("moshi_mlx.stt",
    ...)`); mimi is None when the files name no codec."""
    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece

    options = options or ModelOptions()
    lm = load_lm(files.weight, config=files.config, vad_weights=vad_weights,
                 **options.load_kwargs())
    tokenizer = load_sentencepiece(files.tokenizer)
    if tokenizer.get_piece_size() < lm.cfg.text_card:
        raise WeightsError(f"{files.tokenizer} has {tokenizer.get_piece_size()} pieces, the "
                           f"model {lm.cfg.text_card}: not this model's tokenizer")
    mimi = None if files.codec is None else load_mimi(files.codec, num_codebooks=lm.cfg.n_q)
    return lm, tokenizer, mimi


def stt_parts(source: PathLike | None, options: ModelOptions | None = None
              ) -> tuple[Any, Any, Any]:
    """(lm, tokenizer, mimi) for `source` (a repo id or a folder; None: the released model),
    resolved as the STT command resolves it (the server's --stt)."""
    options = options or ModelOptions()
    files = resolve("moshi_mlx.stt", source, quantize=options.quantize)
    return stt_parts_from_files(files, options)


def transcriber_from_files(files: ResolvedFiles, options: ModelOptions | None = None, *,
                           vad_weights: PathLike | None = None, temp: float = 0.0,
                           top_k: int = 50, eot_threshold: float = 0.5) -> Transcriber:
    """Load resolved STT files (`loading.resolve.resolve("moshi_mlx.stt", ...)`)."""
    options = options or ModelOptions()
    lm, tokenizer, mimi = stt_parts_from_files(files, options, vad_weights=vad_weights)
    return Transcriber(lm, tokenizer, mimi, temp=temp, top_k=top_k, seed=options.seed,
                       eot_threshold=eot_threshold)


def load_transcriber(source: PathLike | None = None, *, model: str | None = None,
                     quantize: int | None = None, dtype: str | None = None,
                     cpu_threads: int | None = None, seed: int | None = None,
                     vad_weights: PathLike | None = None, weights: PathLike | None = None,
                     config: PathLike | None = None, tokenizer: PathLike | None = None,
                     mimi_weight: PathLike | None = None, temp: float = 0.0, top_k: int = 50,
                     eot_threshold: float = 0.5) -> Transcriber:
    """A Transcriber for `source` (a repo id or a folder; None: the released `model`, "1b" by
    default, or "2.6b"). The keywords are the STT command's options: -q, --dtype,
    --cpu-threads, --seed, --vad-weights, --moshi-weight, --config, --tokenizer,
    --mimi-weight, --temp, --top-k, --eot-threshold."""
    files = resolve("moshi_mlx.stt", source, variant=model, quantize=quantize, weights=weights,
                    config=config, tokenizer=tokenizer, codec=mimi_weight)
    options = ModelOptions(quantize, dtype or "auto", cpu_threads, seed)
    return transcriber_from_files(files, options, vad_weights=vad_weights, temp=temp,
                                  top_k=top_k, eot_threshold=eot_threshold)
