"""Row-split linear layers: one layer's matmul spread over several CPU threads.

MLX's CPU backend runs the ops of a stream on that stream's own thread, and its quantized
matmul (and float matmul with the reference BLAS of the Linux wheel) uses one core. Splitting
a layer's output rows into blocks, each on its own CPU stream, computes the blocks at the same
time. For a quantized layer each output element is the same dot product over the same inputs
in the same order, so results are bit-identical to the unsplit layer. A float layer's row
blocks go to BLAS as smaller products, which an optimised BLAS (OpenBLAS) may block and sum in
another order: those agree to float32 rounding, not bit for bit. On the GPU this only adds
overhead: use it when the model runs on the CPU.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Below this many weight elements a layer is fast enough that splitting only adds the
# cross-thread hand-off (tens of microseconds).
DEFAULT_MIN_WEIGHTS = 1 << 20


def default_cpu_threads() -> int:
    """Threads worth splitting over: the cores, when MLX computes on the CPU; else 1."""
    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


_thread = threading.local()


def thread_cpu_streams(count: int) -> list[mx.Stream]:
    """`count` CPU streams of the calling thread, made once per thread (MLX streams belong to
    the thread that made them: another thread cannot run ops on them)."""
    streams: list[mx.Stream] = getattr(_thread, "cpu_streams", [])
    while len(streams) < count:
        streams.append(mx.new_stream(mx.cpu))
    _thread.cpu_streams = streams
    return streams[:count]


# Float dtypes narrower than float32 that a model may keep as stored and widen where used.
NARROW_FLOATS = (mx.bfloat16, mx.float16)


def widened(weight: mx.array, dtype: mx.Dtype, stream: mx.Stream | None = None) -> mx.array:
    """A float weight stored narrower than float32 activations (bf16 / f16, kept so to save
    memory) as float32, converted whole before it is transposed for the product: MLX would
    otherwise widen the transposed operand, a strided copy several times slower. Exact (every
    bf16 and f16 value is a float32); any other weight is returned as it is."""
    if dtype == mx.float32 and weight.dtype in NARROW_FLOATS:
        return mx.astype(weight, dtype, stream=stream)
    return weight


def quantization_mode(layer: nn.QuantizedLinear) -> dict[str, str]:
    """The `mode=` keyword of MLX's quantize ops for this layer (MLX >= 0.29 layers carry a
    mode; older MLX has neither the attribute nor the keyword)."""
    return {"mode": layer.mode} if hasattr(layer, "mode") else {}


def dequantized_weight(layer: nn.QuantizedLinear, dtype: mx.Dtype,
                       packed: tuple[mx.array, mx.array, mx.array] | None = None) -> mx.array:
    """The layer's weight as floats of `dtype` (packed: its weight, scales, biases as given),
    dequantized from float32 scales and biases."""
    weight, scales, biases = packed or (layer.weight, layer.scales, layer.biases)
    return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                         layer.group_size, layer.bits, **quantization_mode(layer)).astype(dtype)


class _RowSplit:
    """Shared by the two split classes: the blocks of the calling thread, rebuilt when the
    weights change."""

    def _blocks(self) -> list[tuple[mx.Stream, dict[str, mx.array]]]:
        weight = self["weight"]
        local = self.__dict__["_split_local"]
        cache = getattr(local, "blocks", None)
        if cache is None or cache[0] is not weight:
            streams = thread_cpu_streams(self.__dict__["_split_count"])
            names = [n for n in ("weight", "scales", "biases", "bias") if n in self]
            bounds = np.linspace(0, weight.shape[0], len(streams) + 1).round().astype(int)
            blocks = [
                (stream, {n: self[n][start:stop] for n in names})
                for stream, start, stop in zip(streams, bounds[:-1], bounds[1:], strict=True)
            ]
            cache = (weight, blocks)
            local.blocks = cache
        return cache[1]

    def _split_call(self, x: mx.array, matmul) -> mx.array:
        outputs = []
        for stream, block in self._blocks():
            y = matmul(x, block, stream)
            if "bias" in block:
                y = mx.add(y, block["bias"], stream=stream)
            outputs.append(y)
        return mx.concatenate(outputs, axis=-1)


class RowSplitLinear(_RowSplit, nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        def matmul(x: mx.array, block: dict[str, mx.array], stream: mx.Stream) -> mx.array:
            return mx.matmul(x, widened(block["weight"], x.dtype, stream).T, stream=stream)

        return self._split_call(x, matmul)


class RowSplitQuantizedLinear(_RowSplit, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        def matmul(x: mx.array, block: dict[str, mx.array], stream: mx.Stream) -> mx.array:
            return mx.quantized_matmul(
                x, block["weight"], scales=block["scales"], biases=block.get("biases"),
                transpose=True, group_size=self.group_size, bits=self.bits, stream=stream,
                **quantization_mode(self),
            )

        return self._split_call(x, matmul)


_SPLIT_CLASS = {nn.Linear: RowSplitLinear, nn.QuantizedLinear: RowSplitQuantizedLinear}


def split_linears(model: nn.Module, threads: int, min_weights: int = DEFAULT_MIN_WEIGHTS
                  ) -> int:
    """Make every Linear / QuantizedLinear of `model` whose weight matrix has at least
    `min_weights` elements (counted unpacked) run as `threads` row blocks on as many CPU
    streams (those of the thread that calls the layer). threads <= 1 undoes it. Parameters,
    their names and values are untouched. Returns how many layers are split."""
    split = 0
    for _, module in model.named_modules():
        plain = _plain_class(module)
        if plain is None:
            continue
        rows, columns = module["weight"].shape
        if plain is nn.QuantizedLinear:
            columns = columns * 32 // module.bits
        if threads > 1 and rows >= threads and rows * columns >= min_weights:
            # The instance keeps its parameters; only the class (its __call__) changes.
            module.__class__ = _SPLIT_CLASS[plain]
            module.__dict__["_split_count"] = threads
            module.__dict__["_split_local"] = threading.local()
            split += 1
        else:
            module.__class__ = plain
    return split


def _plain_class(module: nn.Module) -> type | None:
    for plain, split_class in _SPLIT_CLASS.items():
        if type(module) in (plain, split_class):
            return plain
    return None
