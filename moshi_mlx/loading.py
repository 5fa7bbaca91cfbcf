"""One load path for every model family:

    config.json (model_type) -> model -> sanitize (any official layout) -> quantize -> load (strict)

A family is a module in `moshi_mlx.models` that defines `Config` (a dataclass with
`from_dict(data, source)` and `default()`), `Model` (built from a Config; its parameter names
are the layout we load), `sanitize(weights, config)` (any supported layout -> our names, lazily,
tensor by tensor), `quant_predicate(path, module)` (which modules -q quantizes),
`DESCRIPTION` (for messages; or `describe(config)`) and `STORED_DTYPE` (the safetensors float
dtype its checkpoints must use, or None for any float); optionally `fit_config(config,
tensors)` (the config fitted to optional parts a checkpoint may or may not have),
`complete_config(data, path)` (config.json data completed from files beside it) and
`CONFIG_MARKERS` (keys that identify its config.json when `model_type` is absent).

Checks run on the header alone (names, dtypes and shapes against the model's own parameters,
quantization) before any tensor data is read, so a wrong file or `-q` fails at once.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import hub
from .errors import WeightsError
from .safetensors import CheckpointFiles

FAMILIES: dict[str, str] = {
    "moshi": "moshi_mlx.models.lm",
    "stt": "moshi_mlx.models.lm",
    "csm": "moshi_mlx.models.csm",
}
DEFAULT_MODEL_TYPE = "moshi"
# transformers' model_type of a family's checkpoints in its layout (the family's sanitize and
# Config.from_dict read that layout); "moshi" and "csm" are the same name in both.
MODEL_TYPE_ALIASES: dict[str, str] = {"kyutai_speech_to_text": "stt",
                                      "sesame": "csm"}  # mlx-audio's name for CSM


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


# The `-q` rule, for every family: the affine quantization of the official MLX files.
QUANTIZATIONS: dict[int, Quantization] = {4: Quantization(4, 32), 8: Quantization(8, 64)}
COMPUTE_DTYPES: dict[str, mx.Dtype] = {"bf16": mx.bfloat16, "f32": mx.float32,
                                       "f16": mx.float16}


def describe(family: ModuleType, config: Any) -> str:
    """What a checkpoint of this family and config is, for messages ("Moshi LM")."""
    return family.describe(config) if hasattr(family, "describe") else family.DESCRIPTION


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


# ---------------------------------------------------------------------------- config


def family_module(model_type: str, source: str = "config") -> ModuleType:
    if model_type not in FAMILIES:
        raise WeightsError(f"{source}: unknown model_type {model_type!r} "
                           f"(supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise WeightsError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object of config keys")
    return data


@dataclass
class ResolvedConfig:
    model_type: str
    family: ModuleType
    config: Any
    quantization: Quantization | None  # the config's "quantization" entry, if any
    source: str


def resolve_config(config: Any, weights_path: Path | None,
                   model_types: tuple[str, ...]) -> ResolvedConfig:
    """A config object, a config.json mapping or path, else the config.json beside the
    weights, else the first allowed family's default. `model_types` are the families the
    caller can use (a checkpoint of another family is a clear error)."""
    if config is not None and not isinstance(config, (dict, str, os.PathLike)):
        for model_type in model_types:
            family = family_module(model_type)
            if isinstance(config, family.Config):
                found = _model_type_of(config, model_type)
                if found not in model_types:
                    raise WeightsError(f"the config describes a {found} model, not "
                                       f"{' or '.join(model_types)}")
                return ResolvedConfig(found, family, config, None, "config")
        raise WeightsError(f"config of type {type(config).__name__} is not a "
                           f"{'/'.join(model_types)} config")
    source, path = "config", None
    if isinstance(config, dict):
        data = dict(config)
    elif config is not None:
        path = Path(config)
    elif weights_path is not None and (beside := weights_path.parent / hub.CONFIG_NAME).is_file():
        path = beside
    if path is not None:
        data, source = read_config_json(path), str(path)
    elif not isinstance(config, dict):
        family = family_module(model_types[0])
        return ResolvedConfig(model_types[0], family, family.Config.default(), None, "default")
    model_type = _model_type_of_data(data, model_types)
    family = family_module(model_type, source)
    if model_type not in model_types:
        raise WeightsError(f"{source} describes a {model_type} model, not "
                           f"{' or '.join(model_types)}")
    if hasattr(family, "complete_config"):  # e.g. CSM: flavors.json beside a Sesame config
        data = family.complete_config(data, path)
    quantization = _config_quantization(data.pop("quantization", None), source)
    return ResolvedConfig(model_type, family, family.Config.from_dict(data, source=source),
                          quantization, source)


def config_model_type(data: dict[str, Any]) -> str:
    """The family a config.json mapping describes (moshi when nothing says otherwise)."""
    return _model_type_of_data(data, tuple(FAMILIES))


def _model_type_of_data(data: dict[str, Any], model_types: tuple[str, ...]) -> str:
    """config.json's `model_type` (or its alias), else the family whose `CONFIG_MARKERS` keys
    it has (Sesame's CSM config names none), else moshi, or the caller's only family."""
    explicit = data.get("model_type")
    if explicit:
        return MODEL_TYPE_ALIASES.get(explicit, explicit)
    for model_type in FAMILIES:
        if any(key in data for key in getattr(family_module(model_type), "CONFIG_MARKERS", ())):
            return model_type
    return DEFAULT_MODEL_TYPE if DEFAULT_MODEL_TYPE in model_types else model_types[0]


def _model_type_of(config: Any, fallback: str) -> str:
    model_type = getattr(config, "model_type", None) or fallback
    if model_type not in FAMILIES:
        raise WeightsError(f"config of unknown model_type {model_type!r}")
    return model_type


def _config_quantization(entry: Any, source: str) -> Quantization | None:
    if entry is None:
        return None
    try:
        quantization = Quantization(int(entry["bits"]), int(entry["group_size"]))
    except (TypeError, KeyError, ValueError):
        raise WeightsError(f"{source}: bad quantization entry {entry!r}") from None
    if quantization not in QUANTIZATIONS.values():
        raise WeightsError(f"{source}: quantization {entry!r} is not supported "
                           "(4 bits/group 32 or 8 bits/group 64)")
    return quantization


# ---------------------------------------------------------------------------- quantization


def quantized_linear_paths(model: nn.Module) -> frozenset[str]:
    return frozenset(path for path, module in model.named_modules()
                     if isinstance(module, nn.QuantizedLinear))


def apply_quantization(model: nn.Module, family: ModuleType, q: Quantization) -> None:
    nn.quantize(model, group_size=q.group_size, bits=q.bits,
                class_predicate=lambda path, module: (
                    hasattr(module, "to_quantized") and family.quant_predicate(path, module)))


def dequantize_linears(model: nn.Module) -> int:
    """Replace every quantized linear of `model` by a float Linear holding its dequantized
    weight (the same values, in the dtype of its scales; float32 for float32 scales), one layer
    evaluated at a time. Returns how many were replaced."""
    from mlx.utils import tree_unflatten

    replaced = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.QuantizedLinear):
            continue
        dtype = module.scales.dtype
        mode = {"mode": module.mode} if hasattr(module, "mode") else {}
        weight = mx.dequantize(module.weight, module.scales.astype(mx.float32),
                               module.biases.astype(mx.float32), module.group_size,
                               module.bits, **mode).astype(dtype)
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


# ---------------------------------------------------------------------------- fragments

# A sanitize that needs several source tensors for one of ours (transformers' separate q/k/v
# projections -> our fused in_proj) returns each piece as "<name>#<i>/<n>": part i of n,
# joined in order along dim 0 once all n have been seen. Sanitize stays tensor by tensor.
FRAGMENT = "#"


def fragment_name(name: str, index: int, count: int) -> str:
    return f"{name}{FRAGMENT}{index}/{count}"


class FragmentJoiner:
    """Collects fragments; `add` returns the finished tensors (a plain name at once, a
    fragmented one when its last part arrives)."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[int, mx.array]] = {}

    def add(self, name: str, array: mx.array) -> list[tuple[str, mx.array]]:
        if FRAGMENT not in name:
            return [(name, array)]
        key, _, part = name.rpartition(FRAGMENT)
        index, count = (int(n) for n in part.split("/"))
        parts = self.pending.setdefault(key, {})
        parts[index] = array
        if len(parts) < count:
            return []
        del self.pending[key]
        return [(key, mx.concatenate([parts[i] for i in range(count)], axis=0))]

    def check_done(self, source: str) -> None:
        if self.pending:
            key, parts = next(iter(self.pending.items()))
            raise WeightsError(f"{source} lacks part of {key} (has {len(parts)} of its "
                               "pieces, e.g. the q/k/v projections of one layer)")


def sanitized(family: ModuleType, config: Any, tensors, source: str):
    """(source name, array) pairs -> (our name, array, source name) through the family's
    sanitize, fragments joined (the source name of a joined tensor is its last piece's)."""
    joiner = FragmentJoiner()
    for name, array in tensors:
        for key, value in family.sanitize({name: array}, config).items():
            for done, joined in joiner.add(key, value):
                yield done, joined, name
    joiner.check_done(source)


# ---------------------------------------------------------------------------- checks


def check_tensors(model: nn.Module, tensors: dict[str, mx.array], source: str,
                  description: str, stored_dtype: str | None = None,
                  origin: dict[str, str] | None = None) -> None:
    """Names, shapes (and, with `stored_dtype`, float dtypes) of sanitized tensors against the
    model's own parameters; WeightsError names the first problem, by the name the file gives
    the tensor (`origin`: our name -> the file's) where there is one."""
    from .safetensors import SAFETENSORS_DTYPE_NAMES

    def named(key: str) -> str:
        return (origin or {}).get(key, key)

    expected = dict(tree_flatten(model.parameters()))
    if not set(expected) & set(tensors):
        raise WeightsError(f"{source} is not a {description} checkpoint "
                           f"({len(tensors)} tensors, none of them the model's)")
    missing = [key for key in expected if key not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source} is missing tensor {missing[0]}{more}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise WeightsError(f"{source} has unexpected tensor {named(unexpected[0])} "
                           f"(not part of this {description})")
    for key, want in expected.items():
        have = tensors[key]
        packed = want.dtype == mx.uint32
        if packed != (have.dtype == mx.uint32):
            raise WeightsError(f"{source}: tensor {named(key)} has dtype "
                               f"{SAFETENSORS_DTYPE_NAMES[have.dtype]}, expected "
                               f"{'U32' if packed else stored_dtype or 'a float'}")
        if (stored_dtype is not None and not packed
                and SAFETENSORS_DTYPE_NAMES[have.dtype] != stored_dtype):
            raise WeightsError(f"{source}: tensor {named(key)} has dtype "
                               f"{SAFETENSORS_DTYPE_NAMES[have.dtype]}, expected {stored_dtype}")
        if tuple(have.shape) != tuple(want.shape):
            raise WeightsError(f"{source}: tensor {named(key)} has shape {tuple(have.shape)}, "
                               f"expected "
                               f"{tuple(want.shape)} for this config")


@dataclass
class Checkpoint:
    """A checked checkpoint, not yet read: what `load_model` and the converter work from."""

    files: CheckpointFiles  # one file, or the shards of a sharded checkpoint
    model_type: str
    family: ModuleType
    config: Any
    quantization: Quantization | None  # of the file

    @property
    def path(self) -> Path:
        return self.files.path

    @property
    def name(self) -> str:
        return self.files.name

    def read(self) -> dict[str, mx.array]:
        """Every tensor, read one at a time and sanitized into our layout."""
        pairs = ((name, array) for name, _raw, array in self.files.iter_tensors())
        return {key: array for key, array, _ in
                sanitized(self.family, self.config, pairs, self.name)}


def inspect_checkpoint(path: str | os.PathLike | list[Path], config: Any = None,
                       model_types: tuple[str, ...] = ("moshi", "stt")) -> Checkpoint:
    """Check a weight file (or the list of a sharded checkpoint's files) from its header
    alone against its config (see resolve_config)."""
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    files = CheckpointFiles.read(paths)
    name = files.name
    resolved = resolve_config(config, files.path, model_types)
    family, cfg = resolved.family, resolved.config
    if not files.owner:
        raise WeightsError(f"{name} holds no tensors: not a {describe(family, cfg)} checkpoint")
    mapped: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for key, array, source in sanitized(family, cfg, files.placeholders().items(), name):
        mapped[key] = array
        origin[key] = source
    if hasattr(family, "fit_config"):  # optional parts (e.g. STT's VAD heads) the file has
        cfg = family.fit_config(cfg, mapped)
    plain = family.Model(cfg)
    plain_shapes = {k: tuple(v.shape) for k, v in tree_flatten(plain.parameters())}
    quantization = detect_quantization(mapped, plain_shapes, name)
    if resolved.quantization is not None and resolved.quantization != quantization:
        found = "not quantized" if quantization is None else f"{quantization.bits}-bit"
        raise WeightsError(f"{resolved.source} says {resolved.quantization.bits}-bit "
                           f"quantization, but {name} is {found}")
    if quantization is not None:
        apply_quantization(plain, family, quantization)
    check_tensors(plain, mapped, name, describe(family, cfg), family.STORED_DTYPE, origin)
    return Checkpoint(files, resolved.model_type, family, cfg, quantization)


def check_requested_bits(checkpoint: Checkpoint, quantize: int | None) -> None:
    """-q that names other bits than a pre-quantized file holds is a clear error (-q with a
    bf16 file is fine: it is quantized while loading)."""
    found = checkpoint.quantization
    if found is not None and quantize is not None and found.bits != quantize:
        raise WeightsError(f"{checkpoint.name} is {found.bits}-bit quantized, but -q {quantize} "
                           f"was asked; use -q {found.bits} (or the matching repo/file)")


# ---------------------------------------------------------------------------- loading


def stored_as(key: str, value: mx.array, dtype: mx.Dtype,
              quantized_linears: frozenset[str]) -> mx.array:
    """The tensor as the model keeps it. Quantized weights stay packed uint32. A quantized
    linear layer's bf16 scales and biases stay bf16 under float32 activations too: its matmul
    widens them exactly at the same speed, and a 7B q4 model is 0.9 GB smaller. (Quantized
    embeddings return the scales' dtype, so theirs follow the compute dtype.) Every other
    float tensor takes the compute dtype."""
    if value.dtype == mx.uint32:
        return value
    if (key.endswith((".scales", ".biases")) and value.dtype == mx.bfloat16
            and dtype in (mx.float32, mx.bfloat16)
            and key.rsplit(".", 1)[0] in quantized_linears):
        return value
    return value.astype(dtype)


def load_model(weights: str | os.PathLike, config: Any = None, quantize: int | None = None,
               dtype: mx.Dtype | str | None = None,
               model_types: tuple[str, ...] = ("moshi", "stt")) -> tuple[nn.Module, Checkpoint]:
    """Load a model of one of `model_types` from a file, a model folder or a hub repo.

    quantize: None keeps the file as it is; 4 or 8 quantizes a bf16 file while loading, or
    asserts that a pre-quantized file has these bits. dtype: compute dtype (None = auto).
    """
    check_quantize(quantize)
    compute = resolve_dtype(dtype)
    files = hub.model_files(weights, quantize)
    if config is None and not Path(weights).expanduser().exists():  # a repo: its config.json
        config = hub.optional_file(weights, hub.CONFIG_NAME)
    checkpoint = inspect_checkpoint(files, config, model_types)
    check_requested_bits(checkpoint, quantize)
    family, cfg = checkpoint.family, checkpoint.config
    tensors = checkpoint.read()
    target = checkpoint.quantization
    if target is None and quantize is not None:
        target = QUANTIZATIONS[quantize]
        tensors = quantize_tensors(tensors, quantizable_weights(family, cfg), target)
    model = family.Model(cfg)
    if target is not None:
        apply_quantization(model, family, target)
    check_tensors(model, tensors, checkpoint.name, describe(family, cfg))
    quantized = quantized_linear_paths(model)
    model.load_weights([(k, stored_as(k, v, compute, quantized)) for k, v in tensors.items()],
                       strict=True)
    mx.eval(model.parameters())
    return model, checkpoint
