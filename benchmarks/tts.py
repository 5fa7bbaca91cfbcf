"""Benchmark CSM side by side: moshi_mlx vs mlx-audio 0.6.2's Sesame CSM, same weights, one run.

Models: `fixture` (the tiny reference model of tests/fixtures/csm, Sesame layout, float32) and
`1b` (the csm-1b shapes with random weights, written once as a Sesame-layout checkpoint in
--1b-dtype, bf16 by default, tensor by tensor, under --workdir; both sides load that file, and
quantize it as they each do on load for each bits of -q: `-q 0,4` runs it unquantized (ours
computing in its CPU default, float32; mlx-audio in the file's dtype) and at q4, in one run).
Both speak the same text after the same context turn given as
audio (tests/fixtures/csm/context_speech.wav, encoded by each side's Mimi with --mimi, the
random real-size Mimi of the tests by default), sampling at temperature 0.9 / top-k 50, every
frame decoded through each side's streaming Mimi decoder as it comes.

Each side is a long-lived worker process (ours: this script with --worker; mlx-audio:
benchmarks/mlxaudio_csm_worker.py run by --mlx-audio-python, its own venv) that loads once and
warms up; the runs then alternate between the two so machine noise hits both. Figures are
medians over the runs:

- per_frame_s: generation of one frame (backbone step + 31 depth steps), after the first, with
  nothing else running (ours: a generation-only pass before the decoded one);
- frame_with_audio_s: one frame generated and decoded to audio, after the first;
- real_time_factor: frame_with_audio_s / 0.08 s (below 1: faster than real time);
- time_to_first_audio_s: context encoding + prefill + first frame + its decoding;
- peak_memory_gb: MLX's peak during a run (weights included); load_peak_memory_gb: MLX's peak
  while loading; max_rss_gb: the process's peak resident memory over its whole life (loading
  included), the figure the memory goal is about.

Prints one JSON object. Run it under the heavy-job lock:

    flock /tmp/moshi-heavy.lock python benchmarks/tts.py [--models fixture,1b] [-q 0,4]

`--batches 1,2,4` instead times our batched generation alone (mlx-audio generates one request
at a time): per_frame_s is one step of a batch of N requests (each a frame), median over the
steps after the first and over the runs; per_request_frame_s divides it by N; `vs_batch_1` is
per_frame_s over batch 1's. Requests alternate between TEXT after the context turn (as codes,
the fixture's) and TEXT alone, so the prompts differ in length; sampling 0.9 / top-k 50, no
Mimi. The model is loaded as `python -m moshi_mlx.tts --batch` loads it (on the CPU, a
quantized depth decoder from float copies).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "csm"
CONTEXT_TEXT = "The quick brown fox jumps over the lazy dog."
TEXT = "Numbers like seven and twelve are spoken slowly."
DEFAULT_MLX_AUDIO_PYTHON = os.environ.get("MLX_AUDIO_PYTHON", "/work/mavenv/bin/python")
FRAME_SECONDS = 0.08

# csm-1b (SesameAILabs/csm FLAVORS llama-1B / llama-100M), for the random checkpoint
CSM_1B = {"backbone": {"layers": 16, "dim": 2048, "heads": 32, "kv_heads": 8, "head_dim": 64,
                       "mlp": 8192},
          "decoder": {"layers": 4, "dim": 1024, "heads": 8, "kv_heads": 2, "head_dim": 128,
                      "mlp": 8192},
          "text_vocab": 128256, "audio_vocab": 2051, "codebooks": 32}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def batch_per_frame(weights: Path, quantize: int, sizes: list[int], frames: int,
                    runs: int) -> dict:
    """Our batched CSM, per generated step, for each batch size (see the docstring)."""
    from moshi_mlx.cli.blas import load_system_openblas

    load_system_openblas()
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.speech.batch import SpeechRequest, stream_batch
    from moshi_mlx.speech.generate import Segment, load_tokenizer

    model = load_csm(weights, quantize=quantize or None, float_decoder_on_cpu=True)  # as --batch
    tokenizer = load_tokenizer(FIXTURES / "tokenizer.json")
    with np.load(FIXTURES / "csm_golden.npz") as golden:
        context = [Segment(1, CONTEXT_TEXT, codes=golden["context_codes"])]
    out: dict = {}
    for size in sizes:
        requests = [SpeechRequest(TEXT, 1, context if i % 2 == 0 else (), frames)
                    for i in range(size)]
        steps: list[float] = []
        for run in range(runs + 1):  # the first run compiles for this batch size
            mx.random.seed(run)
            stream = stream_batch(model, tokenizer, requests, seed=run, stop="eos")
            t = time.perf_counter()
            times = []
            for _ in stream:
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
            if run:
                steps += times[1:]
        per_frame = _median(steps)
        out[f"batch_{size}"] = {"per_frame_s": per_frame,
                                "per_request_frame_s": per_frame / size if per_frame else None,
                                "steps_timed": len(steps)}
    base = out[f"batch_{sizes[0]}"]["per_frame_s"]
    for size in sizes:
        entry = out[f"batch_{size}"]
        entry["vs_batch_1" if sizes[0] == 1 else f"vs_batch_{sizes[0]}"] = \
            entry["per_frame_s"] / base if base else None
    return out


# ---------------------------------------------------------------- the random csm-1b checkpoint
def _sesame_1b_shapes() -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor of the Sesame layout, in file order."""
    c = CSM_1B
    b, d = c["backbone"], c["decoder"]
    out = [("text_embeddings.weight", (c["text_vocab"], b["dim"]), "embedding"),
           ("audio_embeddings.weight", (c["audio_vocab"] * c["codebooks"], b["dim"]),
            "embedding"),
           ("projection.weight", (d["dim"], b["dim"]), "linear"),
           ("codebook0_head.weight", (c["audio_vocab"], b["dim"]), "head"),
           ("audio_head", (c["codebooks"] - 1, d["dim"], c["audio_vocab"]), "head_t")]
    for part, f in (("backbone", b), ("decoder", d)):
        for n in range(f["layers"]):
            p = f"{part}.layers.{n}."
            q, kv = f["heads"] * f["head_dim"], f["kv_heads"] * f["head_dim"]
            out += [(p + "attn.q_proj.weight", (q, f["dim"]), "linear"),
                    (p + "attn.k_proj.weight", (kv, f["dim"]), "linear"),
                    (p + "attn.v_proj.weight", (kv, f["dim"]), "linear"),
                    (p + "attn.output_proj.weight", (f["dim"], q), "linear"),
                    (p + "mlp.w1.weight", (f["mlp"], f["dim"]), "linear"),
                    (p + "mlp.w2.weight", (f["dim"], f["mlp"]), "linear"),
                    (p + "mlp.w3.weight", (f["mlp"], f["dim"]), "linear"),
                    (p + "sa_norm.scale", (f["dim"],), "norm"),
                    (p + "mlp_norm.scale", (f["dim"],), "norm")]
        out.append((f"{part}.norm.scale", (f["dim"],), "norm"))
    return out


