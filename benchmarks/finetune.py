"""Benchmark LoRA fine-tuning: training frames per second and peak memory; prints one JSON object.

Each configuration runs in its own child process, so that max_rss_gb (the process's peak
resident memory, from the OS) is its own; peak_memory_gb is MLX's peak over the training steps
(weights included). frames_per_s: labelled frames per step over the step's time, median over
the steps after the first (which compiles).

Configurations (--models, comma-separated):
- `fixture`: the tiny reference CSM of tests/fixtures/csm (float32), through the library
  (`moshi_mlx.training`: `apply_lora`, `csm_loss`, the shared `train`).
- `1b`: the csm-1b shapes with random weights (float32 Sesame-layout file written once under
  --workdir by benchmarks/tts.py's `write_random_1b`), loaded with -q as `moshi-finetune csm -q`
  loads it: QLoRA on q4 by default. Same path as `fixture`.
- `csm-mlx`: senstella/csm-mlx's LoRA on the csm-1b shapes, same batch and LoRA layers, same
  -q (benchmarks/csmmlx_lora_worker.py, run by --csm-mlx-python); `csm-mlx-fixture`: the same
  on the fixture's sizes, float32. `vs_csm_mlx_1b` / `vs_csm_mlx_fixture` compare them with
  `1b` / `fixture` (ours over theirs). Its venv (csm-mlx is not on PyPI, and its dependency
  Kyutai moshi-mlx pins mlx<0.27: installed without dependencies, so both sides run the same
  MLX; moshi-mlx only serves its Mimi, unused in training):
      python -m venv /work/csmmlxvenv
      /work/csmmlxvenv/bin/pip install "mlx[cpu]==0.32.4" mlx-lm tqdm audiofile audresample \
          huggingface_hub tokenizers transformers sentencepiece
      git -C <csm-mlx checkout> archive HEAD | tar -x -C /tmp/csm-mlx
      /work/csmmlxvenv/bin/pip install --no-deps /tmp/csm-mlx moshi-mlx
- `moshi-7b`: the real `python -m moshi_mlx.finetune moshi -q 4 --grad-checkpoint` on a Moshi
  7B-shaped q4 model with random weights (official MLX layout, written tensor by tensor under
  --workdir by benchmarks/lm_step.py's `write_random_quantized_lm`), one stereo file of
  --moshi-seconds (one chunk) of noise encoded by --mimi, --moshi-steps steps; its figures are
  read from the command's progress lines. Goal: within 16 GB.

CSM data: seeded random conversations (one text turn, then --frames Mimi frames of codes), as
`moshi_mlx.training.csm_data` builds them; LoRA rank 8, scale 20 on the attention and MLP
linears of the last --num-layers layers of the backbone and of the depth decoder; Adam.
Heavy (1b, csm-mlx, moshi-7b): run under the heavy-job lock, one benchmark at a time:

    flock /tmp/moshi-heavy.lock python benchmarks/finetune.py [--models fixture,1b,csm-mlx] \
        [-q 4] [--steps 5] [--batch-size 1] [--frames 100] [--grad-checkpoint]
    flock /tmp/moshi-heavy.lock python benchmarks/finetune.py --models moshi-7b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "csm"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_CSM_MLX_PYTHON = os.environ.get("CSM_MLX_PYTHON", "/work/csmmlxvenv/bin/python")
GOAL_7B_GB = 16.0
CSM_MLX = {"csm-mlx-fixture": "csm_mlx_fixture", "csm-mlx": "csm_mlx_1b"}  # label: JSON key
# a progress line of moshi_mlx.training.trainer.progress_line
PROGRESS = re.compile(r"iter (\d+): train loss ([\d.]+).*, ([\d.]+) frames/s, "
                      r"peak memory ([\d.]+) GB")

import moshi_mlx  # noqa: E402,F401  (before MLX: the BLAS set-up)


def conversations(count: int, frames: int, seed: int) -> list:
    import numpy as np

    from moshi_mlx.speech.generate import Segment
    from moshi_mlx.training.csm_data import Conversation

    rng = np.random.default_rng(seed)
    return [Conversation((Segment(i % 2, "Numbers like seven and twelve are spoken slowly.",
                                  codes=rng.integers(0, 2048, (32, frames)).astype(np.int32)),),
                         f"random conversation {i}") for i in range(count)]


def csm_examples(args: argparse.Namespace) -> list:
    from moshi_mlx.speech.generate import load_tokenizer
    from moshi_mlx.training.csm_data import example_of

    tokenizer = load_tokenizer(FIXTURES / "tokenizer.json")
    return [example_of(tokenizer, c) for c in
            conversations(args.batch_size, args.frames, args.seed)]


def run_csm(label: str, weights: Path, quantize: int | None, args: argparse.Namespace) -> dict:
    """One CSM configuration, in this process (a --worker child)."""
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.training.csm_data import training_batches
    from moshi_mlx.training.csm_lora import csm_lora_paths
    from moshi_mlx.training.csm_loss import csm_loss
    from moshi_mlx.training.lora import apply_lora, trainable_count
    from moshi_mlx.training.trainer import TrainingSettings, train

    mx.random.seed(args.seed)
    model = load_csm(weights, quantize=quantize, cpu_threads=1, float_decoder_on_cpu=False)
    examples = csm_examples(args)
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


def worker(label: str, args: argparse.Namespace) -> dict:
    if label == "fixture":
        return run_csm(label, FIXTURES / "sesame", None, args)
    from tts import write_random_1b

    return run_csm(label, write_random_1b(args.workdir / "csm-1b-random"), args.quantize, args)


# ------------------------------------------------------------------------- child processes
def child(command: list[str], label: str, ours: bool = True) -> tuple[int, str, float]:
    """Run a command (stderr passed through, stdout captured): (exit code, stdout, its own
    peak RSS in GB). ours=False: another project's python, run outside this tree (no
    PYTHONPATH to it: csm-mlx's venv has a moshi_mlx of its own)."""
    print(f"{label}: {' '.join(command)}", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if ours:
        env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT if ours else "/tmp", env=env)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, stdout, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss: KiB on Linux


