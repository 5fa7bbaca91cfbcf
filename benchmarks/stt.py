"""Kyutai STT speed and memory, ours side by side with the official MLX package; prints JSON.

Side by side (with --official-python, the Python of a venv holding moshi_mlx==0.3.0 and
mlx[cpu]==0.26.5): the same files through `python -m moshi_mlx.stt` (ours) and the official
`python -m moshi_mlx.run_inference --temp 0`, each in its own process, runs alternated so that
machine noise hits both; medians of --runs runs:
- fixture: the tiny STT test model (tests/fixtures/stt) converted by weights_convert to an MLX
  folder (bf16), with the real-size random Mimi (tests/.cache/mimi_random_v2.safetensors), on
  tests/fixtures/speech.wav;
- stt_1b_q4: the stt-1b-en_fr architecture (dim 2048, 16 layers, context 750, 4 VAD heads)
  as a random q4 file in the official MLX layout (written tensor by tensor to a temp folder),
  an 8000-piece tokenizer, on the first --seconds-1b seconds of speech.wav.
Per case: whole-file wall time per audio second (the transcription loop, and the whole process
with loading), per-step LM time, Mimi-32 encode time per frame (ours: our Mimi; official:
rustymimi, what run_inference uses), peak memory (max RSS per process; MLX peak inside the
step workers), and the ratios ours/official.
Ours alone: live latency of `Transcriber` fed 80 ms frames at real-time pace from the file
(from the capture time of a word's last audio frame to its Word event), and memory flatness
over a 1-hour codes stream (45000 steps, tiny model: MLX active memory at start and end).

Usage: python benchmarks/stt.py [--official-python /work/official-venv/bin/python] [--runs 2]
       [--only fixture|1b|live|memory] [--memory-steps 45000] [--seconds-1b 0.5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from moshi_mlx.cli.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()

import mlx.core as mx  # noqa: E402

from moshi_mlx.loading.models import load_lm  # noqa: E402
from moshi_mlx.transcription.stt_gen import SttGen  # noqa: E402

FRAME = 1920
FRAME_MS = 80.0
SAMPLE_RATE = 24000
FIXTURES = ROOT / "tests" / "fixtures"
MIMI = ROOT / "tests" / ".cache" / "mimi_random_v2.safetensors"
SPEECH = FIXTURES / "speech.wav"
GB = 2**30

# stt-1b-en_fr as described in the research notes (shared/research/stt.md); the other keys
# (card, n_q 32, hidden_scale 4.125, 4 VAD heads of 6, stt_config 0.5/0.0) are the fixture's.
STT_1B = {"dim": 2048, "num_heads": 16, "num_layers": 16, "context": 750, "text_card": 8000}


# --------------------------------------------------------------------------- processes


def run_process(cmd: list[str], cwd: Path, env: dict | None = None) -> dict:
    """Run cmd; wall seconds, max RSS of that process (wait4), exit status, output."""
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return {"wall_s": wall, "max_rss_gb": usage.ru_maxrss / 2**20, "rc": proc.returncode,
            "output": text}


def our_env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT)}


def official_env() -> dict:
    """Without PYTHONPATH, so that the official venv imports its own moshi_mlx."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def failure(run: dict) -> str:
    return f"exit {run['rc']}: " + " | ".join(run["output"].strip().splitlines()[-3:])


# --------------------------------------------------------------------------- model folders


def make_fixture_folder(work: Path) -> Path:
    """The tiny PyTorch-layout STT converted to an MLX folder (bf16) by weights_convert."""
    out = work / "fixture"
    stt = FIXTURES / "stt"
    run = run_process([sys.executable, "-m", "weights_convert",
                       "--input", str(stt / "stt_pytorch.safetensors"),
                       "--config", str(stt / "stt_config.json"),
                       "--tokenizer", str(stt / "stt_tokenizer.model"),
                       "--mimi-weight", str(MIMI), "--out", str(out)], work, our_env())
    if run["rc"] != 0:
        raise SystemExit(f"weights_convert failed: {failure(run)}")
    return out


