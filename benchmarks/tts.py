"""Benchmark CSM generation: per-frame time, time to first frame / first audio, peak memory.

Models: `fixture` (the tiny reference model of tests/fixtures/csm, float32) and `1b` (the
csm-1b shapes with random weights, built in memory, quantized with -q; random weights decide
nothing about speed). Sampling at temperature 0.9 / top-k 50 with a fixed seed; a random model
may stop early on an all-zero frame (the JSON says how many frames ran). With --mimi PATH, the
first frame is also decoded by that Mimi (time to first audio includes it). Prints one JSON
object. Run it under the heavy-job lock: flock /tmp/moshi-heavy.lock python benchmarks/tts.py

    python benchmarks/tts.py [--models fixture,1b] [--frames 8] [-q 4] [--mimi PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from moshi_mlx.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()  # before MLX loads, as the command-line tools do

import mlx.core as mx  # noqa: E402

from moshi_mlx.csm_generate import (  # noqa: E402
    ContextCache,
    Segment,
    load_tokenizer,
    stream_speech,
)
from moshi_mlx.loading import QUANTIZATIONS, apply_quantization  # noqa: E402
from moshi_mlx.models import csm as csm_family  # noqa: E402
from moshi_mlx.models.csm import Csm, CsmConfig, load_csm  # noqa: E402
from moshi_mlx.modules.parallel import default_cpu_threads, split_linears  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "csm"
TEXT = "Numbers like seven and twelve are spoken slowly."


def random_1b(bits: int | None) -> Csm:
    cfg = CsmConfig.from_dict({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                               "text_vocab_size": 128256, "audio_vocab_size": 2051,
                               "audio_num_codebooks": 32})
    model = Csm(cfg)
    # As load_csm's automatic dtype: MLX's CPU kernels are fast in float32, slow in bf16.
    model.set_dtype(mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16)
    if bits is not None:
        apply_quantization(model, csm_family, QUANTIZATIONS[bits])  # as the loader does
    mx.eval(model.parameters())
    split_linears(model, default_cpu_threads())  # as load_csm does
    return model


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(model: Csm, tokenizer, frames: int, mimi) -> dict:
    import numpy as np

    context = [Segment(1, "The quick brown fox jumps over the lazy dog.",
                       codes=np.asarray(np.load(FIXTURES / "csm_golden.npz")["context_codes"]))]
    # Warm-up (kernels, allocations), then the measured run with a fresh cache.
    list(stream_speech(model, tokenizer, TEXT, 1, context, max_frames=2, seed=0))
    log("warmed up")
    mx.reset_peak_memory()
    start = time.perf_counter()
    stream = stream_speech(model, tokenizer, TEXT, 1, context, max_frames=frames, seed=0,
                           cache=ContextCache(model))
    stamps, first_audio = [], None
    for frame in stream:
        stamps.append(time.perf_counter())
        if mimi is not None and first_audio is None:
            mimi.reset()
            mimi.decode_step(frame[:, None][None])
            first_audio = time.perf_counter() - start
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    per_frame = statistics.median(steps) if steps else None
    return {
        "frames": len(stamps),
        "stop": stream.stop_reason,
        "prompt_positions": len(stream.cache) - max(len(stamps) - 1, 0),
        "time_to_first_frame_s": round(stamps[0] - start, 4) if stamps else None,
        "time_to_first_audio_s": round(first_audio, 4) if first_audio else None,
        "per_frame_s_median": round(per_frame, 4) if per_frame else None,
        "per_frame_s_mean": round(statistics.mean(steps), 4) if steps else None,
        "real_time_factor": round(per_frame / 0.08, 3) if per_frame else None,
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fixture,1b")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("-q", "--quantize", type=int, default=4, choices=[4, 8, 0],
                        help="bits for the 1b model (0: bf16)")
    parser.add_argument("--mimi", default=None, help="Mimi checkpoint to time the first audio")
    args = parser.parse_args()
    mimi = None
    if args.mimi:
        from moshi_mlx.models.mimi import load_mimi

        mimi = load_mimi(args.mimi, num_codebooks=32)
    tokenizer = load_tokenizer(FIXTURES / "tokenizer.json")
    results = {"device": str(mx.default_device()), "machine": platform.machine(),
               "mlx": mx.__version__, "blas": blas_in_use(), "frames_asked": args.frames}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        if name == "fixture":
            model = load_csm(FIXTURES / "sesame", dtype=mx.float32)
            label = "fixture_float32"
        elif name == "1b":
            model = random_1b(args.quantize or None)
            dtype = "float32" if mx.default_device() == mx.cpu else "bf16"
            label = f"csm1b_random_{'q' + str(args.quantize) if args.quantize else dtype}"
        else:
            raise SystemExit(f"unknown model {name!r}")
        load_s = time.perf_counter() - t0
        log(f"{label}: built in {load_s:.1f} s")
        results[label] = {"build_s": round(load_s, 2), **run(model, tokenizer, args.frames, mimi)}
        del model
        mx.clear_cache()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
