"""One load path for every model family:

    config.json (model_type) -> model -> sanitize (any official layout) -> quantize -> load (strict)

A family is a module in `moshi_mlx.models` that satisfies the Protocol
`moshi_mlx.loading.families.ModelFamily` (Config, Model, sanitize, quant_predicate, ...; its
optional `complete_config(data, read_beside)` completes config.json data from the files beside
it, read by `read_beside(name)`, see `loading.config.json_beside`).

Checks run on the header alone (names, dtypes and shapes against the model's own parameters,
quantization) before any tensor data is read, so a wrong file or `-q` fails at once, and a
checkpoint of a family the caller does not take is one line naming the command that does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading import hub
from moshi_mlx.loading.config import ResolvedConfig, resolve_config
from moshi_mlx.loading.families import (
    config_ignored,
    describe,
    files_of,
    model_type_of_tensors,
    other_family_error,
)
from moshi_mlx.loading.file_rows import FileRows
from moshi_mlx.loading.quantization import (
    QUANTIZATIONS,
    Quantization,
    apply_quantization,
    check_quantize,
    detect_quantization,
    quantizable_weights,
    quantize_tensor,
    quantized_linear_paths,
    resolve_dtype,
    stored_as,
)
from moshi_mlx.loading.safetensors import FLOAT_DTYPES, CheckpointFiles
from moshi_mlx.models.layouts import FragmentJoiner

# ---------------------------------------------------------------------------- config


# ---------------------------------------------------------------------------- quantization


# ---------------------------------------------------------------------------- fragments


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
    from moshi_mlx.loading.safetensors import SAFETENSORS_DTYPE_NAMES

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
    # our key -> the file's tensor name, for tensors the layout only renames (no reshaping,
    # splitting or casting): their bytes in the file are ours (see `rows_from_file`)
    renamed: dict[str, str] = field(default_factory=dict)

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
    alone against its config (see resolve_config). A checkpoint of a family none of
    `model_types` is (by its config, else by its tensor names) is one line naming the command
    that takes it."""
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    files = CheckpointFiles.read(paths)
    name = files.name
    resolved = resolve_config(config, files.path, model_types)
    family, cfg = resolved.family, resolved.config
    if not files.owner:
        raise WeightsError(f"{name} holds no tensors: not a {describe(family, cfg)} checkpoint")
    _check_family(files, resolved, model_types)
    if hasattr(family, "fit_layout"):  # e.g. Moshi's depformer size (PersonaPlex) by name
        cfg = family.fit_layout(cfg, list(files.owner), name)
    mapped: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    renamed: dict[str, str] = {}
    placeholders = files.placeholders()
    try:
        for key, array, source in sanitized(family, cfg, placeholders.items(), name):
            mapped[key] = array
            origin[key] = source
            if array is placeholders[source]:
                renamed[key] = source
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
    except WeightsError as exc:
        if resolved.source != "default":
            raise
        raise WeightsError(f"{exc} (no {hub.CONFIG_NAME} was found beside it, so it was read "
                           f"against the default {describe(family, cfg)} config: pass --config)"
                           ) from None
    return Checkpoint(files, resolved.model_type, family, cfg, quantization, renamed)


def _check_family(files: CheckpointFiles, resolved: ResolvedConfig,
                  model_types: tuple[str, ...]) -> None:
    """The family the tensor names show (when they show one) must be the config's."""
    found = model_type_of_tensors(files.owner)
    if found is None or found == resolved.model_type:
        return
    if found not in model_types:
        raise other_family_error(f"{files.name} is", found, model_types, "checkpoint")
    where = ("the default config" if resolved.source == "default"
             else resolved.source)
    raise WeightsError(f"{files.name} is a {files_of(found).name} checkpoint, but {where} "
                       f"describes a {files_of(resolved.model_type).name} model: pass its own "
                       "config (--config)")


def check_requested_bits(checkpoint: Checkpoint, quantize: int | None) -> None:
    """-q that names other bits than a pre-quantized file holds is a clear error (-q with a
    bf16 file is fine: it is quantized while loading)."""
    found = checkpoint.quantization
    if found is not None and quantize is not None and found.bits != quantize:
        raise WeightsError(f"{checkpoint.name} is {found.bits}-bit quantized, but -q {quantize} "
                           f"was asked; use -q {found.bits} (or the matching repo/file)")


