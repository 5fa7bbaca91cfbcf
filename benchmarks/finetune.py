"""Benchmark CSM LoRA fine-tuning: training frames per second and peak memory.

Models: `fixture` (the tiny reference CSM of tests/fixtures/csm, float32) and `1b` (the csm-1b
shapes with random weights, written once under --workdir by benchmarks/tts.py's
`write_random_1b`, loaded with -q as `moshi-finetune csm -q` loads it: QLoRA on q4 by
default). The data are seeded random conversations (one text turn, then --frames Mimi frames
of codes), as `moshi_mlx.training.csm_data` builds them; LoRA with mlx-lm's defaults (rank 8,
scale 20) on the last --num-layers layers of the backbone and of the depth decoder; Adam. Each
step is timed alone (`trainer.train` reporting every step); frames_per_s is the median over
the steps after the first (labelled codebook-0 targets: audio frames and end-of-audio rows),
peak_memory_gb MLX's peak over the run (weights included).

Prints one JSON object. Not compared here yet: senstella/csm-mlx's LoRA (its own venv from a
fetched snapshot) and the Moshi 7B-shaped q4 QLoRA step (Moshi's loss is another helper's
part); the JSON says so. Run it under the heavy-job lock:

    flock /tmp/moshi-heavy.lock python benchmarks/finetune.py [--models fixture,1b] [-q 4] \
        [--steps 5] [--batch-size 1] [--frames 100] [--grad-checkpoint]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "csm"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import moshi_mlx  # noqa: E402,F401  (before MLX: the BLAS set-up)


def conversations(count: int, frames: int, seed: int) -> list:
    import numpy as np

    from moshi_mlx.speech.generate import Segment
    from moshi_mlx.training.csm_data import Conversation

    rng = np.random.default_rng(seed)
    return [Conversation((Segment(i % 2, "Numbers like seven and twelve are spoken slowly.",
                                  codes=rng.integers(0, 2048, (32, frames)).astype(np.int32)),),
                         f"random conversation {i}") for i in range(count)]


def run(label: str, weights: Path, quantize: int | None, args: argparse.Namespace) -> dict:
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.speech.generate import load_tokenizer
    from moshi_mlx.training.csm_data import example_of, training_batches
    from moshi_mlx.training.csm_lora import csm_lora_paths
    from moshi_mlx.training.csm_loss import csm_loss
    from moshi_mlx.training.lora import apply_lora, trainable_count
    from moshi_mlx.training.trainer import TrainingSettings, train

    mx.random.seed(args.seed)
    model = load_csm(weights, quantize=quantize, cpu_threads=1, float_decoder_on_cpu=False)
    tokenizer = load_tokenizer(FIXTURES / "tokenizer.json")
    examples = [example_of(tokenizer, c) for c in
                conversations(args.batch_size, args.frames, args.seed)]
    apply_lora(model, csm_lora_paths(model, args.num_layers))
    mx.reset_peak_memory()
    result = train(
        model, lambda m, b: csm_loss(m, b, checkpoint=args.grad_checkpoint),
        training_batches(examples, args.batch_size, np.random.default_rng(args.seed)),
        TrainingSettings(iters=args.steps, learning_rate=1e-5, steps_per_report=1,
                         save_every=args.steps + 1), save=lambda step: None,
        report=lambda line: print(f"{label}: {line}", file=sys.stderr))
    speeds = [h["frames_per_s"] for h in result.history if "frames_per_s" in h][1:]
    return {"quantize": quantize, "trainable_parameters": trainable_count(model),
            "frames_per_step": sum(int((e.labels[:, 0] != -100).sum()) for e in examples),
            "frames_per_s": statistics.median(speeds) if speeds else None,
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "steps": args.steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fixture", help="fixture and/or 1b, comma-separated")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), default=4,
                   help="the 1b model's base quantization (default 4: QLoRA)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--frames", type=int, default=100, help="audio frames per conversation")
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/moshi_mlx_bench"))
    args = p.parse_args()
    import mlx.core as mx

    out: dict = {"machine": platform.machine(), "mlx": mx.__version__,
                 "device": str(mx.default_device()), "batch_size": args.batch_size,
                 "frames": args.frames, "grad_checkpoint": args.grad_checkpoint,
                 "csm_mlx": "not run (its venv is not set up here)",
                 "moshi_7b_qlora": "not run (Moshi's loss is not in this benchmark yet)"}
    for label in args.models.split(","):
        if label == "fixture":
            out[label] = run(label, FIXTURES / "sesame", None, args)
        elif label == "1b":
            from tts import write_random_1b

            folder = write_random_1b(args.workdir / "csm-1b-random")
            out[label] = run(label, folder, args.quantize, args)
        else:
            raise SystemExit(f"unknown model {label!r} (fixture, 1b)")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