STORED_DTYPES = {"f32": ("F32", "float32"), "bf16": ("BF16", "bfloat16")}


def write_random_1b(folder: Path, dtype: str = "f32") -> Path:
    """A csm-1b-shaped Sesame checkpoint with random weights stored in `dtype` (f32: 6.2 GB;
    bf16: 3.1 GB, the f32 file's values rounded), written tensor by tensor so memory stays at
    one tensor; reused when complete."""
    import mlx.core as mx

    from moshi_mlx.loading.safetensors import PlannedTensor, SafetensorsStreamWriter

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "complete"
    if done.is_file():
        return folder
    (folder / "config.json").write_text(json.dumps({
        "backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
        "text_vocab_size": CSM_1B["text_vocab"], "audio_vocab_size": CSM_1B["audio_vocab"],
        "audio_num_codebooks": CSM_1B["codebooks"]}))
    shapes = _sesame_1b_shapes()
    file_dtype, mlx_name = STORED_DTYPES[dtype]
    plan = [PlannedTensor(name, file_dtype, shape) for name, shape, _ in shapes]
    key = mx.random.key(1)
    t0 = time.perf_counter()
    with open(folder / "model.safetensors", "wb") as f:
        writer = SafetensorsStreamWriter(f, plan, metadata={"format": "pt"})
        for name, shape, init in shapes:
            key, sub = mx.random.split(key)
            if init == "norm":
                value = 1 + 0.2 * mx.random.uniform(-1, 1, shape, key=sub)
            else:
                # linears N(0, 1/fan_in); heads scaled so logits have std ~4 (as the fixture)
                fan_in = {"embedding": 1, "linear": shape[-1], "head": shape[-1] / 16,
                          "head_t": shape[-2] / 16}[init]
                value = mx.random.normal(shape, key=sub) / fan_in**0.5
            writer.write(name, value.astype(getattr(mx, mlx_name)))
            del value
        writer.finish()
    done.write_text("ok\n")
    log(f"random csm-1b written to {folder} in {time.perf_counter() - t0:.0f} s")
    return folder


