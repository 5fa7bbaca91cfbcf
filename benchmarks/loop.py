"""Time the conversation loop (Mimi encode -> one Moshi step -> Mimi decode); prints JSON.

Per configuration: the per-frame split (encode, LM step, decode, and the loop's own overhead
around `Engine.process`), late frames, and mic-to-speaker latency.

- fixture: the tiny test LM + a real-size random Mimi (tests/.cache), file mode over the test
  speech, MLX Mimi and rustymimi side by side; this is where per-frame overhead shows.
- devices: the same engine on the virtual sound card (tests/virtual_audio.py), real
  sounddevice streams for a few seconds: callback overhead and measured mic-to-speaker latency
  (skipped with a reason when the virtual card is not available).
- 7b_q4: the real 7B architecture, random 4-bit weights built by `random_quantized_lm` from
  benchmarks/lm_step.py, real-size random Mimi, file mode, 1 warm-up + a few frames. Heavy:
  `flock /tmp/moshi-heavy.lock python benchmarks/loop.py --only 7b`.

Usage: python benchmarks/loop.py [--only fixture|devices|7b] [--frames N] [--dtype float32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moshi_mlx.audio.display import TextDisplay  # noqa: E402
from moshi_mlx.audio.io import read_audio  # noqa: E402
from moshi_mlx.conversation.engine import (  # noqa: E402
    Engine,
    EngineOptions,
    MlxCodec,
    make_codec,
)
from moshi_mlx.modules.sampling import SamplingSettings  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
FRAME = 1920
FRAME_S = FRAME / 24000


def _mimi_path() -> Path:
    from mimi_random import ensure_random_mimi

    return ensure_random_mimi(ROOT / "tests" / ".cache", FIXTURES)


def _median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2) if values else float("nan")


def _peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def time_frames(engine: Engine, speech: np.ndarray, frames: int, warmup: int) -> dict:
    """Run `warmup + frames` frames through `engine.process`, timing each part."""
    split: dict[str, list[float]] = {"encode": [], "step": [], "decode": [], "overhead": []}
    total: list[float] = []
    for i in range(warmup + frames):
        pcm = speech[(i * FRAME) % (len(speech) - FRAME) :][:FRAME]
        start = time.perf_counter()
        out = engine.process(pcm)
        elapsed = time.perf_counter() - start
        if i < warmup:
            continue
        for key in ("encode", "step", "decode"):
            split[key].append(out.timings[key])
        split["overhead"].append(elapsed - sum(out.timings.values()))
        total.append(elapsed)
    late = sum(t > FRAME_S for t in total)
    return {
        "frames_timed": frames,
        "encode_ms": _median_ms(split["encode"]),
        "step_ms": _median_ms(split["step"]),
        "decode_ms": _median_ms(split["decode"]),
        "engine_overhead_ms": round(1e3 * statistics.median(split["overhead"]), 3),
        "frame_ms": _median_ms(total),
        "frame_ms_p95": round(1e3 * float(np.percentile(total, 95)), 2),
        "late_frames": late,
        "realtime_factor": round(statistics.median(total) / FRAME_S, 2),
        # file mode: a frame can be heard at the earliest after its own 80 ms and its compute
        "mic_to_speaker_ms_model": round(1e3 * (FRAME_S + statistics.median(total)), 1),
    }


def fixture_engine(backend: str) -> Engine:
    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", _mimi_path(), FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json",
        options=EngineOptions(sampling=SamplingSettings(text_temp=0.0, audio_temp=0.0),
                              mimi_backend=backend),
    )


def bench_fixture(frames: int) -> dict:
    speech = read_audio(FIXTURES / "speech.wav")
    out = {}
    for backend in ("mlx", "rustymimi"):
        out[f"mimi_{backend}"] = time_frames(fixture_engine(backend), speech, frames, warmup=3)
    return out


def bench_devices(seconds: float) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import virtual_audio  # the tests' virtual sound card (PulseAudio null sinks)

    absent = virtual_audio.missing_packages()
    if absent:
        return {"skipped": f"virtual sound card: {' '.join(absent)} missing "
                           "(as root: python tests/virtual_audio.py install)"}
    try:
        started = virtual_audio.start()
    except virtual_audio.VirtualAudioError as exc:
        return {"skipped": f"virtual audio did not start: {exc}"}
    os.environ["PULSE_SERVER"] = virtual_audio.server_address()
    from moshi_mlx.audio.devices import refresh_devices
    from moshi_mlx.audio.duplex import DuplexLoop

    refresh_devices()
    out = {}
    for backend in ("rustymimi", "mlx"):
        engine = fixture_engine(backend)
        feed = subprocess.Popen(["paplay", "--device=virtual_mic_feed",
                                 str(FIXTURES / "speech.wav")])
        display = TextDisplay(out=io.StringIO(), err=io.StringIO(), tty=False)
        loop = DuplexLoop(engine, display=display)
        try:
            stats = loop.run(duration=seconds)
        finally:
            feed.terminate()
        d = stats.to_dict()
        out[f"mimi_{backend}"] = {
            "seconds": seconds,
            "frames": d["frames"],
            "input_frames": loop.input_samples // FRAME,
            "encode_ms": _median_ms(stats.encode),
            "step_ms": _median_ms(stats.step),
            "decode_ms": _median_ms(stats.decode),
            "frame_ms": _median_ms(stats.frame),
            "callback_ms_mean": round(d["callback_ms_mean"], 4),
            "callback_ms_max": round(d["callback_ms_max"], 3),
            "late_frames": d["late_frames"],
            "skipped_input_frames": d["skipped_input_frames"],
            "underrun_frames": d["underrun_frames"],
            "device_latency_ms": round(1e3 * stats.device_latency, 1),
            "mic_to_speaker_ms_median": _median_ms(stats.latency),
            "mic_to_speaker_ms_max": round(d["latency_ms_max"], 1),
        }
    if started:
        virtual_audio.stop()
    return out


def bench_7b(frames: int, dtype_name: str) -> dict:
    import mlx.core as mx
    import sentencepiece
    from lm_step import random_quantized_lm

    from moshi_mlx import LmGen
    from moshi_mlx.models.lm_config import LmConfig
    from moshi_mlx.modules.parallel import default_cpu_threads

    dtype = getattr(mx, dtype_name)
    start = time.perf_counter()
    lm = random_quantized_lm(LmConfig.moshi_7b(), 4, dtype)  # split as load_lm splits
    build_s = time.perf_counter() - start
    codec = make_codec(_mimi_path(), "mlx")
    assert isinstance(codec, MlxCodec)
    gen = LmGen(lm, seed=0)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    engine = Engine(codec, gen, sp)
    speech = read_audio(FIXTURES / "speech.wav")
    result = time_frames(engine, speech, frames, warmup=1)
    return {"compute_dtype": dtype_name, "cpu_threads": default_cpu_threads(),
            "build_s": round(build_s, 1)} | result | {
        "peak_rss_gib": _peak_rss_gib(),
        "mlx_peak_gib": round(mx.get_peak_memory() / 2**30, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["fixture", "devices", "7b"], default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=8.0, help="device run length")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="7B compute dtype (quantized matmuls on MLX CPU are much faster "
                             "with float32 activations)")
    args = parser.parse_args()
    import mlx.core as mx

    report: dict = {"mlx": mx.__version__, "device": str(mx.default_device())}
    if args.only in (None, "fixture"):
        report["fixture"] = bench_fixture(args.frames or 30)
    if args.only in (None, "devices"):
        report["fixture_devices"] = bench_devices(args.seconds)
    if args.only in (None, "7b"):
        report[f"moshi_7b_q4_{args.dtype}"] = bench_7b(args.frames or 3, args.dtype)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
