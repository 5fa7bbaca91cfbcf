"""Time issue 19's prompt phases against loading their saved state; prints JSON.

Per model: `Engine.set_prompt` with a 50-token text prompt and a 5 s voice prompt (the voice
normalized and Mimi-encoded, then every phase stepped), `save_prompt_state`, and
`load_prompt_state` of that file (read, checked against the model, the conversation reset
onto it), median of a few loads; the goal is a load under 10% of the phases' time.

- fixture: the tiny test model (tests/fixtures), float32;
- moshi_7b_q4: the real 7B architecture with random q4 weights (benchmarks/lm_step.py's
  builder), float32 activations. Heavy: run it alone,
  `flock /tmp/moshi-heavy.lock python benchmarks/prompt.py`.

Mimi is the tests' real-size random checkpoint (tests/.cache, made by the Mimi tests).

Usage: python benchmarks/prompt.py [--only fixture|7b] [--loads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from moshi_mlx.cli.blas import blas_in_use, load_system_openblas  # noqa: E402

load_system_openblas()  # before MLX loads, as the command-line tools do

import mlx.core as mx  # noqa: E402
from lm_step import random_quantized_lm  # noqa: E402
from mimi_random import ensure_random_mimi  # noqa: E402

from moshi_mlx.conversation.engine import Engine, make_codec  # noqa: E402
from moshi_mlx.conversation.lm_gen import LmGen  # noqa: E402
from moshi_mlx.conversation.prompts import MoshiPrompt, encode_voice  # noqa: E402
from moshi_mlx.loading.models import load_lm  # noqa: E402
from moshi_mlx.loading.text_tokenizer import load_sentencepiece  # noqa: E402
from moshi_mlx.models.lm_config import LmConfig  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TEXT_TOKENS = 50
VOICE_SECONDS = 5.0


def voice() -> np.ndarray:
    with wave.open(str(FIXTURES / "speech.wav")) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
    return pcm[: int(VOICE_SECONDS * 24000)]


def text_of(tokens: int, tokenizer) -> str:
    """A text the tokenizer cuts into exactly `tokens` tokens."""
    words = "we talk about boats and the sea while the sun goes down a b c d e".split()
    text, count = "", 0
    while count < tokens:
        for i in range(len(words)):
            longer = (text + " " + words[(count + i) % len(words)]).strip()
            if len(tokenizer.encode(longer)) <= tokens:
                text, count = longer, len(tokenizer.encode(longer))
                break
        else:
            raise SystemExit(f"no text of exactly {tokens} tokens")
    return text


def bench(engine: Engine, loads: int) -> dict:
    prompt = MoshiPrompt(text=text_of(TEXT_TOKENS, engine.text_tokenizer), voice_pcm=voice())
    engine.warm_up()  # compiled graphs and buffers, as Engine.from_files does
    start = time.perf_counter()
    encode_voice(prompt.voice_pcm, engine.codec)
    voice_encode_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.set_prompt(prompt)
    phases_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "prompt.safetensors"
        start = time.perf_counter()
        engine.save_prompt_state(path)
        save_s = time.perf_counter() - start
        times = []
        for _ in range(loads):
            start = time.perf_counter()
            engine.load_prompt_state(path)
            mx.eval([c.keys for c in engine.lm_gen.state.caches if c.keys is not None])
            times.append(time.perf_counter() - start)
        size_mb = path.stat().st_size / 2**20
    load_s = statistics.median(times)
    return {
        "phases": [list(p) for p in engine.prompt_description["phases"]],
        "steps": int(engine.lm_gen.state.steps),
        "phases_s": round(phases_s, 3),
        "of_which_voice_encode_s": round(voice_encode_s, 3),
        "save_s": round(save_s, 3),
        "load_s": round(load_s, 4),
        "load_over_phases": round(load_s / phases_s, 4),
        "state_file_mb": round(size_mb, 2),
    }


def engine_for(lm, codec, tokenizer) -> Engine:
    return Engine(codec, LmGen(lm, seed=0), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["fixture", "7b"], default=None)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    report: dict = {"mlx": mx.__version__, "device": str(mx.default_device()),
                    "blas": blas_in_use(), "text_tokens": TEXT_TOKENS,
                    "voice_seconds": VOICE_SECONDS}
    codec = make_codec(ensure_random_mimi(ROOT / "tests" / ".cache", FIXTURES))
    tokenizer = load_sentencepiece(FIXTURES / "tokenizer.model")
    if args.only in (None, "fixture"):
        lm = load_lm(FIXTURES / "lm_pytorch.safetensors", config=FIXTURES / "lm_config.json",
                     dtype=mx.float32)
        report["fixture_float32"] = bench(engine_for(lm, codec, tokenizer), args.loads)
    if args.only in (None, "7b"):
        start = time.perf_counter()
        lm = random_quantized_lm(LmConfig.moshi_7b(), 4, mx.float32)
        report["moshi_7b_q4_float32"] = {"build_s": round(time.perf_counter() - start, 1)} \
            | bench(engine_for(lm, codec, tokenizer), max(1, args.loads // 2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
