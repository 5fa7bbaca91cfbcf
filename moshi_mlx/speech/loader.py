"""Sesame CSM, its tokenizer and (when needed) Mimi from resolved files, loaded as
`python -m moshi_mlx.tts` loads them (the server's --tts too)."""

from __future__ import annotations

import os
from typing import Any

from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.loading.resolve import ResolvedFiles


def speech_parts_from_files(files: ResolvedFiles, options: ModelOptions | None = None,
                            needs_mimi: bool = True,
                            adapter_path: str | os.PathLike | None = None,
                            batched: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, mimi) of resolved CSM files (`loading.resolve.resolve(
    "moshi_mlx.tts", ...)`; a weights_convert folder brings its own tokenizer and Mimi);
    mimi is None unless `needs_mimi`. adapter_path: a LoRA adapter folder (python -m
    moshi_mlx.finetune csm) applied over the model, kept apart from its weights. batched:
    the model will generate batches (`moshi_mlx.speech.batch`), so a quantized depth decoder
    on the CPU runs from float copies (`load_csm`'s float_decoder_on_cpu: csm-1b q4 on 2
    cores, 4 requests a step cost 3.9 s instead of 8.8 s, for 0.37 GB)."""
    from moshi_mlx.loading.models import load_csm, load_mimi
    from moshi_mlx.speech.generate import load_tokenizer

    options = options or ModelOptions()
    model = load_csm(files.weight, config=files.config, float_decoder_on_cpu=batched,
                     **options.load_kwargs())
    if adapter_path is not None:
        from moshi_mlx.training.lora import load_adapter

        load_adapter(model, adapter_path, family="csm")
    mimi = load_mimi(files.codec, num_codebooks=model.cfg.num_codebooks) if needs_mimi else None
    return model, load_tokenizer(files.tokenizer), mimi