def last_json(code: int, stdout: str, max_rss_gb: float) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code != 0 or not lines:
        return {"error": f"exited with status {code}", "stdout_tail": stdout[-500:]}
    return json.loads(lines[-1]) | {"max_rss_gb": max_rss_gb}


def ours(label: str, args: argparse.Namespace) -> dict:
    return last_json(*child([sys.executable, __file__, *sys.argv[1:], "--worker", label], label))


def csm_mlx(label: str, args: argparse.Namespace) -> dict | str:
    import numpy as np

    from moshi_mlx.training.csm_data import make_batch

    if not Path(args.csm_mlx_python).is_file():
        return f"not run: no {args.csm_mlx_python} (make csm-mlx's venv: see this script)"
    batch = make_batch(csm_examples(args))
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "csm_batch.npz"
    fixture = label == "csm-mlx-fixture"
    np.savez(path, tokens=np.array(batch.tokens), mask=np.array(batch.mask),
             labels=np.array(batch.labels))
    command = [args.csm_mlx_python, str(ROOT / "benchmarks" / "csmmlx_lora_worker.py"),
               "--batch", str(path), "-q", "0" if fixture else str(args.quantize),
               "--steps", str(args.steps), "--output-dir", str(args.workdir / label)]
    if fixture:
        command += ["--sesame-folder", str(FIXTURES / "sesame")]
    if args.grad_checkpoint:
        command.append("--grad-checkpoint")
    return last_json(*child(command, label, ours=False))


