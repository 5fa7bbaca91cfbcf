"""The `-q` rule, MLX affine quantization of weights (the official MLX files' scheme) and
the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from moshi_mlx.errors import WeightsError
from moshi_mlx.modules.parallel import NARROW_FLOATS, dequantized_weight


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


# The `-q` rule, for every family: the affine quantization of the official MLX files.
QUANTIZATIONS: dict[int, Quantization] = {4: Quantization(4, 32), 8: Quantization(8, 64)}


COMPUTE_DTYPES: dict[str, mx.Dtype] = {"bf16": mx.bfloat16, "f32": mx.float32,
                                       "f16": mx.float16}


def check_quantize(quantize: int | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise WeightsError(f"quantize must be one of {sorted(QUANTIZATIONS)} or None, "
                           f"got {quantize}")


def resolve_dtype(dtype: mx.Dtype | str | None) -> mx.Dtype:
    """The compute dtype: None or "auto" = bf16 on a GPU, float32 on the CPU backend (where
    quantized matmuls with bf16 activations are ~10x slower: benchmarks/lm_step.py)."""
    if dtype is None or dtype == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise WeightsError(f"unknown dtype {dtype!r} (use auto, {', '.join(COMPUTE_DTYPES)})")
        return COMPUTE_DTYPES[dtype]
    if dtype not in COMPUTE_DTYPES.values():
        raise WeightsError(f"unsupported compute dtype {dtype}")
    return dtype


def quantized_linear_paths(model: nn.Module) -> frozenset[str]:
    return frozenset(path for path, module in model.named_modules()
                     if isinstance(module, nn.QuantizedLinear))


def apply_quantization(model: nn.Module, family: ModuleType, q: Quantization) -> None:
    nn.quantize(model, group_size=q.group_size, bits=q.bits,
                class_predicate=lambda path, module: (
                    hasattr(module, "to_quantized") and family.quant_predicate(path, module)))


def dequantize_linears(model: nn.Module, dtype: mx.Dtype | None = None) -> int:
    """Replace every quantized linear of `model` by a float Linear holding its dequantized
    weight (the same values, in `dtype`, by default the dtype of its scales), one layer
    evaluated at a time. Returns how many were replaced."""
    from mlx.utils import tree_unflatten

    replaced = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.QuantizedLinear):
            continue
        weight = dequantized_weight(module, dtype or module.scales.dtype)
        out_dim, in_dim = weight.shape
        linear = nn.Linear(in_dim, out_dim, bias="bias" in module)
        linear.weight = weight
        if "bias" in module:
            linear.bias = module.bias
        mx.eval(linear.parameters())
        model.update_modules(tree_unflatten([(path, linear)]))
        replaced += 1
    return replaced


def quantizable_weights(family: ModuleType, config: Any) -> frozenset[str]:
    """Names of the `X.weight` tensors that -q quantizes, read off the family's model."""
    model = family.Model(config)
    return frozenset(f"{path}.weight" for path, module in model.named_modules()
                     if hasattr(module, "to_quantized") and family.quant_predicate(path, module))


def quantize_tensor(key: str, tensor: mx.array, q: Quantization) -> list[tuple[str, mx.array]]:
    """`X.weight` -> `X.weight` (uint32), `X.scales`, `X.biases`, exactly as the official MLX
    files store them."""
    in_dim = tensor.shape[-1]
    if in_dim % q.group_size:
        raise WeightsError(
            f"tensor {key} has {in_dim} columns, not a multiple of the group size {q.group_size}"
        )
    # On the CPU everywhere: the same bytes on any machine (the official files were made there).
    weight, scales, biases = mx.quantize(tensor, group_size=q.group_size, bits=q.bits,
                                         stream=mx.cpu)
    prefix = key[: -len("weight")]
    return [(key, weight), (prefix + "scales", scales), (prefix + "biases", biases)]


def quantize_tensors(tensors: dict[str, mx.array], quantizable: frozenset[str],
                     q: Quantization) -> dict[str, mx.array]:
    """Quantize the `quantizable` weights of a tensor dict, evaluating one at a time."""
    out: dict[str, mx.array] = {}
    for key, tensor in tensors.items():
        parts = quantize_tensor(key, tensor, q) if key in quantizable else [(key, tensor)]
        mx.eval([array for _, array in parts])
        out.update(parts)
    return out


def detect_quantization(tensors: dict[str, mx.array], plain_shapes: dict[str, tuple[int, ...]],
                        source: str) -> Quantization | None:
    """The quantization of sanitized tensors, from each `X.scales` beside a packed `X.weight`
    and the unquantized shape the model gives X.weight (None when nothing is quantized)."""
    found: set[Quantization] = set()
    for key in tensors:
        if not key.endswith(".scales"):
            continue
        weight_key = key[: -len("scales")] + "weight"
        weight, shape = tensors.get(weight_key), plain_shapes.get(weight_key)
        if weight is None or shape is None or weight.dtype != mx.uint32 or len(shape) != 2:
            raise WeightsError(f"{source}: {key} does not belong to a quantized matrix")
        in_dim, groups = shape[1], tensors[key].shape[-1]
        bits, rem = divmod(weight.shape[-1] * 32, in_dim)
        if rem or groups == 0 or in_dim % groups:
            raise WeightsError(f"{source}: cannot tell the quantization of {weight_key}")
        found.add(Quantization(bits, in_dim // groups))
    if len(found) > 1:
        raise WeightsError(f"{source} mixes quantizations: "
                           + ", ".join(f"{q.bits} bits/group {q.group_size}" for q in found))
    if not found:
        return None
    (quantization,) = found
    if quantization not in QUANTIZATIONS.values():
        raise WeightsError(
            f"{source} is quantized with {quantization.bits} bits, group size "
            f"{quantization.group_size}; only 4 bits/group 32 and 8 bits/group 64 are supported"
        )
    return quantization


def stored_as(key: str, value: mx.array, dtype: mx.Dtype,
              quantized_linears: frozenset[str], keep_narrow: bool = False) -> mx.array:
    """The tensor as the model keeps it. Quantized weights stay packed uint32. A quantized
    linear layer's bf16 scales and biases stay bf16 under float32 activations too: its matmul
    widens them exactly at the same speed, and a 7B q4 model is 0.9 GB smaller. (Quantized
    embeddings return the scales' dtype, so theirs follow the compute dtype.) keep_narrow (the
    family's `keeps_stored_dtype`): a bf16 / f16 tensor stays as stored under wider activations,
    widened where it is used (exactly: every bf16 and f16 value is a float32). Every other
    float tensor takes the compute dtype."""
    if value.dtype == mx.uint32:
        return value
    if (key.endswith((".scales", ".biases")) and value.dtype == mx.bfloat16
            and dtype in (mx.float32, mx.bfloat16)
            and key.rsplit(".", 1)[0] in quantized_linears):
        return value
    if keep_narrow and value.dtype in NARROW_FLOATS and dtype == mx.float32:
        return value
    return value.astype(dtype)
