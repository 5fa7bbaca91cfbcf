"""LoRA (low-rank adapters) over linear layers, float or quantized (QLoRA), in mlx-lm's
conventions: `lora_a` [in, rank], `lora_b` [rank, out], y = base(x) + scale * (x @ lora_a @
lora_b), `lora_b` zero at first so a new adapter changes nothing.

An adapter folder holds `adapters.safetensors` (the `lora_a` / `lora_b` leaves under the
model's own module paths) and `adapter_config.json` (rank, scale, dropout and the adapted
module paths), so loading one needs nothing but the base model. Fusing writes
W + scale * (lora_b.T @ lora_a.T) into an ordinary linear, quantized again as the base was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from moshi_mlx.errors import WeightsError
from moshi_mlx.models.csm import runs_dequantized
from moshi_mlx.modules.parallel import dequantized_weight, quantization_mode

ADAPTER_WEIGHTS_NAME = "adapters.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# mlx-lm's defaults for `mlx_lm.lora`.
DEFAULT_RANK = 8
DEFAULT_SCALE = 20.0
DEFAULT_NUM_LAYERS = 16


def lora_delta(lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """What fusing adds to a base weight [out, in]: scale * (lora_b.T @ lora_a.T), float32.
    The one place the fuse math lives (LoRALinear.fused, adapter_deltas, Kyutai's files)."""
    return scale * (lora_b.astype(mx.float32).T @ lora_a.astype(mx.float32).T)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input, output) widths of an nn.Linear or nn.QuantizedLinear."""
    out_dim, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed * 32 // layer.bits, out_dim
    return packed, out_dim


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int = DEFAULT_RANK, scale: float = DEFAULT_SCALE,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.QuantizedLinear, not "
                            f"{type(base).__name__}")
        if rank < 1:
            raise WeightsError(f"LoRA rank must be >= 1, got {rank}")
        in_dim, out_dim = linear_dims(base)
        self.linear = base
        self.linear.freeze()
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1.0 / math.sqrt(in_dim)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dim, rank))
        self.lora_b = mx.zeros((rank, out_dim))

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return self.base_output(x) + (self.scale * update).astype(x.dtype)

    def base_output(self, x: mx.array) -> mx.array:
        """The frozen base on x. Many rows of a quantized base on the CPU: a float matmul on
        its dequantized weight (as `apply_linear`), rows counted over every leading axis (the
        depformer trains on [N, 1, dim]), the weight dequantized again in the backward pass
        instead of kept (QLoRA's memory stays the quantized model's)."""
        base = self.linear
        if not runs_dequantized(base, x.size // x.shape[-1]):
            return base(x)
        y = frozen_dequantized_matmul(base, x)
        return y + base.bias.astype(y.dtype) if "bias" in base else y

    def fused(self) -> nn.Module:
        """An ordinary linear equal to this one (no dropout), quantized as the base was."""
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            weight = mx.dequantize(base.weight, base.scales, base.biases, base.group_size,
                                   base.bits, **quantization_mode(base))
        else:
            weight = base.weight
        delta = lora_delta(self.lora_a, self.lora_b, self.scale)
        out_dim, in_dim = delta.shape
        linear = nn.Linear(in_dim, out_dim, bias="bias" in base)
        linear.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        if "bias" in base:
            linear.bias = base.bias
        if isinstance(base, nn.QuantizedLinear):
            return nn.QuantizedLinear.from_linear(linear, base.group_size, base.bits,
                                                  **quantization_mode(base))
        return linear


def frozen_dequantized_matmul(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """x @ dequantized(weight).T whose gradient flows to x only (the base is frozen),
    computed by dequantizing again: autodiff of the plain product would keep every layer's
    float weight alive until the backward pass reaches it (a float copy of the model)."""

    @mx.custom_function
    def matmul(x: mx.array, *packed: mx.array) -> mx.array:
        return x @ dequantized_weight(layer, x.dtype, packed).T

    @matmul.vjp
    def matmul_vjp(primals: tuple, cotangent: mx.array, _output: mx.array) -> tuple:
        x, *packed = primals
        dx = cotangent @ dequantized_weight(layer, cotangent.dtype, tuple(packed))
        return (dx, *(mx.zeros_like(p) for p in packed))

    return matmul(x, layer.weight, layer.scales, layer.biases)


@dataclass(frozen=True)
class LoraSettings:
    """What an adapter is: its shape and the modules it adapts (adapter_config.json)."""

    rank: int = DEFAULT_RANK
    scale: float = DEFAULT_SCALE
    dropout: float = 0.0
    paths: tuple[str, ...] = ()
    family: str = ""
    extra: dict = field(default_factory=dict)  # what the trainer records (num_layers, ...)

    def to_json(self) -> dict:
        data = asdict(self)
        extra = data.pop("extra")
        paths = data.pop("paths")
        return {"fine_tune_type": "lora", **extra, "family": self.family,
                "lora_parameters": {"rank": self.rank, "scale": self.scale,
                                    "dropout": self.dropout},
                "lora_paths": list(paths)}

    @classmethod
    def from_json(cls, data: object, source: str) -> LoraSettings:
        if not isinstance(data, dict):
            raise WeightsError(f"{source}: expected a JSON object")
        if data.get("fine_tune_type", "lora") != "lora":
            raise WeightsError(f"{source}: fine_tune_type {data['fine_tune_type']!r} is not "
                               "supported (only lora)")
        params, paths = data.get("lora_parameters"), data.get("lora_paths")
        if not isinstance(params, dict) or not isinstance(paths, list) or not paths:
            raise WeightsError(f"{source}: needs lora_parameters and a non-empty lora_paths")
        try:
            rank, scale = int(params["rank"]), float(params["scale"])
            dropout = float(params.get("dropout", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{source}: bad lora_parameters ({exc})") from None
        known = {"fine_tune_type", "family", "lora_parameters", "lora_paths"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(rank, scale, dropout, tuple(str(p) for p in paths),
                   str(data.get("family", "")), extra)


def select_linears(model: nn.Module, keep: Callable[[str, nn.Module], bool]) -> list[str]:
    """Paths of the linear layers (float or quantized) of `model` that `keep(path, module)`
    accepts, sorted."""
    return sorted(path for path, module in model.named_modules()
                  if isinstance(module, (nn.Linear, nn.QuantizedLinear)) and keep(path, module))


def apply_lora(model: nn.Module, paths: Iterable[str], rank: int = DEFAULT_RANK,
               scale: float = DEFAULT_SCALE, dropout: float = 0.0) -> list[str]:
    """Freeze `model` and put a LoRALinear over each linear at `paths`: afterwards the
    trainable parameters of `model` are exactly the LoRA leaves. Returns the paths."""
    modules = dict(model.named_modules())
    paths = list(paths)
    model.freeze()
    wrapped = []
    for path in paths:
        module = modules.get(path)
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            found = "nothing" if module is None else type(module).__name__
            raise WeightsError(f"cannot put LoRA on {path}: the model has {found} there, "
                               "not a linear layer")
        wrapped.append((path, LoRALinear(module, rank, scale, dropout)))
    model.update_modules(tree_unflatten(wrapped))
    _forget_compiled(model)
    return paths


def _forget_compiled(model: nn.Module) -> None:
    """A model that keeps compiled graphs (CSM) would go on running its old layers."""
    forget = getattr(model, "forget_compiled", None)
    if callable(forget):
        forget()


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The LoRA leaves of `model` by their full paths (what adapters.safetensors holds)."""
    weights = {}
    for path, layer in lora_layers(model):
        weights[f"{path}.lora_a"] = layer.lora_a
        weights[f"{path}.lora_b"] = layer.lora_b
    return weights


