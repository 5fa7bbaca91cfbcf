"""Time one Moshi step of Kyutai's official MLX package, for side-by-side comparison.

Run with a Python that has the official package installed (it pins an old MLX, so keep it in a
separate virtual environment, and run from a folder that does not contain our `moshi_mlx`):

    python3 -m venv /tmp/official-venv
    /tmp/official-venv/bin/pip install moshi_mlx==0.3.0 "mlx[cpu]==0.26.5"   # [cpu] on Linux
    cd /tmp && /tmp/official-venv/bin/python /path/to/benchmarks/official_lm_step.py \
        --config tests/fixtures/lm_config.json --bits 4 --steps 20

Prints one JSON object: median ms per step (text + depformer, as `LmGen.step` does them),
peak memory. Weights are random: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

GROUP_SIZE = {4: 32, 8: 64}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="lm config.json; default: the 7B v0.1 preset")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--max-steps", type=int, default=3000,
        help="the generator's step budget (its KV cache size); 3000 = one full context",
    )
    parser.add_argument(
        "--dtype", choices=("bf16", "f32"), default="bf16",
        help="activation dtype (the official package itself uses bf16)",
    )
    args = parser.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from moshi_mlx.utils import sampling

    from moshi_mlx.models import generate, lm

    if Path(lm.__file__).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        sys.exit("error: this imported our moshi_mlx, not the official one; run it from /tmp")

    mx.random.seed(0)
    if args.config is None:
        config = lm.config_v0_1()
    else:
        config = lm.LmConfig.from_config_dict(json.loads(args.config.read_text()))
    model = lm.Lm(config)
    if args.dtype == "bf16":
        model.set_dtype(mx.bfloat16)
    if args.bits is not None:
        nn.quantize(model, bits=args.bits, group_size=GROUP_SIZE[args.bits])
    # Materialise the random weights a few tensors at a time to bound peak memory.
    arrays = [array for _, array in tree_flatten(model.parameters())]
    for start in range(0, len(arrays), 16):
        mx.eval(arrays[start : start + 16])
    model.warmup()

    total = args.warmup + args.steps
    gen = generate.LmGen(
        model=model,
        max_steps=max(args.max_steps, total),
        text_sampler=sampling.Sampler(temp=0.7, top_k=25),
        audio_sampler=sampling.Sampler(temp=0.8, top_k=250),
        check=False,
    )
    user_codes = mx.zeros((1, 8), dtype=mx.int32)
    times = []
    for step in range(total):
        start = time.perf_counter()
        text = gen.step(user_codes)
        audio = gen.last_audio_tokens()
        mx.eval(text)
        if audio is not None:
            mx.eval(audio)
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
    print(
        json.dumps(
            {
                "implementation": "official moshi_mlx",
                "mlx_version": mx.__version__,
                "config": str(args.config) if args.config else "7B v0.1",
                "bits": args.bits,
                "dtype": args.dtype,
                "steps": args.steps,
                "step_ms_median": round(statistics.median(times), 3),
                "step_ms_all": [round(t, 3) for t in times],
                "peak_rss_mib": round(peak_rss_mib(), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
