"""mlx-audio's Sesame CSM as a benchmark worker, run by benchmarks/tts.py in mlx-audio's own
virtual environment (never imported by moshi_mlx).

Only its hub downloads are replaced by local files: the Mimi checkpoint (`--mimi`) and the
Llama-3 tokenizer (a folder holding `--tokenizer` with a minimal tokenizer_config.json). The
model is mlx-audio's own `Model`, built from the Sesame config.json (the fixture's flavors are
given in mlx-audio's transformers-style config keys, which it supports, since its flavor table
knows only the real sizes), loaded from the Sesame-layout file through its `sanitize`, and for
-q quantized as mlx-audio's converter does (group 64, every layer with `to_quantized` whose
input size divides by 64, Mimi excluded). Generation is its `Model.generate` with
voice_match=False (Sesame's prompt), the context turn as audio (encoded by its Mimi), sampling
0.9 / top-k 50, and stream=True every frame, so each frame is decoded by its streaming Mimi
decoder as it comes.

Protocol: prints `ready {json}` after loading and a warm-up, then answers each `run` line on
stdin with one JSON line; `quit` ends.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def fixture_config(config: dict, flavors: dict) -> dict:
    """The fixture's torchtune flavors in the transformers-style keys mlx-audio reads."""
    backbone, decoder = flavors[config["backbone_flavor"]], flavors[config["decoder_flavor"]]
    rope = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"}

    def llama(f: dict) -> dict:
        return {"num_hidden_layers": f["num_layers"], "num_attention_heads": f["num_heads"],
                "num_key_value_heads": f["num_kv_heads"],
                "head_dim": f["embed_dim"] // f["num_heads"], "hidden_size": f["embed_dim"],
                "intermediate_size": f["intermediate_dim"], "rms_norm_eps": f["norm_eps"],
                "max_position_embeddings": f["max_seq_len"], "attention_bias": False,
                "mlp_bias": False, "rope_theta": f["rope_base"], "rope_scaling": rope}

    depth = {**llama(decoder), "attention_dropout": 0.0, "backbone_hidden_size":
             backbone["embed_dim"], "hidden_act": "silu", "initializer_range": 0.02,
             "model_type": "csm_depth_decoder_model", "num_codebooks":
             config["audio_num_codebooks"], "use_cache": True, "vocab_size":
             config["audio_vocab_size"]}
    return {**config, **llama(backbone), "depth_decoder_config": depth}


def use_local_downloads(tokenizer: str | Path, mimi: str | Path) -> None:
    """mlx-audio's two hub downloads, pointed at local files: the Mimi checkpoint, and a
    folder holding the Llama-3 `tokenizer.json` with a minimal tokenizer_config.json."""
    import mlx_audio.codec.models.mimi.mimi as mimi_module
    import mlx_audio.tts.models.sesame.sesame as sesame

    mimi_module.hf_hub_download = lambda repo_id, filename, **kw: str(mimi)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="mlxaudio-tokenizer-"))
    (tokenizer_dir / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    sesame.TOKENIZER_REPO = str(tokenizer_dir)


def build(args: argparse.Namespace):
    import mlx_audio.tts.models.sesame.sesame as sesame

    use_local_downloads(args.tokenizer, args.mimi)

    folder = Path(args.weights)
    config = json.loads((folder / "config.json").read_text())
    if (folder / "flavors.json").is_file():
        config = fixture_config(config, json.loads((folder / "flavors.json").read_text()))
    config["voice_match"] = False
    model = sesame.Model(config)
    weights = model.sanitize(mx.load(str(folder / "model.safetensors")))
    expected = {k for k, _ in nn.utils.tree_flatten(model.model.parameters())}
    expected = {"model." + k for k in expected}
    if set(weights) != expected:
        raise SystemExit(f"weights do not match mlx-audio's model: "
                         f"{sorted(set(weights) ^ expected)[:4]}")
    model.load_weights(list(weights.items()), strict=False)
    del weights
    if args.quantize:
        def convertible(path: str, module: nn.Module) -> bool:
            return hasattr(module, "to_quantized") and module.weight.shape[-1] % 64 == 0

        nn.quantize(model.model, 64, args.quantize, class_predicate=convertible)
    mx.eval(model.parameters())
    return model, sesame


def run(model, sesame, args: argparse.Namespace, frames: int) -> dict:
    from mlx_audio.lm.sample_utils import make_sampler

    clip = np.load(args.context_npy)  # 24 kHz mono float32
    context = [sesame.Segment(speaker=1, text=args.context_text, audio=mx.array(clip))]
    frame_times: list[float] = []
    generate_frame = model.model.generate_frame

    def timed(*a, **kw):  # the loop evaluates the frame right after; evaluating here is the same
        t0 = time.perf_counter()
        out = generate_frame(*a, **kw)
        mx.eval(out)
        frame_times.append(time.perf_counter() - t0)
        return out

    model.model.generate_frame = timed
    mx.random.seed(0)
    mx.clear_cache()
    mx.reset_peak_memory()
    audio_stamps, samples = [], 0
    start = time.perf_counter()
    try:
        for result in model.generate(text=args.text, speaker=1, context=context,
                                     sampler=make_sampler(temp=0.9, top_k=50),
                                     max_audio_length_ms=frames * 80, stream=True,
                                     streaming_interval=0.1, voice_match=False,
                                     split_pattern=None):
            if result.samples:
                audio_stamps.append(time.perf_counter())
                samples += result.samples
    finally:
        model.model.generate_frame = generate_frame
    steps = np.diff([start, *audio_stamps])
    return {
        "frames": len(frame_times),
        "audio_chunks": len(audio_stamps),
        "audio_s": samples / 24000,
        "time_to_first_audio_s": float(steps[0]) if len(steps) else None,
        "frame_s": [float(t) for t in frame_times[1:]],  # after the first (prefill) frame
        "frame_with_audio_s": [float(t) for t in steps[1:]],
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="Sesame-layout folder")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--mimi", required=True)
    parser.add_argument("--context-npy", required=True, help="context audio, 24 kHz float32")
    parser.add_argument("--context-text", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("-q", "--quantize", type=int, default=0)
    args = parser.parse_args()
    from importlib.metadata import version

    t0 = time.perf_counter()
    model, sesame = build(args)
    load_s = time.perf_counter() - t0
    load_peak = mx.get_peak_memory()
    run(model, sesame, args, 2)  # warm-up
    blas = "openblas" if "libopenblas" in Path("/proc/self/maps").read_text() else "bundled"
    print("ready " + json.dumps({"blas": blas,
        "load_s": load_s, "mlx": mx.__version__, "mlx_audio": version("mlx-audio"),
        "weights_memory_gb": mx.get_active_memory() / 1e9,
        "load_peak_memory_gb": load_peak / 1e9}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            result = run(model, sesame, args, args.frames)
            result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            print(json.dumps(result), flush=True)
        elif line.strip() == "quit":
            break


if __name__ == "__main__":
    main()