def save_adapter(model: nn.Module, folder: str | os.PathLike, settings: LoraSettings,
                 weights_name: str = ADAPTER_WEIGHTS_NAME) -> Path:
    """Write the adapter's tensors (float32) and, beside them, adapter_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float32) for k, v in adapter_weights(model).items()}
    path = folder / weights_name
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(settings.to_json(), indent=2) + "\n")
    return path


def read_adapter_settings(folder: str | os.PathLike) -> LoraSettings:
    path = Path(folder) / ADAPTER_CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{folder}: no {ADAPTER_CONFIG_NAME} (not an adapter folder)"
                           ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: cannot read ({exc})") from None
    return LoraSettings.from_json(data, str(path))


def load_adapter_weights(model: nn.Module, weights_file: str | os.PathLike) -> None:
    """Set the LoRA leaves of `model` (LoRA already applied) from a safetensors file; the
    first tensor that the model lacks, that is missing, or whose shape differs is named."""
    try:
        tensors = mx.load(str(weights_file))
    except Exception as exc:  # MLX raises plain RuntimeError / ValueError for bad files
        raise WeightsError(f"{weights_file}: cannot read the adapter ({exc})") from None
    set_adapter_tensors(model, tensors, str(weights_file))


def set_adapter_tensors(model: nn.Module, tensors: dict[str, mx.array], source: str) -> None:
    """`load_adapter_weights` of tensors already read (`source` names them in errors)."""
    expected = adapter_weights(model)
    for name, tensor in tensors.items():
        if name not in expected:
            raise WeightsError(f"{source}: tensor {name} has no place in this model "
                               "(an adapter made for another model?)")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensor.shape)},"
                               f" this model needs {tuple(expected[name].shape)} (an adapter "
                               "made for another model?)")
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise WeightsError(f"{source}: tensor {missing[0]} is missing (an adapter made "
                           "for another model?)")
    model.update(tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in tensors.items()]))
    _forget_compiled(model)
    mx.eval(model.parameters())


def load_adapter(model: nn.Module, folder: str | os.PathLike, family: str | None = None
                 ) -> LoraSettings:
    """Apply the adapter of `folder` to `model` (kept apart: LoRA layers over the frozen
    base). family: refuse an adapter trained for another family (e.g. "csm")."""
    settings = read_adapter_settings(folder)
    if family and settings.family and settings.family != family:
        raise WeightsError(f"{folder}: the adapter is for {settings.family}, not {family}")
    modules = dict(model.named_modules())
    for path in settings.paths:
        if not isinstance(modules.get(path), (nn.Linear, nn.QuantizedLinear)):
            raise WeightsError(f"{folder}: the adapter adapts {path}, which this model lacks "
                               "(an adapter made for another model?)")
    apply_lora(model, settings.paths, settings.rank, settings.scale, settings.dropout)
    load_adapter_weights(model, Path(folder) / ADAPTER_WEIGHTS_NAME)
    model.eval()  # to run it: no LoRA dropout
    return settings


def adapter_deltas(folder: str | os.PathLike, weight_shapes: dict[str, tuple[int, ...]],
                   family: str | None = None) -> tuple[LoraSettings, dict[str, mx.array]]:
    """What fusing the adapter of `folder` adds to each adapted weight: {"<path>.weight":
    scale * (lora_b.T @ lora_a.T)} (float32), checked against the base's (out, in) weight
    shapes `weight_shapes`; the first tensor that does not fit is named."""
    settings = read_adapter_settings(folder)
    if family and settings.family and settings.family != family:
        raise WeightsError(f"{folder}: the adapter is for {settings.family}, not {family}")
    weights_file = Path(folder) / ADAPTER_WEIGHTS_NAME
    try:
        tensors = mx.load(str(weights_file))
    except Exception as exc:  # MLX raises plain RuntimeError / ValueError for bad files
        raise WeightsError(f"{weights_file}: cannot read the adapter ({exc})") from None
    return settings, deltas_of(settings, tensors, weight_shapes, str(weights_file))


def deltas_of(settings: LoraSettings, tensors: dict[str, mx.array],
              weight_shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, mx.array]:
    """`adapter_deltas` of adapter tensors already read (`source` names them in errors)."""
    deltas = {}
    for path in settings.paths:
        shape = weight_shapes.get(f"{path}.weight")
        if shape is None:
            raise WeightsError(f"{source}: the adapter adapts {path}, which this model lacks "
                               "(an adapter made for another model?)")
        out_dim, in_dim = shape
        for leaf, wanted in (("lora_a", (in_dim, settings.rank)),
                             ("lora_b", (settings.rank, out_dim))):
            name = f"{path}.{leaf}"
            if name not in tensors:
                raise WeightsError(f"{source}: tensor {name} is missing")
            if tuple(tensors[name].shape) != wanted:
                raise WeightsError(f"{source}: tensor {name} has shape "
                                   f"{tuple(tensors[name].shape)}, this model needs {wanted} "
                                   "(an adapter made for another model?)")
        deltas[f"{path}.weight"] = lora_delta(tensors[f"{path}.lora_a"],
                                              tensors[f"{path}.lora_b"], settings.scale)
    return deltas


def fuse_lora(model: nn.Module) -> int:
    """Replace every LoRALinear of `model` by its fused linear; returns how many."""
    fused = [(path, layer.fused()) for path, layer in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
        _forget_compiled(model)
        mx.eval(model.parameters())
    return len(fused)


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
