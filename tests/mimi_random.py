"""A random, real-size Mimi checkpoint in the official PyTorch layout, calibrated so codes are
not degenerate (the recipe of FIXTURES.md):

- Gaussian weights with std 1/sqrt(fan_in); conv biases small;
- LSUV-style: walking the network in order on a speech pool, every conv is rescaled so its
  output has std 1 (decoder output std 0.1);
- LayerNorm gains 1 +- 0.1, biases +- 0.05; layer scales U(0.05, 0.3);
- codebooks level by level from residual vectors of *other* speech (pitch-shifted and
  time-reversed copies of the test clip) + 0.3 sigma noise; cluster_usage U(0.5, 1.5), and
  embedding_sum = vector * cluster_usage.

The calibration forward passes use our own layers (only to pick scales); correctness is judged
against rustymimi, which reads the file independently.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 2
FILENAME = f"mimi_random_v{GENERATOR_VERSION}.safetensors"
FRAME = 1920


def _speech(fixtures: Path) -> np.ndarray:
    import soundfile

    pcm, rate = soundfile.read(str(fixtures / "speech.wav"), dtype="float32")
    assert rate == 24000
    return pcm


def other_speech(fixtures: Path, seconds: float) -> np.ndarray:
    """Speech unlike the test clip: pitch/tempo-shifted and time-reversed pieces of it."""
    import soxr

    pcm = _speech(fixtures)
    higher = soxr.resample(pcm, 24000, 19000)  # played back at 24 kHz: +26% pitch, faster
    lower = soxr.resample(pcm[::-1].copy(), 24000, 29000)  # reversed, lower
    mixed = np.concatenate([higher[48000:], lower[24000:]]).astype(np.float32)
    total = int(seconds * 24000) // FRAME * FRAME
    return mixed[:total]


def _pt_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint with its shape (FIXTURES.md)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, out: int, inp: int, k: int, bias: bool = True) -> None:
        shapes[f"{prefix}.weight"] = (out, inp, k)
        if bias:
            shapes[f"{prefix}.bias"] = (out,)

    enc = [(0, 64, 1, 7), (3, 128, 64, 8), (6, 256, 128, 10), (9, 512, 256, 12),
           (12, 1024, 512, 16), (14, 512, 1024, 3)]
    for i, out, inp, k in enc:
        conv(f"encoder.model.{i}.conv.conv", out, inp, k)
    for i, c in zip((1, 4, 7, 10), (64, 128, 256, 512), strict=True):
        conv(f"encoder.model.{i}.block.1.conv.conv", c // 2, c, 3)
        conv(f"encoder.model.{i}.block.3.conv.conv", c, c // 2, 1)
    conv("decoder.model.0.conv.conv", 1024, 512, 7)
    for i, inp, out, k in ((2, 1024, 512, 16), (5, 512, 256, 12), (8, 256, 128, 10),
                           (11, 128, 64, 8)):
        shapes[f"decoder.model.{i}.convtr.convtr.weight"] = (inp, out, k)
        shapes[f"decoder.model.{i}.convtr.convtr.bias"] = (out,)
    for i, c in zip((3, 6, 9, 12), (512, 256, 128, 64), strict=True):
        conv(f"decoder.model.{i}.block.1.conv.conv", c // 2, c, 3)
        conv(f"decoder.model.{i}.block.3.conv.conv", c, c // 2, 1)
    conv("decoder.model.14.conv.conv", 1, 64, 3)
    for side in ("encoder", "decoder"):
        for layer in range(8):
            p = f"{side}_transformer.transformer.layers.{layer}."
            shapes[p + "self_attn.in_proj_weight"] = (1536, 512)
            shapes[p + "self_attn.out_proj.weight"] = (512, 512)
            shapes[p + "linear1.weight"] = (2048, 512)
            shapes[p + "linear2.weight"] = (512, 2048)
            for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                         "layer_scale_1.scale", "layer_scale_2.scale"):
                shapes[p + name] = (512,)
    shapes["downsample.conv.conv.conv.weight"] = (512, 512, 4)
    shapes["upsample.convtr.convtr.convtr.weight"] = (512, 1, 4)
    for half, levels in (("first", 1), ("rest", 31)):
        p = f"quantizer.rvq_{half}."
        shapes[p + "input_proj.weight"] = (256, 512, 1)
        shapes[p + "output_proj.weight"] = (512, 256, 1)
        for level in range(levels):
            q = f"{p}vq.layers.{level}._codebook."
            shapes[q + "_initialized"] = (1,)
            shapes[q + "cluster_usage"] = (2048,)
            shapes[q + "embedding_sum"] = (2048, 256)
    return shapes


def _initial(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for key, shape in _pt_keys().items():
        name = key.rsplit(".", 1)[-1]
        if key.endswith("convtr.weight"):
            fan_in = shape[0] * shape[2] // 2 if shape[1] > 1 else shape[2] // 2
            value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        elif name == "weight" and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif key.endswith(("norm1.weight", "norm2.weight")):
            value = 1 + rng.uniform(-0.1, 0.1, shape)
        elif key.endswith(("norm1.bias", "norm2.bias")):
            value = rng.uniform(-0.05, 0.05, shape)
        elif name == "scale":
            value = rng.uniform(0.05, 0.3, shape)
        elif name == "bias":
            value = rng.uniform(-0.1, 0.1, shape)
        elif name == "_initialized":
            value = np.ones(shape)
        elif name == "cluster_usage":
            value = rng.uniform(0.5, 1.5, shape)
        else:  # embedding_sum: set during calibration
            value = np.zeros(shape)
        out[key] = value.astype(np.float32)
    return out


def generate(path: Path, fixtures: Path, seed: int = 1234) -> None:
    """Write the calibrated random checkpoint to `path`."""
    import mlx.core as mx
    import mlx.nn as nn
    from safetensors.numpy import save_file

    from moshi_mlx.models.mimi import Mimi, MimiConfig, sanitize

    rng = np.random.default_rng(seed)
    pt = _initial(rng)
    model = Mimi(MimiConfig(num_codebooks=32))
    model.load_weights(list(sanitize({k: mx.array(v) for k, v in pt.items()}).items()))

    def rescale(module, pt_prefix: str, target: float, x: mx.array) -> mx.array:
        """Run `module` on x with fresh state, rescale it so the output std is `target`."""
        y = module(x, module.init_state())
        factor = target / max(float(mx.std(y).item()), 1e-8)
        module_conv = getattr(module, "conv", None) or module.convtr
        inner = getattr(module_conv, "conv", None) or module_conv.convtr
        inner.weight = inner.weight * factor
        pt[pt_prefix + ".weight"] *= factor
        if pt_prefix + ".bias" in pt:
            inner.bias = inner.bias * factor
            pt[pt_prefix + ".bias"] *= factor
        y = y * factor
        mx.eval(y)
        return y

    def run_seanet(side: str, stack, x: mx.array, out_std: float) -> mx.array:
        last = len(stack.model) - 1
        for i, layer in enumerate(stack.model):
            kind = type(layer).__name__
            if kind == "_Elu":
                x = layer(x, None)
            elif kind == "ResidualBlock":
                h = rescale(layer.block[1], f"{side}.model.{i}.block.1.conv.conv", 1.0, nn.elu(x))
                h = rescale(layer.block[3], f"{side}.model.{i}.block.3.conv.conv", 1.0, nn.elu(h))
                x = x + h
            else:
                target = out_std if i == last else 1.0
                tag = "conv.conv" if kind == "ConvLayer" else "convtr.convtr"
                x = rescale(layer, f"{side}.model.{i}.{tag}", target, x)
        return x

    pool = mx.array(other_speech(fixtures, 8.0))[None, :, None]
    # Encoder side.
    x = run_seanet("encoder", model.encoder, pool, 1.0)
    x = model.encoder_transformer(x, model.encoder_transformer.init_state())
    latent = rescale(model.downsample.conv, "downsample.conv.conv.conv", 1.0, x)
    # Codebooks, level by level, from residuals of the pool (+ 0.3 sigma noise).
    for half, rvq in (("first", model.quantizer.rvq_first), ("rest", model.quantizer.rvq_rest)):
        prefix = f"quantizer.rvq_{half}."
        residual = np.asarray(rvq.input_proj(latent)).reshape(-1, 256)
        residual = residual / residual.std()
        pt[prefix + "input_proj.weight"] /= float(np.asarray(rvq.input_proj(latent)).std())
        rvq.input_proj.weight = mx.array(pt[prefix + "input_proj.weight"].transpose(0, 2, 1))
        for level, codebook in enumerate(rvq.codebooks(len(rvq.vq.layers))):
            picks = residual[rng.integers(0, len(residual), 2048)]
            noise = rng.standard_normal(picks.shape) * 0.3 * residual.std()
            vectors = (picks + noise).astype(np.float32)
            key = f"{prefix}vq.layers.{level}._codebook."
            pt[key + "embedding_sum"] = vectors * pt[key + "cluster_usage"][:, None]
            codebook.embedding_sum = mx.array(pt[key + "embedding_sum"])
            codebook.finalize()
            codes = codebook.encode(mx.array(residual))
            residual = residual - np.asarray(codebook.decode(codes))
    model.quantizer.finalize()
    # Decoder side, fed with the 8-codebook reconstruction of the pool.
    codes = model.quantizer.encode(latent, 8)
    quantized = model.quantizer.decode(codes)
    std = float(mx.std(quantized).item())
    for half in ("first", "rest"):
        pt[f"quantizer.rvq_{half}.output_proj.weight"] /= std
    quantized = quantized / std
    x = rescale(model.upsample.convtr, "upsample.convtr.convtr.convtr", 1.0, quantized)
    x = model.decoder_transformer(x, model.decoder_transformer.init_state())
    run_seanet("decoder", model.decoder, x, 0.1)

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in pt.items()},
              str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def ensure_random_mimi(cache_dir: Path, fixtures: Path) -> Path:
    """The cached checkpoint, generated once (under a file lock, safe across processes)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / FILENAME
    if path.is_file():
        return path
    with open(cache_dir / (FILENAME + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            generate(path, fixtures)
    return path
