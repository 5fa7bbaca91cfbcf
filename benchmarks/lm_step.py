"""Time one streaming Moshi LM step; prints JSON.

Per configuration: median ms of the temporal transformer, of sampling + depformer, of a whole
`LmGen.step` (measured separately, without the profiling sync), and peak MLX memory.

- fixture: the tiny test model (tests/fixtures), bf16, eager vs `mx.compile`d sampling +
  depformer: per-step overhead, the figure that transfers to a Mac.
- moshi_7b_q4 / moshi_7b_q8: the real 7B architecture with random weights, quantized layer by
  layer while being built (peak memory stays near the final size). Heavy: run under
  `flock /tmp/moshi-heavy.lock python benchmarks/lm_step.py --only 7b`.

Usage: python benchmarks/lm_step.py [--only fixture|7b|q4|q8] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from moshi_mlx.cli.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()  # before MLX loads, as the command-line tools do

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from moshi_mlx.conversation.lm_gen import LmGen  # noqa: E402
from moshi_mlx.loading.models import load_lm  # noqa: E402
from moshi_mlx.loading.quantization import (  # noqa: E402
    QUANTIZATIONS,
    apply_quantization,
    quantized_linear_paths,
    stored_as,
)
from moshi_mlx.models import lm as lm_family  # noqa: E402
from moshi_mlx.models.lm import Lm  # noqa: E402
from moshi_mlx.models.lm_config import LmConfig  # noqa: E402
from moshi_mlx.modules.parallel import default_cpu_threads  # noqa: E402


def random_quantized_lm(cfg: LmConfig, bits: int, dtype: mx.Dtype) -> Lm:
    """An Lm with random weights in the layout of the official quantized files (packed uint32
    weights, bf16-valued scales/biases), built tensor by tensor so that peak memory stays near
    the final size. Random packed words are drawn directly: the values do not matter for
    timing, and quantizing 7B float32 weights would take many minutes on these CPUs."""
    model, linears = _quantized_skeleton(cfg, bits)
    built = []
    for name, value in _random_tensors(model, bits):
        if value.dtype != mx.uint32:  # bf16 values, kept as load_lm keeps a file's
            value = stored_as(name, value, dtype, linears)
        mx.eval(value)  # one tensor at a time
        built.append((name, value))
    model.load_weights(built, strict=True)
    mx.eval(model.parameters())
    model.use_cpu_threads(default_cpu_threads())  # as load_lm does
    return model


def write_random_quantized_lm(cfg: LmConfig, bits: int, folder: Path) -> Path:
    """The same random quantized Lm written as an official-layout MLX file (model.safetensors
    and its config.json) tensor by tensor, so memory stays at one tensor; reused when
    complete. The way to measure a command (e.g. moshi-finetune) on a 7B-shaped model."""
    from moshi_mlx.loading.safetensors import PlannedTensor, SafetensorsStreamWriter

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "complete"
    if done.is_file():
        return folder
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, _ = _quantized_skeleton(cfg, bits)
    plan = [PlannedTensor(name, "U32" if a.dtype == mx.uint32 else "BF16", tuple(a.shape))
            for name, a in tree_flatten(model.parameters())]
    with open(folder / "model.safetensors", "wb") as f:
        writer = SafetensorsStreamWriter(f, plan, metadata={"format": "mlx"})
        for name, value in _random_tensors(model, bits):
            writer.write(name, value)
        writer.finish()
    done.write_text("ok\n")
    return folder


def _quantized_skeleton(cfg: LmConfig, bits: int) -> tuple[Lm, set]:
    model = Lm(cfg)  # parameters are lazy: nothing allocated yet
    apply_quantization(model, lm_family, QUANTIZATIONS[bits])
    return model, quantized_linear_paths(model)


def _random_tensors(model: Lm, bits: int):
    """(name, value) of every parameter, in order: packed words uint32, the rest bf16."""
    key = mx.random.key(0)
    for name, array in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if array.dtype == mx.uint32:
            yield name, mx.random.randint(0, 2**31 - 1, array.shape, key=sub).astype(mx.uint32)
            continue
        if name.endswith(".scales"):
            value = mx.random.uniform(0.002, 0.02, array.shape, key=sub)
        elif name.endswith(".biases"):
            value = mx.random.uniform(-0.02, 0.0, array.shape, key=sub) * (2**bits - 1) / 2
        else:  # norm gains
            value = mx.random.uniform(0.8, 1.2, array.shape, key=sub)
        yield name, value.astype(mx.bfloat16)


def time_interleaved(lm: Lm, variants: dict[str, dict], warmup: int, steps: int) -> dict:
    """Median step times of several LmGen variants, their steps interleaved so that a noisy
    shared machine affects them alike. Whole steps (the production path, one host sync) and
    the two halves (one extra sync between them) come from separate generators."""
    cfg = lm.cfg
    codes = np.random.default_rng(0).integers(0, cfg.card, size=(1, cfg.n_q - cfg.dep_q))
    whole = {name: LmGen(lm, seed=0, **kw) for name, kw in variants.items()}
    halves = {name: LmGen(lm, seed=0, **kw) for name, kw in variants.items()}
    for gen in halves.values():
        gen.timings = {}
    times: dict[str, dict[str, list[float]]] = {
        name: {"step": [], "temporal": [], "depformer": []} for name in variants
    }
    for i in range(warmup + steps):
        for name in variants:
            start = time.perf_counter()
            whole[name].step(codes)
            elapsed = time.perf_counter() - start
            halves[name].step(codes)
            if i >= warmup:
                times[name]["step"].append(elapsed)
                times[name]["temporal"].append(halves[name].timings["temporal_s"])
                times[name]["depformer"].append(halves[name].timings["depformer_s"])
    return {
        name: {
            "temporal_ms": round(1e3 * statistics.median(t["temporal"]), 3),
            "depformer_ms": round(1e3 * statistics.median(t["depformer"]), 3),
            "step_ms": round(1e3 * statistics.median(t["step"]), 3),
            "steps_timed": steps,
        }
        for name, t in times.items()
    }


def memory_figures() -> dict[str, float]:
    return {
        "peak_mlx_memory_gb": round(mx.get_peak_memory() / 2**30, 3),
        "active_mlx_memory_gb": round(mx.get_active_memory() / 2**30, 3),
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def bench_fixture(steps: int) -> dict:
    fixtures = ROOT / "tests" / "fixtures"
    lm = load_lm(fixtures / "lm_pytorch.safetensors", config=fixtures / "lm_config.json",
                 dtype=mx.bfloat16)
    mx.reset_peak_memory()
    out = time_interleaved(
        lm, {"eager": {"compile": False}, "compiled": {"compile": True}}, warmup=5, steps=steps
    )
    out["step_speedup"] = round(out["eager"]["step_ms"] / out["compiled"]["step_ms"], 2)
    return out | memory_figures()


def bench_7b(bits: int, steps: int, dtype: mx.Dtype, thread_counts: list[int]) -> dict:
    cfg = LmConfig.moshi_7b()
    start = time.perf_counter()
    lm = random_quantized_lm(cfg, bits, dtype)
    build_s = time.perf_counter() - start
    weights_gb = sum(a.nbytes for _, a in tree_flatten(lm.parameters())) / 2**30
    mx.reset_peak_memory()
    report: dict = {
        "compute_dtype": str(dtype).split(".")[-1],
        "weights_gb": round(weights_gb, 3),
        "build_s": round(build_s, 1),
    }
    for threads in thread_counts:
        split = lm.use_cpu_threads(threads)
        report[f"cpu_threads_{threads}"] = {"layers_split": split} | time_7b_steps(lm, steps)
    return report | memory_figures()


def time_7b_steps(lm: Lm, steps: int) -> dict:
    """A 7B step takes seconds here: time the two halves within the same steps (the one extra
    sync costs nothing at this scale) instead of running every step twice."""
    cfg = lm.cfg
    codes = np.random.default_rng(0).integers(0, cfg.card, size=(1, cfg.n_q - cfg.dep_q))
    gen = LmGen(lm, seed=0)
    gen.timings = {}
    temporal, depformer, whole = [], [], []
    for i in range(1 + steps):
        begin = time.perf_counter()
        gen.step(codes)
        if i >= 1:
            whole.append(time.perf_counter() - begin)
            temporal.append(gen.timings["temporal_s"])
            depformer.append(gen.timings["depformer_s"])
    return {
        "temporal_ms": round(1e3 * statistics.median(temporal), 1),
        "depformer_ms": round(1e3 * statistics.median(depformer), 1),
        "step_ms": round(1e3 * statistics.median(whole), 1),
        "steps_timed": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["fixture", "7b", "q4", "q8"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="7B compute dtype (on MLX CPU, quantized matmuls with bf16 "
                        "activations are ~10x slower than with float32)")
    parser.add_argument("--cpu-threads", type=int, nargs="+", default=None,
                        help="7B: thread counts to time (default: 1 and all cores)")
    args = parser.parse_args()
    report: dict = {"mlx": mx.__version__, "device": str(mx.default_device()),
                    "blas": blas_in_use()}
    thread_counts = args.cpu_threads or sorted({1, default_cpu_threads()})
    if args.only in (None, "fixture"):
        report["fixture_bf16"] = bench_fixture(args.steps or 50)
    for bits in (4, 8):
        if args.only in (None, "7b", f"q{bits}"):
            dtype = getattr(mx, args.dtype)
            report[f"moshi_7b_q{bits}_{args.dtype}"] = bench_7b(
                bits, args.steps or 2, dtype, thread_counts
            )
            mx.clear_cache()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