def official_q4_shapes(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of an official MLX q4 STT file (nn.quantize bits 4,
    group 32: every Linear/Embedding weight packed 8 per uint32 plus bf16 scales/biases)."""
    dim, hidden = cfg["dim"], int(cfg["dim"] * 2 * cfg["hidden_scale"] / 3)
    hidden = int(11 * dim / 4) if cfg["hidden_scale"] == 4.125 else hidden
    matrices = {"text_emb": (cfg["text_card"] + 1, dim), "text_linear": (cfg["text_card"], dim)}
    for k in range(cfg["n_q"]):
        matrices[f"audio_embs.{k}"] = (cfg["card"] + 1, dim)
    for k in range(cfg["extra_heads_num_heads"]):
        matrices[f"extra_heads.{k}"] = (cfg["extra_heads_dim"], dim)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {"out_norm.weight": ("bfloat16", (dim,))}
    for layer in range(cfg["num_layers"]):
        prefix = f"transformer.layers.{layer}"
        matrices[f"{prefix}.self_attn.in_proj"] = (3 * dim, dim)
        matrices[f"{prefix}.self_attn.out_proj"] = (dim, dim)
        matrices[f"{prefix}.gating.linear_in"] = (2 * hidden, dim)
        matrices[f"{prefix}.gating.linear_out"] = (dim, hidden)
        for norm in ("norm1", "norm2"):
            shapes[f"{prefix}.{norm}.weight"] = ("bfloat16", (dim,))
    for name, (rows, cols) in matrices.items():
        shapes[f"{name}.weight"] = ("uint32", (rows, cols // 8))
        shapes[f"{name}.scales"] = ("bfloat16", (rows, cols // 32))
        shapes[f"{name}.biases"] = ("bfloat16", (rows, cols // 32))
    return shapes


def write_random_q4(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Random values in that layout, one tensor at a time (memory stays near one tensor)."""
    from moshi_mlx.loading.safetensors import PlannedTensor, SafetensorsStreamWriter

    names = sorted(shapes)
    plan = [PlannedTensor(n, "U32" if shapes[n][0] == "uint32" else "BF16", shapes[n][1])
            for n in names]
    key = mx.random.key(0)
    with open(path, "wb") as f:
        writer = SafetensorsStreamWriter(f, plan, metadata={"format": "mlx"})
        for name in names:
            dtype, shape = shapes[name]
            key, sub = mx.random.split(key)
            if dtype == "uint32":
                value = mx.random.randint(0, 2**31 - 1, shape, key=sub).astype(mx.uint32)
            elif name.endswith(".scales"):
                value = mx.random.uniform(0.002, 0.02, shape, key=sub).astype(mx.bfloat16)
            elif name.endswith(".biases"):
                value = (mx.random.uniform(-0.02, 0.0, shape, key=sub) * 7.5).astype(mx.bfloat16)
            else:
                value = mx.random.uniform(0.8, 1.2, shape, key=sub).astype(mx.bfloat16)
            writer.write(name, value)
        writer.finish()


def make_tokenizer(path: Path, pieces: int) -> None:
    """A sentencepiece model with `pieces` pieces (ids 0 unk = EPAD, 3 pad = PAD, as Kyutai's)."""
    import io
    import random

    import sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(int(pieces * 1.5))]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(pieces * 3)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=pieces, model_type="word",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    path.write_bytes(model.getvalue())


