"""Mimi speed: our MLX Mimi beside rustymimi, same machine, same checkpoint, same speech.

    python benchmarks/mimi.py [--weights FILE] [--frames 30] [--variants matmul,native,bf16]

Prints JSON. The machine is shared, so timings are interleaved: for every frame, each
implementation/variant takes its turn on the same audio, in rotating order, and medians are
reported; the whole-clip passes alternate likewise. Figures:
- stream_encode_ms / stream_decode_ms: median ms per 80 ms frame (encode_step / decode_step,
  after 3 warm-up frames), and stream_ratio_vs_rust: (encode + decode) / rustymimi's;
- whole_encode_rtf / whole_decode_rtf: compute seconds per second of audio over the whole
  12.64 s test clip (< 1 is faster than real time);
- peak_rss_mib (process max RSS) and mlx_peak_mib (MLX allocator), each implementation alone
  in a fresh subprocess streaming 10 frames then encoding/decoding a 4 s clip (whole-clip
  calls are chunked, so longer clips do not need more);
- code_agreement_with_rust / stream_code_agreement_with_rust: share of codes equal to
  rustymimi's (8 codebooks), whole clip / the timed streaming frames.
Variants of ours: "matmul" (convs as matmuls, transposed convs as one matmul + overlap-add;
the default), "native" (mx.conv1d / mx.conv_transpose1d), "bf16" (matmul, bfloat16 weights
and activations).
Without --weights, the tests' random real-size checkpoint is used (generated and cached under
tests/.cache/ when missing).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FRAME = 1920

from moshi_mlx.cli.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()  # before MLX loads, as the command-line tools do


def _speech() -> np.ndarray:
    import soundfile

    pcm, _ = soundfile.read(str(ROOT / "tests" / "fixtures" / "speech.wav"), dtype="float32")
    return pcm


class _Rust:
    name = "rustymimi"

    def __init__(self, weights: str) -> None:
        import rustymimi

        self.tok = rustymimi.Tokenizer(weights, num_codebooks=8)

    def encode_step(self, pcm: np.ndarray) -> np.ndarray:
        return self.tok.encode_step(pcm)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        return self.tok.decode_step(np.ascontiguousarray(codes.astype(np.uint32)))

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        return self.tok.encode(pcm).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.tok.decode(np.ascontiguousarray(codes.astype(np.uint32)))


class _Ours:
    def __init__(self, weights: str, variant: str) -> None:
        import mlx.core as mx

        from moshi_mlx.loading.models import load_mimi
        from moshi_mlx.models.mimi import MimiConfig, MimiStream

        self.name = f"mlx_{variant}"
        # kyutai/mimi's architecture (that of every released Mimi), convs as the variant says
        cfg = MimiConfig(conv_formulation="native" if variant == "native" else "matmul")
        self.mimi = load_mimi(weights, num_codebooks=8, cfg=cfg)
        if variant == "bf16":
            self.mimi.set_dtype(mx.bfloat16)
            self.mimi.quantizer.finalize()
        self.stream = MimiStream(self.mimi)

    def _call(self, fn, *args) -> np.ndarray:
        import mlx.core as mx

        out = fn(*args)
        return np.asarray(out.astype(mx.float32) if out.dtype == mx.bfloat16 else out)

    def encode_step(self, pcm):
        return self._call(self.stream.encode_step, pcm)

    def decode_step(self, codes):
        return self._call(self.stream.decode_step, codes)

    def encode(self, pcm):
        return self._call(self.mimi.encode, pcm).astype(np.int32)

    def decode(self, codes):
        return self._call(self.mimi.decode, codes)


def _peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    divisor = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / divisor


def _make(weights: str, impl: str):
    return _Rust(weights) if impl == "rust" else _Ours(weights, impl)


def _timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _speed(weights: str, impls: list[str], frames: int, whole_all: bool) -> dict:
    models = [_make(weights, impl) for impl in impls]
    pcm = _speech()
    enc = {m.name: [] for m in models}
    dec = {m.name: [] for m in models}
    codes = {m.name: [] for m in models}
    for i in range(frames + 3):
        chunk = np.ascontiguousarray(pcm[None, None, i * FRAME : (i + 1) * FRAME])
        for m in models[i % len(models) :] + models[: i % len(models)]:
            seconds, code = _timed(m.encode_step, chunk)
            enc[m.name].append(seconds)
            codes[m.name].append(code)
    for i in range(frames + 3):
        for m in models[i % len(models) :] + models[: i % len(models)]:
            seconds, _ = _timed(m.decode_step, codes[m.name][i])
            dec[m.name].append(seconds)
    clip_seconds = len(pcm) / 24000
    results: dict[str, dict] = {}
    whole_codes = {}
    for m in models:
        results[m.name] = {
            "stream_encode_ms": 1000 * statistics.median(enc[m.name][3:]),
            "stream_decode_ms": 1000 * statistics.median(dec[m.name][3:]),
        }
        if m.name == "mlx_bf16" and not whole_all:
            continue  # bf16 fails the parity targets: its per-frame figures suffice
        enc_s, whole_codes[m.name] = _timed(m.encode, pcm[None, None])
        dec_s, _ = _timed(m.decode, whole_codes[m.name])
        results[m.name]["whole_encode_rtf"] = enc_s / clip_seconds
        results[m.name]["whole_decode_rtf"] = dec_s / clip_seconds
    rust = results.get("rustymimi")
    for m in models:
        if rust is None or m.name == "rustymimi":
            continue
        ours = results[m.name]
        ours["stream_ratio_vs_rust"] = (ours["stream_encode_ms"] + ours["stream_decode_ms"]) / (
            rust["stream_encode_ms"] + rust["stream_decode_ms"]
        )
        streamed = np.concatenate(codes[m.name], axis=2)
        reference = np.concatenate(codes["rustymimi"], axis=2)
        ours["stream_code_agreement_with_rust"] = float((streamed == reference).mean())
        if m.name in whole_codes:
            ours["code_agreement_with_rust"] = float(
                (whole_codes[m.name] == whole_codes["rustymimi"]).mean()
            )
    return results


def _memory(weights: str, impl: str) -> dict:
    """Runs in a fresh subprocess: stream 10 frames, then a 4 s clip whole."""
    model = _make(weights, impl)
    pcm = _speech()
    for i in range(10):
        chunk = np.ascontiguousarray(pcm[None, None, i * FRAME : (i + 1) * FRAME])
        codes = model.encode_step(chunk)
        model.decode_step(codes)
    clip = pcm[None, None, : 50 * FRAME]
    model.decode(model.encode(clip))
    out = {"peak_rss_mib": _peak_rss_mib()}
    if impl != "rust":
        import mlx.core as mx

        out["mlx_peak_mib"] = mx.get_peak_memory() / 2**20
    return out


def _default_weights() -> str:
    sys.path.insert(0, str(ROOT / "tests"))
    from mimi_random import ensure_random_mimi

    return str(ensure_random_mimi(ROOT / "tests" / ".cache", ROOT / "tests" / "fixtures"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--frames", type=int, default=30, help="streaming frames to time")
    parser.add_argument("--variants", default="matmul,native,bf16")
    parser.add_argument("--whole-all", action="store_true",
                        help="also time whole clips for the bf16 variant")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    weights = args.weights or _default_weights()
    if args.memory_of:
        print(json.dumps(_memory(weights, args.memory_of)))
        return
    impls = ["rust", *args.variants.split(",")]
    results = _speed(weights, impls, args.frames, args.whole_all)
    for impl in impls:
        name = "rustymimi" if impl == "rust" else f"mlx_{impl}"
        cmd = [sys.executable, __file__, "--weights", weights, "--memory-of", impl]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
        results[name].update(json.loads(out.strip().splitlines()[-1]))
    results["setup"] = {
        "weights": weights,
        "frames_timed": args.frames,
        "clip": "tests/fixtures/speech.wav (12.64 s)",
        "blas": blas_in_use(),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