def loaded_quantization(checkpoint: Checkpoint, quantize: int | None) -> Quantization | None:
    """The quantization the loaded model will have: a pre-quantized file's own, else `-q`'s
    (a bf16 file quantized while loading), else none."""
    if checkpoint.quantization is not None or quantize is None:
        return checkpoint.quantization
    return QUANTIZATIONS[quantize]


# ---------------------------------------------------------------------------- loading


def rows_from_file(model: nn.Module, checkpoint: Checkpoint) -> dict[str, FileRows]:
    """The family's `ROWS_FROM_FILE` embedding tables that stay in the file, read a row at a
    time (`FileRows`): those the file stores as floats under a mere rename, into a float
    `nn.Embedding` (not one -q quantizes, not a pre-quantized file's)."""
    modules = dict(model.named_modules())
    served = {}
    for key in getattr(checkpoint.family, "ROWS_FROM_FILE", ()):
        source = checkpoint.renamed.get(key)
        module = modules.get(key.rsplit(".", 1)[0])
        if (source is None or type(module) is not nn.Embedding
                or checkpoint.files.tensors[source].dtype not in FLOAT_DTYPES):
            continue
        served[key] = FileRows(checkpoint.files.owner[source], source)
    return served


def load_model(weights: str | os.PathLike, config: Any = None, quantize: int | None = None,
               dtype: mx.Dtype | str | None = None,
               model_types: tuple[str, ...] = ("moshi", "stt")) -> tuple[nn.Module, Checkpoint]:
    """Load a model of one of `model_types` from a file, a model folder or a hub repo.

    quantize: None keeps the file as it is; 4 or 8 quantizes a bf16 file while loading, or
    asserts that a pre-quantized file has these bits. dtype: compute dtype (None = auto).

    Tensors are read, sanitized, quantized and brought to the form the model keeps
    (`stored_as`) one at a time, each evaluated before the next is read: the peak is the
    loaded model plus one tensor, never the file's copy beside the model's.
    """
    check_quantize(quantize)
    compute = resolve_dtype(dtype)
    files = hub.model_files(weights, quantize)
    if (config is None and not Path(weights).expanduser().exists()  # a repo: its config.json
            and not config_ignored(str(weights))):
        config = hub.optional_file(weights, hub.CONFIG_NAME)
    checkpoint = inspect_checkpoint(files, config, model_types)
    check_requested_bits(checkpoint, quantize)
    family, cfg = checkpoint.family, checkpoint.config
    target = loaded_quantization(checkpoint, quantize)
    quantizable: frozenset[str] = frozenset()
    if checkpoint.quantization is None and target is not None:
        quantizable = quantizable_weights(family, cfg)
    model = family.Model(cfg)
    if target is not None:
        apply_quantization(model, family, target)
    quantized = quantized_linear_paths(model)
    served = rows_from_file(model, checkpoint)
    if served:
        model.update_modules(tree_unflatten([(key.rsplit(".", 1)[0], rows)
                                             for key, rows in served.items()]))
    keeps_stored = getattr(family, "keeps_stored_dtype", None)
    tensors: dict[str, mx.array] = {}
    unread = {checkpoint.renamed[key] for key in served}
    pairs = ((name, array) for name, _raw, array in checkpoint.files.iter_tensors(skip=unread))
    for key, array, _ in sanitized(family, cfg, pairs, checkpoint.name):
        parts = quantize_tensor(key, array, target) if key in quantizable else [(key, array)]
        del array
        for name, value in parts:
            kept = stored_as(name, value, compute, quantized,
                             keep_narrow=keeps_stored is not None and keeps_stored(name))
            mx.eval(kept)
            tensors[name] = kept
        del parts
    check_tensors(model, tensors, checkpoint.name, describe(family, cfg))
    model.load_weights(list(tensors.items()), strict=True)
    del tensors
    mx.eval(model.parameters())
    return model, checkpoint