def make_1b_folder(work: Path, fixture: Path) -> Path:
    out = work / "stt_1b_q4"
    out.mkdir()
    cfg = json.loads((fixture / "config.json").read_text()) | STT_1B
    cfg |= {"moshi_name": "model.q4.safetensors", "tokenizer_name": "tokenizer_8000.model",
            "quantization": {"bits": 4, "group_size": 32}, "model_id": {"sig": "random-1b"}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_random_q4(out / "model.q4.safetensors", official_q4_shapes(cfg))
    make_tokenizer(out / "tokenizer_8000.model", cfg["text_card"])
    os.link(fixture / "mimi.safetensors", out / "mimi.safetensors")
    return out


def check_q4_layout() -> None:
    """official_q4_shapes at the fixture's size must give the official q4 manifest."""
    cfg = json.loads((FIXTURES / "stt" / "stt_config.json").read_text())
    manifest = json.loads((FIXTURES / "stt" / "stt_mlx.q4.manifest.json").read_text())
    expected = {n: (t["dtype"], tuple(t["shape"])) for n, t in manifest["tensors"].items()}
    if official_q4_shapes(cfg) != expected:
        raise SystemExit("official_q4_shapes does not reproduce stt_mlx.q4.manifest.json")


# --------------------------------------------------------------------------- the two sides


def audio_seconds(path: Path) -> float:
    import soundfile

    return soundfile.info(str(path)).frames / SAMPLE_RATE


def whole_file_official(python: str, folder: Path, audio: Path, work: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cmd = [python, "-m", "moshi_mlx.run_inference", "--lm-config", str(folder / "config.json"),
           "--moshi-weights", str(folder / cfg["moshi_name"]),
           "--mimi-weights", str(folder / "mimi.safetensors"),
           "--tokenizer", str(folder / cfg["tokenizer_name"]), "--temp", "0", str(audio)]
    run = run_process(cmd, work, official_env())  # cwd outside the repo
    found = re.search(r"steps: (\d+), token per sec: ([0-9.eE+-]+)", run["output"])
    if run["rc"] != 0 or not found:
        return {"error": failure(run)}
    steps, rate = int(found.group(1)), float(found.group(2))
    return {"steps": steps, "loop_s": steps / rate, "process_s": run["wall_s"],
            "max_rss_gb": run["max_rss_gb"]}


def whole_file_ours(folder: Path, audio: Path, work: Path, bits: int | None) -> dict:
    cmd = [sys.executable, "-m", "moshi_mlx.stt", "--hf-repo", str(folder), "--format", "json",
           "-o", str(work / "ours.json"), str(audio)] + (["-q", str(bits)] if bits else [])
    run = run_process(cmd, work, our_env())
    found = re.search(r"real-time factor ([0-9.]+)", run["output"])
    if run["rc"] != 0 or not found:
        return {"error": failure(run)}
    return {"loop_s": float(found.group(1)) * audio_seconds(audio), "process_s": run["wall_s"],
            "max_rss_gb": run["max_rss_gb"]}


def steps_official(python: str, folder: Path, audio: Path, work: Path, steps: int) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cmd = [python, str(ROOT / "benchmarks" / "official_stt_step.py"),
           "--config", str(folder / "config.json"), "--weights", str(folder / cfg["moshi_name"]),
           "--mimi", str(folder / "mimi.safetensors"), "--audio", str(audio),
           "--steps", str(steps), "--warmup", str(min(3, steps))]
    run = run_process(cmd, work, official_env())
    if run["rc"] != 0:
        return {"error": failure(run)}
    return last_json(run["output"]) | {"max_rss_gb": run["max_rss_gb"]}


def steps_ours(folder: Path, audio: Path, work: Path, steps: int, bits: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-steps", str(folder),
           "--audio", str(audio), "--steps", str(steps)] + (["--bits", str(bits)] if bits else [])
    run = run_process(cmd, work, our_env())
    if run["rc"] != 0:
        return {"error": failure(run)}
    return last_json(run["output"]) | {"max_rss_gb": run["max_rss_gb"]}


def worker_steps(folder: Path, audio: Path, steps: int, bits: int | None) -> None:
    """Ours, as the CLI loads it: median SttGen.step (with the host read of the token, as the
    Transcriber does) and our Mimi's encode_step per frame. Prints one JSON line."""
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.loading.hub import model_file
    from moshi_mlx.loading.models import load_mimi

    lm = load_lm(model_file(folder, bits), config=folder / "config.json", quantize=bits)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, size=(1, 32, 16)).astype(np.int32)
    gen = SttGen(lm)
    mx.reset_peak_memory()
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        text, _ = gen.step(codes[:, :, i % codes.shape[2]])
        np.array(text)
        if i >= 3:
            times.append(time.perf_counter() - start)
    report = {"implementation": "ours", "mlx_version": mx.__version__,
              "lm_step_ms": round(1e3 * statistics.median(times), 3),
              "lm_peak_mlx_memory_gb": round(mx.get_peak_memory() / GB, 3)}
    mimi = load_mimi(folder / "mimi.safetensors", num_codebooks=32)
    pcm = read_audio(audio)
    times = []
    state = mimi.new_encoder_state()
    for f in range(min(30, len(pcm) // FRAME)):
        start = time.perf_counter()
        mimi.encode_step(pcm[None, None, f * FRAME:(f + 1) * FRAME], state)
        if f >= 2:
            times.append(time.perf_counter() - start)
    report["mimi_encode_frame_ms"] = round(1e3 * statistics.median(times), 3)
    print(json.dumps(report))


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(statistics.median(values), 4) if values else None


def side_by_side(name: str, folder: Path, audio: Path, work: Path, official: str | None,
                 runs: int, steps: int, bits: int | None) -> dict:
    seconds = audio_seconds(audio)
    sides = ["official", "ours"] if official else ["ours"]
    files: dict[str, list[dict]] = {side: [] for side in sides}
    stepped: dict[str, list[dict]] = {side: [] for side in sides}
    for rep in range(runs):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            print(f"[{name}] run {rep + 1}/{runs}: {side} whole file", file=sys.stderr)
            files[side].append(whole_file_official(official, folder, audio, work)
                               if side == "official" else
                               whole_file_ours(folder, audio, work, bits))
        for side in order:
            print(f"[{name}] run {rep + 1}/{runs}: {side} steps", file=sys.stderr)
            stepped[side].append(steps_official(official, folder, audio, work, steps)
                                 if side == "official" else
                                 steps_ours(folder, audio, work, steps, bits))
    report: dict = {"audio_s": round(seconds, 3), "runs": runs}
    for side in sides:
        errors = [r["error"] for r in files[side] + stepped[side] if "error" in r]
        loop = median_of(files[side], "loop_s")
        process = median_of(files[side], "process_s")
        report[side] = {
            "rtf_loop": None if loop is None else round(loop / seconds, 4),
            "rtf_process": None if process is None else round(process / seconds, 4),
            "loop_s_all": [round(r["loop_s"], 3) for r in files[side] if "loop_s" in r],
            "steps_run": files[side][0].get("steps"),
            "lm_step_ms": median_of(stepped[side], "lm_step_ms"),
            "lm_step_ms_all": [r["lm_step_ms"] for r in stepped[side] if "lm_step_ms" in r],
            "mimi_encode_frame_ms": median_of(stepped[side], "mimi_encode_frame_ms"),
            "max_rss_gb_whole_file": median_of(files[side], "max_rss_gb"),
            "max_rss_gb_step_worker": median_of(stepped[side], "max_rss_gb"),
            "lm_peak_mlx_memory_gb": median_of(stepped[side], "lm_peak_mlx_memory_gb"),
        } | ({"errors": errors} if errors else {})
    if "ours" in report and report["ours"]["steps_run"] is None:
        report["ours"]["steps_run"] = (math.ceil(seconds * 12.5) + math.ceil(0.5 * 12.5) + 1)
    if official:
        ratios = {}
        for key in ("rtf_loop", "rtf_process", "lm_step_ms", "mimi_encode_frame_ms",
                    "max_rss_gb_whole_file"):
            a, b = report["ours"][key], report["official"][key]
            ratios[key] = None if not a or not b else round(a / b, 3)
        report["ours_over_official"] = ratios
    return report


# --------------------------------------------------------------------------- ours alone


def load_fixture_transcriber(folder: Path, with_mimi: bool):
    import sentencepiece

    from moshi_mlx.loading.models import load_mimi
    from moshi_mlx.transcription.transcriber import Transcriber

    lm = load_lm(folder / "model.safetensors", config=folder / "config.json")
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(folder / "stt_tokenizer.model"))
    mimi = load_mimi(folder / "mimi.safetensors", num_codebooks=32) if with_mimi else None
    return Transcriber(lm, tokenizer, mimi)


def bench_live(folder: Path) -> dict:
    """Frames of speech.wav 'captured' every 80 ms (frame f complete at t0 + (f+1)·80 ms) and
    fed when captured (or as soon as the previous one is done); the flush follows the last
    frame at once. Latency of a word: its Word event's arrival minus the capture time of the
    frame holding the word's end (WordEnd time)."""
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.transcription.transcriber import Word, transcript_from_events

    transcriber = load_fixture_transcriber(folder, with_mimi=True)
    pcm = read_audio(SPEECH)
    frames = len(pcm) // FRAME
    transcriber.reset(1)
    transcriber.feed(np.zeros(FRAME * 3, np.float32))  # warm up (compile), then start again
    transcriber.flush()
    transcriber.reset(1)
    stamped: list[tuple[float, object]] = []
    lag, compute = [], []
    t0 = time.perf_counter()
    for f in range(frames):
        captured = t0 + (f + 1) * FRAME_MS / 1e3
        wait = captured - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        fed = time.perf_counter()
        lag.append(fed - captured)
        events = transcriber.feed(pcm[f * FRAME:(f + 1) * FRAME])
        now = time.perf_counter()
        compute.append(now - fed)
        stamped += [(now, e) for e in events]
    events = transcriber.flush()
    now = time.perf_counter()
    stamped += [(now, e) for e in events]
    done = now - (t0 + frames * FRAME_MS / 1e3)
    transcript = transcript_from_events([e for _, e in stamped], transcriber.stream_text(0),
                                        frames * FRAME / SAMPLE_RATE, transcriber.text_time)
    arrivals = [t for t, e in stamped if isinstance(e, Word)]
    latencies = []
    for arrival, word in zip(arrivals, transcript.words, strict=False):
        last_frame = min(frames - 1, max(0, math.ceil(word.end * 12.5) - 1))
        latencies.append(arrival - (t0 + (last_frame + 1) * FRAME_MS / 1e3))
    return {"words": len(latencies),
            "word_latency_ms_median": round(1e3 * statistics.median(latencies), 1)
            if latencies else None,
            "word_latency_ms_max": round(1e3 * max(latencies), 1) if latencies else None,
            "model_text_delay_ms": 1e3 * transcriber.config.audio_delay_seconds,
            "frame_compute_ms_median": round(1e3 * statistics.median(compute), 1),
            "feed_lag_ms_median": round(1e3 * statistics.median(lag), 1),
            "feed_lag_ms_max": round(1e3 * max(lag), 1),
            "end_of_input_to_flushed_ms": round(1e3 * done, 1)}


def bench_memory(folder: Path, steps: int) -> dict:
    """A `steps`-step codes stream (45000 = 1 hour) through the Transcriber, tiny model."""
    transcriber = load_fixture_transcriber(folder, with_mimi=False)
    with np.load(FIXTURES / "stt" / "stt_golden.npz") as golden:
        codes = golden["codes_v1"][None].astype(np.int32)
    transcriber.reset(1)
    start_step = 2 * transcriber.lm.cfg.context
    active = {}
    started = time.perf_counter()
    for i in range(steps):
        transcriber.step_codes(codes[:, :, i % codes.shape[2]])
        if i + 1 in (start_step, steps // 2, steps):
            active[str(i + 1)] = mx.get_active_memory()
    spent = time.perf_counter() - started
    return {"steps": steps, "audio_hours": round(steps / 12.5 / 3600, 3),
            "active_memory_bytes_by_step": active,
            "growth_bytes": active[str(steps)] - active[str(start_step)],
            "step_ms_mean": round(1e3 * spent / steps, 3),
            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


# --------------------------------------------------------------------------- main


def guarded(bench, *args) -> dict:
    """A failing part is reported in the JSON instead of losing the figures of the others."""
    try:
        return bench(*args)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}


def trimmed_audio(work: Path, seconds: float) -> Path:
    import soundfile

    pcm, rate = soundfile.read(str(SPEECH), dtype="int16")
    path = work / f"speech_{seconds:g}s.wav"
    soundfile.write(str(path), pcm[: int(seconds * rate)], rate)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-python", default=os.environ.get("MOSHI_OFFICIAL_PYTHON"),
                        help="python of the venv with moshi_mlx==0.3.0 (default "
                             "$MOSHI_OFFICIAL_PYTHON; without it only ours runs)")
    parser.add_argument("--only", choices=["fixture", "1b", "live", "memory"], action="append")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed LM steps per worker")
    parser.add_argument("--memory-steps", type=int, default=45000)
    parser.add_argument("--seconds-1b", type=float, default=0.5,
                        help="audio of the 1b case (the official script adds 1.5 s of silence)")
    parser.add_argument("--steps-1b", type=int, default=3,
                        help="timed LM steps per 1b worker (an official q4 step takes ~13 s "
                             "on a 2-core CPU)")
    parser.add_argument("--worker-steps", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--audio", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bits", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_steps is not None:
        worker_steps(args.worker_steps, args.audio, args.steps, args.bits)
        return
    if not MIMI.is_file():
        raise SystemExit(f"{MIMI} missing (run the STT tests once to make it)")
    only = set(args.only or ["fixture", "1b", "live", "memory"])
    report: dict = {"mlx": mx.__version__, "device": str(mx.default_device()),
                    "blas": blas_in_use(), "cpus": os.cpu_count(),
                    "official": None}
    if args.official_python:
        probe = ("from importlib.metadata import version as v; "
                 "print('moshi_mlx', v('moshi_mlx'), 'mlx', v('mlx'))")
        run = run_process([args.official_python, "-c", probe], Path("/"), official_env())
        report["official"] = run["output"].strip() if run["rc"] == 0 else failure(run)
    with tempfile.TemporaryDirectory(prefix="stt-bench-") as tmp:
        work = Path(tmp)
        fixture = make_fixture_folder(work)
        if "fixture" in only:
            report["fixture"] = side_by_side("fixture", fixture, SPEECH, work,
                                             args.official_python, args.runs, args.steps, None)
        if "1b" in only:
            check_q4_layout()
            start = time.perf_counter()
            folder = make_1b_folder(work, fixture)
            build_s = time.perf_counter() - start
            report["stt_1b_q4"] = {"file_build_s": round(build_s, 1)} | side_by_side(
                "1b", folder, trimmed_audio(work, args.seconds_1b), work,
                args.official_python, args.runs, args.steps_1b, 4)
        if "memory" in only:
            report["memory_fixture"] = guarded(bench_memory, fixture, args.memory_steps)
        if "live" in only:
            report["live_fixture"] = guarded(bench_live, fixture)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
