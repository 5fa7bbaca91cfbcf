"""Time the official MLX package's STT pieces, for the side-by-side figures of benchmarks/stt.py.

Run with the Python of a virtual environment that has the official package (moshi_mlx==0.3.0,
MLX 0.26.5), from a folder that does not contain our `moshi_mlx` (benchmarks/stt.py does both):

    /work/official-venv/bin/python benchmarks/official_stt_step.py --config DIR/config.json \
        --weights DIR/model.q4.safetensors --mimi DIR/mimi.safetensors --audio speech.wav

The LM is loaded the way `python -m moshi_mlx.run_inference` loads it (bf16 activations, 4/8
bits from the `.q4`/`.q8` file suffix, `load_weights(strict=True)`), then `LmGen.step` is timed
on random codes of 32 codebooks, and rustymimi's `encode_step` on the audio's 1920-sample frames
(the Mimi that run_inference uses). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path


def median_ms(times: list[float]) -> float:
    return round(1e3 * statistics.median(times), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--mimi", type=Path, default=None)
    parser.add_argument("--audio", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frames", type=int, default=30)
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np

    from moshi_mlx import models, utils

    if Path(models.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        sys.exit("error: this imported our moshi_mlx, not the official one; run it elsewhere")

    raw = json.loads(args.config.read_text())
    config = models.LmConfig.from_config_dict(raw)
    model = models.Lm(config)
    model.set_dtype(mx.bfloat16)
    if args.weights.name.endswith(".q4.safetensors"):
        nn.quantize(model, bits=4, group_size=32)
    elif args.weights.name.endswith(".q8.safetensors"):
        nn.quantize(model, bits=8, group_size=64)
    model.load_weights(str(args.weights), strict=True)
    model.warmup(None)
    report: dict = {"implementation": "official moshi_mlx", "mlx_version": mx.__version__}

    total = args.warmup + args.steps
    gen = models.LmGen(model=model, max_steps=total,
                       text_sampler=utils.Sampler(top_k=25, temp=0.0),
                       audio_sampler=utils.Sampler(top_k=250, temp=0.0), check=False)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, config.audio_vocab_size - 1, size=(total, 1, config.other_codebooks))
    mx.reset_peak_memory()
    times = []
    for step in range(total):
        start = time.perf_counter()
        text = gen.step(mx.array(codes[step], dtype=mx.int32), None)
        text[0].item()  # what run_inference does with every token
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    report["lm_step_ms"] = median_ms(times)
    report["lm_peak_mlx_memory_gb"] = round(mx.get_peak_memory() / 2**30, 3)

    if args.mimi is not None and args.audio is not None:
        import rustymimi
        import sphn

        pcm, _ = sphn.read(str(args.audio), sample_rate=24000)
        mimi = rustymimi.Tokenizer(str(args.mimi), num_codebooks=config.other_codebooks)
        frames = min(args.frames, pcm.shape[-1] // 1920)
        times = []
        for f in range(frames):
            chunk = pcm[None, 0:1, f * 1920:(f + 1) * 1920]
            start = time.perf_counter()
            mimi.encode_step(chunk)
            if f >= 2:
                times.append(time.perf_counter() - start)
        report["mimi_encode_frame_ms"] = median_ms(times)
    report["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
