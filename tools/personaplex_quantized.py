"""Helper of tools/derive_personaplex_golden.py, run in OUR venv (it imports the package):
converts the tiny PersonaPlex checkpoint to a q4 or q8 folder with `weights_convert` and
dumps the folder's weights dequantized in float32 (scales and biases upcast first, as the
Moshi fixture's `torch_f32_deq_*` goldens do), in our (MLX) layout, to an .npz. The golden
tool maps them back to NVIDIA's layout and runs NVIDIA's generator on them.

    /work/main/.venv/bin/python tools/personaplex_quantized.py --weights model.safetensors \
        --config config.json --bits 4 --folder out-q4 --dump q4.npz

Prints the sha256 of the converted model file (the golden stores it; the tests convert again
and check it).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moshi_mlx.loading.quantization import QUANTIZATIONS  # noqa: E402
from weights_convert import convert  # noqa: E402


def dequantized(model_file: Path, bits: int) -> dict[str, np.ndarray]:
    group = QUANTIZATIONS[bits].group_size
    stored = mx.load(str(model_file))
    out: dict[str, np.ndarray] = {}
    for name, value in stored.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and f"{base}.scales" in stored:
            value = mx.dequantize(value, stored[f"{base}.scales"].astype(mx.float32),
                                  stored[f"{base}.biases"].astype(mx.float32), group, bits)
        out[name] = np.array(value.astype(mx.float32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--bits", type=int, choices=(4, 8), required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--dump", type=Path, required=True)
    args = parser.parse_args()
    result = convert(args.folder, input_path=args.weights, config=args.config, bits=args.bits)
    np.savez(args.dump, **dequantized(result.model_file, args.bits))
    print(hashlib.sha256(result.model_file.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