def moshi_7b(args: argparse.Namespace) -> dict:
    import numpy as np
    import soundfile
    from lm_step import write_random_quantized_lm

    from moshi_mlx.models.lm_config import LmConfig

    folder = write_random_quantized_lm(LmConfig.moshi_7b(), 4,
                                       args.workdir / "moshi-7b-random-q4")
    data = args.workdir / "moshi-7b-data"
    data.mkdir(parents=True, exist_ok=True)
    rate, seconds = 24000, args.moshi_seconds
    noise = np.random.default_rng(args.seed).normal(0, 0.1, (int(rate * seconds), 2))
    soundfile.write(str(data / "one.wav"), noise.astype(np.float32), rate, subtype="FLOAT")
    words = [["hello", [0.1, 0.4], "SPEAKER_MAIN"], ["there", [0.5, 0.8], "SPEAKER_MAIN"],
             ["hi", [1.0, 1.3], "SPEAKER_OTHER"]]
    (data / "one.json").write_text(json.dumps({"alignments": words}))
    (data / "data.jsonl").write_text(json.dumps({"path": "one.wav", "duration": seconds}) + "\n")
    command = [sys.executable, "-m", "moshi_mlx.finetune", "moshi",
               "--model", str(folder / "model.safetensors"),
               "--config", str(folder / "config.json"),
               "--tokenizer", str(ROOT / "tests" / "fixtures" / "tokenizer.model"),
               "--mimi-weight", str(args.mimi), "-q", "4", "--grad-checkpoint",
               "--data", str(data / "data.jsonl"), "--duration-sec", str(seconds),
               "--batch-size", "1", "--iters", str(args.moshi_steps),
               "--steps-per-report", "1", "--adapter-path", str(args.workdir / "moshi-7b-adapter")]
    code, stdout, max_rss = child(command, "moshi-7b")
    steps = [m.groups() for m in map(PROGRESS.search, stdout.splitlines()) if m]
    if code != 0 or not steps:
        return {"error": f"exited with status {code}", "stdout_tail": stdout[-500:]}
    peak = max(float(s[3]) for s in steps)
    return {"quantize": 4, "grad_checkpoint": True, "seconds": seconds,
            "frames_per_step": round(seconds * 12.5), "steps": len(steps),
            "losses": [float(s[1]) for s in steps],
            "frames_per_s": float(steps[-1][2]), "peak_memory_gb": peak,
            "max_rss_gb": max_rss, "goal_gb": GOAL_7B_GB,
            "within_goal": max(peak, max_rss) <= GOAL_7B_GB}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="fixture",
                   help="fixture, 1b, csm-mlx-fixture, csm-mlx and/or moshi-7b, "
                        "comma-separated")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8), default=4,
                   help="the 1b model's base quantization (default 4: QLoRA)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--frames", type=int, default=100, help="audio frames per conversation")
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/moshi_mlx_bench"))
    p.add_argument("--csm-mlx-python", default=DEFAULT_CSM_MLX_PYTHON,
                   help="python of a venv with csm-mlx (see above)")
    p.add_argument("--moshi-seconds", type=float, default=10.0,
                   help="the 7B step's chunk (default 10 s: moshi-finetune's duration_sec)")
    p.add_argument("--moshi-steps", type=int, default=1)
    p.add_argument("--mimi", type=Path, default=None,
                   help="Mimi checkpoint for moshi-7b (default: the tests' random real-size one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    labels = args.models.split(",")
    known = ("fixture", "1b", *CSM_MLX, "moshi-7b")
    unknown = sorted(set(labels) - set(known))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)} ({', '.join(known)})")
    import mlx.core as mx

    out: dict = {"machine": platform.machine(), "cpus": os.cpu_count(), "mlx": mx.__version__,
                 "device": str(mx.default_device()), "batch_size": args.batch_size,
                 "frames": args.frames, "grad_checkpoint": args.grad_checkpoint}
    for label in labels:
        if label in ("fixture", "1b"):
            out[label] = ours(label, args)
        elif label in CSM_MLX:
            out[CSM_MLX[label]] = csm_mlx(label, args)
        else:
            if args.mimi is None:
                sys.path.insert(0, str(ROOT / "tests"))
                from mimi_random import ensure_random_mimi

                args.mimi = ensure_random_mimi(ROOT / "tests" / ".cache", FIXTURES.parent)
            out["moshi_7b_qlora"] = moshi_7b(args)
    for ours_label, theirs_label in (("fixture", "csm_mlx_fixture"), ("1b", "csm_mlx_1b")):
        mine, theirs = out.get(ours_label), out.get(theirs_label)
        if isinstance(mine, dict) and isinstance(theirs, dict) and mine.get("frames_per_s") \
                and theirs.get("frames_per_s"):
            out[f"vs_{theirs_label}"] = {
                "frames_per_s_ratio": mine["frames_per_s"] / theirs["frames_per_s"],
                "peak_memory_ratio": mine["peak_memory_gb"] / theirs["peak_memory_gb"],
                "max_rss_ratio": mine["max_rss_gb"] / theirs["max_rss_gb"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