# --------------------------------------------------------------------------- our worker
def our_worker(args: argparse.Namespace) -> None:
    from moshi_mlx.cli.blas import load_system_openblas

    load_system_openblas()  # before MLX loads, as the command-line tools do
    import mlx.core as mx
    import numpy as np

    from moshi_mlx.loading.models import load_csm, load_mimi
    from moshi_mlx.speech.generate import Segment, check_mimi_codes, load_tokenizer, stream_speech

    t0 = time.perf_counter()
    (bits,) = args.quantize  # one per worker
    model = load_csm(args.weights, quantize=bits or None)
    tokenizer = load_tokenizer(args.tokenizer)
    mimi = load_mimi(args.mimi, num_codebooks=32)
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory()
    clip = np.load(args.context_npy)

    def run(frames: int) -> dict:
        mx.random.seed(0)
        mx.clear_cache()
        mx.reset_peak_memory()
        context = [Segment(1, args.context_text, audio=clip)]
        # Generation alone first (as mlx-audio's frames are timed: nothing else running), then
        # the same frames again decoded as they come (Mimi shares the cores with the next
        # backbone step queued behind each frame).
        frame_times = []
        t = time.perf_counter()
        for _ in stream_speech(model, tokenizer, args.text, 1, context, max_frames=frames,
                               seed=0, mimi=mimi, stop="eos"):  # mlx-audio's rule
            frame_times.append(time.perf_counter() - t)
            t = time.perf_counter()
        audio_stamps, samples = [], 0
        start = time.perf_counter()
        stream = iter(stream_speech(model, tokenizer, args.text, 1, context,
                                    max_frames=frames, seed=0, mimi=mimi, stop="eos"))
        state = mimi.new_decoder_state()
        while True:
            try:
                frame = next(stream)
            except StopIteration:
                break
            pcm = np.asarray(mimi.decode_step(check_mimi_codes(frame[None]), state))
            samples += pcm.shape[-1]
            audio_stamps.append(time.perf_counter())
        steps = np.diff([start, *audio_stamps])
        return {"frames": len(frame_times), "audio_s": samples / 24000,
                "time_to_first_audio_s": float(steps[0]) if len(steps) else None,
                "frame_s": frame_times[1:], "frame_with_audio_s": [float(s) for s in steps[1:]],
                "peak_memory_gb": mx.get_peak_memory() / 1e9}

    run(2)  # warm-up
    from moshi_mlx.cli.blas import blas_in_use

    print("ready " + json.dumps({"load_s": load_s, "mlx": mx.__version__, "blas": blas_in_use(),
                                 "weights_memory_gb": mx.get_active_memory() / 1e9,
                                 "load_peak_memory_gb": load_peak / 1e9}),
          flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            result = run(args.frames)
            result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(json.dumps(result), flush=True)
        elif line.strip() == "quit":
            break


# --------------------------------------------------------------------------- the driver
class Worker:
    def __init__(self, name: str, command: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.log_path = name, log_path
        self.ready: dict | None = None
        self.error: str | None = None
        self._log = open(log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, cwd=ROOT, env=env)

    def _fail(self, what: str) -> None:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                 if ln.strip() and "it/s]" not in ln]
        self.error = f"{what}: {lines[-1].strip() if lines else 'no output'}"
        log(f"{self.name}: {self.error}")

    def wait_ready(self) -> bool:
        line = self.proc.stdout.readline()
        if not line.startswith("ready "):
            self._fail("did not start")
            return False
        self.ready = json.loads(line[len("ready "):])
        return True

    def run(self) -> dict | None:
        if self.error:
            return None
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._fail("died")
            return None
        line = self.proc.stdout.readline()
        if not line.startswith("{"):
            self._fail("died during a run")
            return None
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()


def _mlx_audio_env(blas: str) -> dict[str, str]:
    env = dict(os.environ)
    if blas == "openblas":
        from moshi_mlx.cli.blas import find_openblas

        found = find_openblas()
        if found:
            env["LD_PRELOAD"] = found
    return env


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summarize(runs: list[dict], ready: dict | None) -> dict:
    per_frame = [statistics.median(r["frame_s"]) for r in runs if r["frame_s"]]
    with_audio = [statistics.median(r["frame_with_audio_s"]) for r in runs
                  if r["frame_with_audio_s"]]
    out = {
        "runs": len(runs),
        "frames": [r["frames"] for r in runs],
        "per_frame_s": _median(per_frame),
        "frame_with_audio_s": _median(with_audio),
        "real_time_factor": (round(statistics.median(with_audio) / FRAME_SECONDS, 3)
                             if with_audio else None),
        "time_to_first_audio_s": _median([r["time_to_first_audio_s"] for r in runs
                                          if r["time_to_first_audio_s"] is not None]),
        "peak_memory_gb": round(max(r["peak_memory_gb"] for r in runs), 3) if runs else None,
        "max_rss_gb": round(max(r["max_rss_gb"] for r in runs), 3) if runs else None,
        "per_run_per_frame_s": [round(v, 4) for v in per_frame],
    }
    if ready:
        out["load_s"] = round(ready["load_s"], 1)
        out["weights_memory_gb"] = round(ready["weights_memory_gb"], 3)
        if "load_peak_memory_gb" in ready:
            out["load_peak_memory_gb"] = round(ready["load_peak_memory_gb"], 3)
    return out


def compare(args: argparse.Namespace, label: str, weights: Path, frames: int, runs: int,
            quantize: int, context_npy: Path, workdir: Path) -> dict:
    common = ["--weights", str(weights), "--tokenizer", str(FIXTURES / "tokenizer.json"),
              "--mimi", str(args.mimi), "--context-npy", str(context_npy),
              "--context-text", CONTEXT_TEXT, "--text", TEXT, "--frames", str(frames),
              "-q", str(quantize)]
    ours = Worker("moshi_mlx", [sys.executable, __file__, "--worker", *common],
                  workdir / f"{label}.moshi_mlx.log")
    ours.wait_ready()
    theirs: Worker | None = None
    theirs_error = None
    if not Path(args.mlx_audio_python).is_file():
        theirs_error = f"no mlx-audio interpreter at {args.mlx_audio_python} (--mlx-audio-python)"
    else:
        theirs = Worker("mlx_audio", [args.mlx_audio_python,
                                      str(ROOT / "benchmarks" / "mlxaudio_csm_worker.py"),
                                      *common], workdir / f"{label}.mlx_audio.log",
                        env=_mlx_audio_env(args.mlx_audio_blas))
        theirs.wait_ready()
        theirs_error = theirs.error
    results: dict[str, list[dict]] = {"moshi_mlx": [], "mlx_audio": []}
    try:
        for i in range(runs):
            order = [ours, theirs] if i % 2 == 0 else [theirs, ours]
            for worker in order:
                if worker is None:
                    continue
                result = worker.run()
                if result is not None:
                    results[worker.name].append(result)
                    log(f"{label} {worker.name} run {i + 1}: per frame "
                        f"{statistics.median(result['frame_s']):.4f} s, with audio "
                        f"{statistics.median(result['frame_with_audio_s']):.4f} s")
    finally:
        ours.close()
        if theirs is not None:
            theirs.close()
            theirs_error = theirs.error
    entry: dict = {"frames_asked": frames, "quantize": quantize or None}
    if not quantize:
        entry["compute"] = {"moshi_mlx": "its default: float32 on the CPU (bf16 / f16 "
                                         "matrices kept as stored, but the depth decoder's)",
                            "mlx_audio": "the weights' dtype, as loaded"}
    if quantize:
        entry["quantization"] = {
            "moshi_mlx": f"q{quantize} group {32 if quantize == 4 else 64}: backbone and "
                         "decoder linears; embeddings, projection and heads kept as stored",
            "mlx_audio": f"q{quantize} group 64 as its converter: every layer with "
                         "to_quantized whose input size divides by 64 (all linears, embeddings, "
                         "codebook0_head); audio_head and norms kept as loaded (float32)"}
    entry["moshi_mlx"] = (summarize(results["moshi_mlx"], ours.ready) if not ours.error
                          else {"error": ours.error})
    if ours.ready:
        entry["moshi_mlx"]["blas"] = ours.ready["blas"]
    if theirs_error or not results["mlx_audio"]:
        entry["mlx_audio"] = {"error": theirs_error or "no run completed"}
        return entry
    entry["mlx_audio"] = summarize(results["mlx_audio"], theirs.ready)
    entry["mlx_audio"]["version"] = theirs.ready["mlx_audio"]
    entry["mlx_audio"]["blas"] = theirs.ready["blas"]
    a, b = entry["moshi_mlx"], entry["mlx_audio"]
    entry["ratio_ours_over_mlx_audio"] = {
        key: round(a[key] / b[key], 3) for key in
        ("per_frame_s", "frame_with_audio_s", "time_to_first_audio_s", "peak_memory_gb",
         "max_rss_gb", "load_peak_memory_gb")
        if a.get(key) and b.get(key)}
    return entry


def bits_list(text: str) -> list[int]:
    bits = [int(b) for b in text.split(",")]
    if any(b not in (0, 4, 8) for b in bits):
        raise argparse.ArgumentTypeError(f"bits must be 0, 4 or 8, got {text!r}")
    return bits


def random_1b_folder(args: argparse.Namespace) -> Path:
    name = "csm1b-random" if args.dtype_1b == "f32" else f"csm1b-random-{args.dtype_1b}"
    return write_random_1b(args.workdir / name, args.dtype_1b)


def label_1b(args: argparse.Namespace, bits: int) -> str:
    return f"csm1b_random_{args.dtype_1b}" + (f"_q{bits}" if bits else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fixture,1b")
    parser.add_argument("--fixture-frames", type=int, default=24)
    parser.add_argument("--fixture-runs", type=int, default=5)
    parser.add_argument("--1b-frames", dest="frames_1b", type=int, default=6)
    parser.add_argument("--1b-runs", dest="runs_1b", type=int, default=3)
    parser.add_argument("-q", "--quantize", type=bits_list, default=None,
                        help="comma-separated bits for the 1b model on both sides, each a run "
                             "(0: unquantized); default 0,4, and 4 with --batches")
    parser.add_argument("--1b-dtype", dest="dtype_1b", choices=sorted(STORED_DTYPES),
                        default="bf16", help="float dtype of the random csm-1b file")
    parser.add_argument("--mimi", type=Path, default=None,
                        help="Mimi checkpoint (default: the tests' random real-size Mimi)")
    parser.add_argument("--mlx-audio-python", default=DEFAULT_MLX_AUDIO_PYTHON,
                        help="python of a venv with mlx-audio==0.6.2")
    parser.add_argument("--mlx-audio-blas", choices=["openblas", "bundled"], default="openblas",
                        help="openblas: mlx-audio's process gets the same system OpenBLAS as "
                        "ours (LD_PRELOAD), so BLAS makes no difference; bundled: MLX's own")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench"),
                        help="where the random csm-1b checkpoint and worker logs go")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes (e.g. 1,2,4): time our batched "
                             "generation per frame instead of the side-by-side comparison")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--weights", "--tokenizer", "--context-npy", "--context-text", "--text"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        our_worker(args)
        return
    if args.batches:
        from moshi_mlx.cli.blas import load_system_openblas

        load_system_openblas()  # before write_random_1b imports MLX: else its reference BLAS
        sizes = [int(n) for n in args.batches.split(",")]
        results = {"machine": platform.machine(), "cpu_count": os.cpu_count()}
        for name in args.models.split(","):
            if name == "fixture":
                results["fixture_float32"] = batch_per_frame(
                    FIXTURES / "sesame", 0, sizes, args.fixture_frames, args.fixture_runs)
            elif name == "1b":
                folder = random_1b_folder(args)
                for bits in args.quantize or [4]:
                    results[label_1b(args, bits)] = batch_per_frame(
                        folder, bits, sizes, args.frames_1b, args.runs_1b)
            else:
                raise SystemExit(f"unknown model {name!r}")
        print(json.dumps(results, indent=1))
        return
    if args.mimi is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from mimi_random import ensure_random_mimi

        args.mimi = ensure_random_mimi(ROOT / "tests" / ".cache", ROOT / "tests" / "fixtures")
    import numpy as np

    from moshi_mlx.audio.io import read_audio

    args.workdir.mkdir(parents=True, exist_ok=True)
    context_npy = args.workdir / "context.npy"
    np.save(context_npy, read_audio(FIXTURES / "context_speech.wav"))
    results: dict = {"machine": platform.machine(), "cpu_count": os.cpu_count(),
                     "text": TEXT, "context": f"speaker 1, {CONTEXT_TEXT!r}, 3.12 s of audio",
                     "sampling": "temperature 0.9, top-k 50", "mimi": str(args.mimi)}
    for name in args.models.split(","):
        if name == "fixture":
            results["fixture_float32"] = compare(args, "fixture", FIXTURES / "sesame",
                                                 args.fixture_frames, args.fixture_runs, 0,
                                                 context_npy, args.workdir)
        elif name == "1b":
            folder = random_1b_folder(args)
            for bits in args.quantize or [0, 4]:
                label = label_1b(args, bits)
                results[label] = compare(args, label, folder, args.frames_1b, args.runs_1b,
                                         bits, context_npy, args.workdir)
        else:
            raise SystemExit(f"unknown model {name!r}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
