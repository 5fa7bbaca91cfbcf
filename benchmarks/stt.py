"""Kyutai STT speed and memory; prints JSON.

- fixture: the tiny STT test model (tests/fixtures/stt), float32: median `SttGen.step` ms,
  eager vs compiled (per-step overhead, the figure that transfers to a Mac), and MLX active
  memory after 2·context steps and at the end of a long codes stream (it must not grow).
- 1b_q4: the stt-1b-en_fr architecture (dim 2048, 16 layers, context 750, 32 codebooks, 4 VAD
  heads) with random 4-bit weights, float32 activations: median step ms, peak memory.
- mimi: Mimi with 32 codebooks (the random real-size test checkpoint, tests/.cache):
  median `encode_step` ms per 80 ms frame.
Real-time factor = (Mimi frame + LM step) / 80 ms, for the 1b when it ran, else the fixture.

Usage: python benchmarks/stt.py [--only fixture|1b|mimi] [--steps N] [--long-steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from moshi_mlx.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()

import mlx.core as mx  # noqa: E402
from lm_step import memory_figures, random_quantized_lm  # noqa: E402

from moshi_mlx.generate import SttGen  # noqa: E402
from moshi_mlx.models.lm import load_lm  # noqa: E402
from moshi_mlx.models.lm_config import LmConfig, SttConfig  # noqa: E402

FRAME_MS = 80.0


def stt_1b_config() -> LmConfig:
    """stt-1b-en_fr as described in the research notes (shared/research/stt.md)."""
    return LmConfig(dim=2048, text_card=8000, n_q=32, dep_q=0, card=2048, num_heads=16,
                    num_layers=16, hidden_scale=4.125, context=750, max_period=100000,
                    delays=(0,) * 33, extra_heads_num_heads=4, extra_heads_dim=6,
                    stt_config=SttConfig(0.5, 0.0))


def median_step_ms(gen: SttGen, codes: np.ndarray, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        gen.step(codes[:, :, i % codes.shape[2]])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return round(1e3 * statistics.median(times), 3)


def bench_fixture(steps: int, long_steps: int) -> dict:
    stt = ROOT / "tests" / "fixtures" / "stt"
    lm = load_lm(stt / "stt_pytorch.safetensors", config=stt / "stt_config.json",
                 dtype=mx.float32)
    with np.load(stt / "stt_golden.npz") as golden:
        codes = golden["codes_v1"][None].astype(np.int32)
    report = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        gen = SttGen(lm, compile=compiled)
        report[f"{name}_step_ms"] = median_step_ms(gen, codes, warmup=5, steps=steps)
    gen = SttGen(lm)
    active = {}
    for i in range(long_steps):
        gen.step(codes[:, :, i % codes.shape[2]])
        if i + 1 in (2 * lm.cfg.context, long_steps):
            active[i + 1] = mx.get_active_memory()
    report["active_memory_bytes_by_step"] = {str(k): v for k, v in active.items()}
    report["memory_growth_bytes"] = active[long_steps] - active[2 * lm.cfg.context]
    return report


def bench_1b(steps: int) -> dict:
    start = time.perf_counter()
    lm = random_quantized_lm(stt_1b_config(), 4, mx.float32)
    build_s = time.perf_counter() - start
    mx.reset_peak_memory()
    codes = np.random.default_rng(0).integers(0, 2048, size=(1, 32, 16)).astype(np.int32)
    report = {"build_s": round(build_s, 1),
              "step_ms": median_step_ms(SttGen(lm), codes, warmup=2, steps=steps)}
    return report | memory_figures()


def bench_mimi(frames: int) -> dict:
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.models.mimi import load_mimi

    path = ROOT / "tests" / ".cache" / "mimi_random_v2.safetensors"
    if not path.is_file():
        return {"skipped": f"{path} missing (run the STT tests once to make it)"}
    mimi = load_mimi(path, num_codebooks=32)
    pcm = read_audio(ROOT / "tests" / "fixtures" / "speech.wav")
    times = []
    for f in range(frames):
        start = time.perf_counter()
        mimi.encode_step(pcm[None, None, f * 1920:(f + 1) * 1920])
        if f >= 2:
            times.append(time.perf_counter() - start)
    return {"encode_frame_ms": round(1e3 * statistics.median(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["fixture", "1b", "mimi"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--long-steps", type=int, default=2000)
    args = parser.parse_args()
    report: dict = {"mlx": mx.__version__, "device": str(mx.default_device()),
                    "blas": blas_in_use()}
    if args.only in (None, "fixture"):
        report["fixture_f32"] = bench_fixture(args.steps or 100, args.long_steps)
    if args.only in (None, "mimi"):
        report["mimi_32_codebooks"] = bench_mimi(args.steps or 20)
    if args.only in (None, "1b"):
        report["stt_1b_q4_f32"] = bench_1b(args.steps or 5)
    mimi_ms = report.get("mimi_32_codebooks", {}).get("encode_frame_ms")
    lm_ms = report.get("stt_1b_q4_f32", {}).get("step_ms") or \
        report.get("fixture_f32", {}).get("compiled_step_ms")
    if mimi_ms is not None and lm_ms is not None:
        report["real_time_factor"] = round((mimi_ms + lm_ms) / FRAME_MS, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
