"""Benchmark the weights converter on a real-size (7B) random PyTorch-layout checkpoint.

Generates the checkpoint tensor by tensor into a temp dir (~15.4 GB bf16 for 7B), runs
`python -m weights_convert` on it for each requested quantization in a child process (wall
time, peak RSS of that process from wait4), records the output sizes, deletes everything and
prints one JSON object. Needs ~15.4 GB + the largest output free on disk (checked first).
Run it under the heavy-job lock: flock /tmp/moshi-heavy.lock python benchmarks/convert.py

    python benchmarks/convert.py [--quantize 8,4] [--config 7b|PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moshi_mlx.cli.blas import load_system_openblas  # noqa: E402

load_system_openblas()  # before MLX loads, as the command-line tools do

import mlx.core as mx  # noqa: E402

from moshi_mlx.loading.models import read_lm_config  # noqa: E402
from moshi_mlx.loading.safetensors import PlannedTensor, SafetensorsStreamWriter  # noqa: E402
from moshi_mlx.models.lm_config import LmConfig  # noqa: E402


def pytorch_layout(cfg: LmConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of an official PyTorch-layout Moshi LM checkpoint for `cfg`."""
    dim, ddim, dep_q = cfg.dim, cfg.depformer_dim, cfg.dep_q
    hidden, dhidden = cfg.hidden_dim, cfg.depformer_hidden_dim
    tensors: list[tuple[str, tuple[int, ...]]] = []
    tensors += [(f"emb.{k}.weight", (cfg.card + 1, dim)) for k in range(cfg.n_q)]
    tensors += [("text_emb.weight", (cfg.text_card + 1, dim)),
                ("text_linear.weight", (cfg.text_card, dim)),
                ("out_norm.alpha", (1, 1, dim))]
    for layer in range(cfg.num_layers):
        p = f"transformer.layers.{layer}"
        tensors += [(f"{p}.self_attn.in_proj_weight", (3 * dim, dim)),
                    (f"{p}.self_attn.out_proj.weight", (dim, dim)),
                    (f"{p}.norm1.alpha", (1, 1, dim)), (f"{p}.norm2.alpha", (1, 1, dim)),
                    (f"{p}.gating.linear_in.weight", (2 * hidden, dim)),
                    (f"{p}.gating.linear_out.weight", (dim, hidden))]
    tensors += [(f"depformer_in.{k}.weight", (ddim, dim)) for k in range(dep_q)]
    tensors += [("depformer_text_emb.weight", (cfg.text_card + 1, ddim))]
    tensors += [(f"depformer_emb.{k}.weight", (cfg.card + 1, ddim)) for k in range(dep_q - 1)]
    tensors += [(f"linears.{k}.weight", (cfg.card, ddim)) for k in range(dep_q)]
    for layer in range(cfg.depformer_num_layers):
        p = f"depformer.layers.{layer}"
        tensors += [(f"{p}.self_attn.in_proj_weight", (dep_q * 3 * ddim, ddim)),
                    (f"{p}.self_attn.out_proj.weight", (dep_q * ddim, ddim)),
                    (f"{p}.norm1.alpha", (1, 1, ddim)), (f"{p}.norm2.alpha", (1, 1, ddim))]
        for k in range(dep_q):
            tensors += [(f"{p}.gating.{k}.linear_in.weight", (2 * dhidden, ddim)),
                        (f"{p}.gating.{k}.linear_out.weight", (ddim, dhidden))]
    return tensors


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> mx.array:
    """Random bf16 values of magnitude 2^-7..2^-4 with random signs, straight from random bits
    (much faster than drawing normals for 7.7 billion values)."""
    bits = np.frombuffer(rng.bytes(math.prod(shape) * 2), dtype=np.uint16)
    bits = (bits & np.uint16(0x81FF)) | np.uint16(0x3C00)
    return mx.array(bits.reshape(shape)).view(mx.bfloat16)


def write_checkpoint(path: Path, layout: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    plan = [PlannedTensor(name, "BF16", shape) for name, shape in layout]
    with open(path, "wb") as f:
        writer = SafetensorsStreamWriter(f, plan, metadata={"format": "pt"})
        for name, shape in layout:
            writer.write(name, random_bf16(rng, shape))
        writer.finish()


def run_converter(source: Path, config: Path, bits: int | None, out: Path) -> dict:
    command = [sys.executable, "-m", "weights_convert", "--input", str(source),
               "--config", str(config), "--out", str(out)]
    if bits is not None:
        command += ["-q", str(bits)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"converter failed ({process.returncode}): {stderr.decode()[-2000:]}")
    del stdout
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "output_bytes": sizes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="8,4",
                        help="comma list of 8, 4, bf16 (default 8,4)")
    parser.add_argument("--config", default="7b", help="'7b' or an LM config.json")
    parser.add_argument("--workdir", default=None, help="where the temp dir goes (default /tmp)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = LmConfig.moshi_7b() if args.config == "7b" else read_lm_config(args.config)
    layout = pytorch_layout(cfg)
    source_bytes = sum(math.prod(shape) * 2 for _, shape in layout)
    largest_name, largest_shape = max(layout, key=lambda item: math.prod(item[1]))
    largest_bytes = math.prod(largest_shape) * 2
    requested = [None if q == "bf16" else int(q) for q in args.quantize.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="moshi-convert-bench-", dir=args.workdir))
    try:
        free = shutil.disk_usage(workdir).free
        needed = source_bytes + (source_bytes if None in requested else source_bytes // 2)
        if free < needed * 1.1:
            raise SystemExit(json.dumps({"error": f"need ~{needed / 1e9:.1f} GB free in "
                                         f"{workdir}, have {free / 1e9:.1f} GB"}))
        config_path = workdir / "config.json"
        config_path.write_text(json.dumps(cfg.to_dict()))
        source = workdir / "model.safetensors"
        start = time.perf_counter()
        write_checkpoint(source, layout, args.seed)
        generate_seconds = time.perf_counter() - start

        results: dict[str, dict] = {}
        for bits in requested:
            name = "bf16" if bits is None else f"q{bits}"
            out = workdir / f"out-{name}"
            result = run_converter(source, config_path, bits, out)
            result["peak_rss_above_largest_tensor_mib"] = round(
                result["peak_rss_mib"] - largest_bytes / 2**20, 1)
            results[name] = result
            shutil.rmtree(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(json.dumps({
        "benchmark": "weights_convert",
        "config": args.config,
        "parameters": sum(math.prod(shape) for _, shape in layout),
        "source_tensors": len(layout),
        "source_bytes": source_bytes,
        "largest_tensor": {"name": largest_name, "shape": list(largest_shape),
                           "bytes": largest_bytes},
        "generate_seconds": round(generate_seconds, 1),
        "conversions": results,
        "mlx": mx.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }, indent=2))


if __name__ == "__main__":
    main()
