"""Convert a Moshi LM checkpoint (PyTorch layout, bf16) into a local MLX model folder.

The folder holds the weights in the official MLX layout (bf16 `model.safetensors`, or
`model.q8.safetensors` / `model.q4.safetensors` quantized like the official MLX files), the
text tokenizer and the Mimi weights when the source has them, a `config.json` (LM config keys
plus the quantization) and `manifest.json` (sha256 of the source and of every output file).

Memory stays bounded: tensors are read, mapped, quantized and written one source tensor at a
time. Every file is written under a hidden temporary name and renamed when complete;
`manifest.json` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx

from moshi_mlx.errors import WeightsError
from moshi_mlx.hub import resolve_file
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.weights import (
    QUANTIZATIONS,
    Quantization,
    SafetensorsHeader,
    describe_checkpoint,
    iter_tensors,
    mlx_dtype,
    pytorch_dep_q,
    pytorch_to_mlx,
    quantize_tensor,
)

from . import __version__
from .safetensors_stream import PlannedTensor, SafetensorsStreamWriter, planned

TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
SOURCE_WEIGHTS_NAME = "model.safetensors"
MODEL_FILE_NAMES = {None: "model.safetensors", 8: "model.q8.safetensors", 4: "model.q4.safetensors"}
CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
_PARTIAL_MARK = ".partial-"
# Names this tool writes; `--force` removes exactly these (and stale temporaries) first.
MANAGED_NAMES = {*MODEL_FILE_NAMES.values(), TOKENIZER_NAME, MIMI_NAME, CONFIG_NAME, MANIFEST_NAME}


@dataclass
class Sources:
    weights: Path
    config: Path | None = None
    tokenizer: Path | None = None
    mimi: Path | None = None
    description: str = ""


@dataclass
class ConversionResult:
    out_dir: Path
    model_file: Path
    files: dict[str, Path] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the source lacked


# ------------------------------------------------------------------------------------ inputs


def find_sources(
    hf_repo: str | None = None,
    input_path: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    mimi_weight: str | os.PathLike | None = None,
) -> Sources:
    """Locate the weights and the optional files, from a repo/folder or a local file."""
    if (hf_repo is None) == (input_path is None):
        raise WeightsError("give exactly one of --hf-repo or --input")
    if hf_repo is not None:
        sources = Sources(resolve_file(hf_repo, SOURCE_WEIGHTS_NAME), description=hf_repo)
        optional = {CONFIG_NAME: "config", TOKENIZER_NAME: "tokenizer", MIMI_NAME: "mimi"}
        for filename, attr in optional.items():
            try:
                setattr(sources, attr, resolve_file(hf_repo, filename))
            except WeightsError:
                pass  # the repo does not have it: the folder goes without
    else:
        weights = Path(input_path).expanduser()
        if weights.is_dir():
            raise WeightsError(f"{weights} is a folder: use --hf-repo for a model folder")
        if not weights.is_file():
            raise WeightsError(f"{weights}: no such file")
        sources = Sources(weights, description=str(weights))
        # Standard names beside the input file are taken along, like a repo's.
        beside = {"config": CONFIG_NAME, "tokenizer": TOKENIZER_NAME, "mimi": MIMI_NAME}
        for attr, filename in beside.items():
            if (weights.parent / filename).is_file():
                setattr(sources, attr, weights.parent / filename)
    explicit = {
        "config": (config, "--config"),
        "tokenizer": (tokenizer, "--tokenizer"),
        "mimi": (mimi_weight, "--mimi-weight"),
    }
    for attr, (value, option) in explicit.items():
        if value is not None:
            path = Path(value).expanduser()
            if not path.is_file():
                raise WeightsError(f"{path}: no such file ({option})")
            setattr(sources, attr, path)
    return sources


def load_config(path: Path | None) -> LmConfig:
    """The LM config of the source (its config.json), else the released 7B model's."""
    if path is None:
        return LmConfig.moshi_7b()
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object of LM config keys")
    data.pop("quantization", None)  # our own record, present when re-converting our output
    return LmConfig.from_dict(data, source=str(path))


# ------------------------------------------------------------------------------------ output


@contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """Open a hidden temporary beside `final`; renamed to `final` only if the block succeeds."""
    temporary = final.with_name(f".{final.name}{_PARTIAL_MARK}{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_into(source: Path, final: Path) -> None:
    """Hard-link `source` as `final` when possible (same file system), else copy; atomic."""
    source = source.resolve()  # hub cache entries are symlinks to blobs
    temporary = final.with_name(f".{final.name}{_PARTIAL_MARK}{os.getpid()}")
    try:
        try:
            os.link(source, temporary)
        except OSError:
            shutil.copyfile(source, temporary)
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def prepare_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise WeightsError(f"{out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = list(out_dir.iterdir())
    except OSError as exc:
        raise WeightsError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    if entries and not force:
        raise WeightsError(f"{out_dir} is not empty; use --force to overwrite")
    for entry in entries:
        if entry.name in MANAGED_NAMES or _PARTIAL_MARK in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                raise WeightsError(f"{entry} is a folder; remove it by hand")
            entry.unlink()


# ------------------------------------------------------------------------------------ weights


def _outputs(
    name: str, tensor: mx.array, layout: str, dep_q: int, quantization: Quantization | None
) -> list[tuple[str, mx.array]]:
    """MLX-layout (and quantized) output tensors of one source tensor; lazy."""
    mapped = pytorch_to_mlx(name, tensor, dep_q) if layout == "pytorch" else [(name, tensor)]
    if quantization is None:
        return mapped
    return [part for key, array in mapped for part in quantize_tensor(key, array, quantization)]


def plan_weights(
    header: SafetensorsHeader, layout: str, dep_q: int, quantization: Quantization | None
) -> list[PlannedTensor]:
    """Names, dtypes and shapes of every output tensor, in write order, without reading data:
    the same mapping runs on lazy placeholders that are never evaluated."""
    plan: list[PlannedTensor] = []
    for name in header.in_file_order():
        info = header.tensors[name]
        placeholder = mx.zeros(info.shape, dtype=mlx_dtype(info.dtype))
        plan.extend(planned(key, array) for key, array in _outputs(
            name, placeholder, layout, dep_q, quantization))
    return plan


def write_weights(
    header: SafetensorsHeader,
    layout: str,
    dep_q: int,
    quantization: Quantization | None,
    plan: list[PlannedTensor],
    f: BinaryIO,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, str]:
    """Stream the converted tensors of `plan` into `f`; returns (source sha256, output sha256)."""
    writer = SafetensorsStreamWriter(f, plan)
    source_hash = hashlib.sha256()
    with open(header.path, "rb") as source:
        source_hash.update(source.read(header.header_bytes))
    # Tensors are contiguous in file order (checked on reading the header), so header bytes
    # plus every tensor's bytes in that order hash to the whole source file.
    for name, raw, tensor in iter_tensors(header):
        source_hash.update(raw)
        del raw
        for key, array in _outputs(name, tensor, layout, dep_q, quantization):
            mx.eval(array)
            writer.write(key, array)
        del tensor
        if progress is not None:
            progress(header.tensors[name].nbytes)
    return source_hash.hexdigest(), writer.finish()


def _refuse_overwriting_sources(out: Path, sources: Sources) -> None:
    """The output folder must not be where the inputs are (with --force they would be removed
    before being read)."""
    for path in (sources.weights, sources.config, sources.tokenizer, sources.mimi):
        if path is not None and path.name in MANAGED_NAMES and out.is_dir() and (
            path.resolve().parent == out.resolve()
        ):
            raise WeightsError(f"the output folder {out} holds the input {path.name}; "
                               "choose another --out")


def _copied_bytes(sources: Sources) -> int:
    return sum(p.stat().st_size for p in (sources.tokenizer, sources.mimi) if p is not None)


def _check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise WeightsError(f"not enough free disk space in {out}: the model folder needs "
                           f"{needed / 1e6:,.0f} MB, {free / 1e6:,.0f} MB are free")


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="converting",
                disable=not sys.stderr.isatty())


# ------------------------------------------------------------------------------------ main


def convert(
    out_dir: str | os.PathLike,
    *,
    hf_repo: str | None = None,
    input_path: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    mimi_weight: str | os.PathLike | None = None,
    bits: int | None = None,
    force: bool = False,
) -> ConversionResult:
    """Convert a Moshi LM checkpoint into the model folder `out_dir` (see module docstring).

    bits: None for bf16, 4 (group 32) or 8 (group 64). All input problems raise WeightsError
    before anything is written.
    """
    if bits is not None and bits not in QUANTIZATIONS:
        raise WeightsError(f"-q must be 4 or 8 (or absent for bf16), got {bits}")
    quantization = QUANTIZATIONS[bits] if bits is not None else None
    sources = find_sources(hf_repo, input_path, config, tokenizer, mimi_weight)
    lm_config = load_config(sources.config)
    header, layout, file_quantization = describe_checkpoint(sources.weights, lm_config)
    if file_quantization is not None:
        raise WeightsError(
            f"{sources.weights.name} is already {file_quantization.bits}-bit quantized; "
            "convert from a bf16 checkpoint"
        )

    out = Path(out_dir).expanduser()
    _refuse_overwriting_sources(out, sources)
    dep_q = pytorch_dep_q(header.tensors) if layout == "pytorch" else 0
    plan = plan_weights(header, layout, dep_q, quantization)
    prepare_out_dir(out, force)
    _check_free_space(out, sum(entry.nbytes for entry in plan) + _copied_bytes(sources))
    model_file = out / MODEL_FILE_NAMES[bits]
    data_bytes = header.file_size - header.header_bytes
    try:
        with _progress_bar(data_bytes) as bar, atomic_file(model_file) as f:
            source_sha, model_sha = write_weights(header, layout, dep_q, quantization, plan, f,
                                                  bar.update)
        files = {model_file.name: model_file}
        if sources.tokenizer is not None:
            copy_into(sources.tokenizer, out / TOKENIZER_NAME)
            files[TOKENIZER_NAME] = out / TOKENIZER_NAME
        if sources.mimi is not None:
            copy_into(sources.mimi, out / MIMI_NAME)
            files[MIMI_NAME] = out / MIMI_NAME
        config_data = lm_config.to_dict()
        config_data["moshi_name"] = model_file.name
        if sources.tokenizer is not None:
            config_data["tokenizer_name"] = TOKENIZER_NAME
        if sources.mimi is not None:
            config_data["mimi_name"] = MIMI_NAME
        config_data["quantization"] = (
            None if quantization is None
            else {"bits": quantization.bits, "group_size": quantization.group_size}
        )
        _write_json(out / CONFIG_NAME, config_data)
        files[CONFIG_NAME] = out / CONFIG_NAME

        hashes = {name: model_sha if name == model_file.name else sha256_file(path)
                  for name, path in files.items()}
        manifest = {
            "tool": "weights_convert",
            "version": __version__,
            "source": {
                "weights": sources.description,
                "file": sources.weights.name,
                "sha256": source_sha,
                "layout": layout,
                "config": str(sources.config) if sources.config else "built-in moshi_7b preset",
            },
            "quantization": config_data["quantization"],
            "files": {name: {"sha256": hashes[name], "bytes": path.stat().st_size}
                      for name, path in sorted(files.items())},
        }
        _write_json(out / MANIFEST_NAME, manifest)
    except OSError as exc:
        raise WeightsError(f"cannot write into {out}: {exc.strerror or exc}") from None
    files[MANIFEST_NAME] = out / MANIFEST_NAME
    notes = []
    if sources.config is None:
        notes.append(f"no {CONFIG_NAME} with the source: used the released 7B LM config")
    for name, given in ((TOKENIZER_NAME, sources.tokenizer), (MIMI_NAME, sources.mimi)):
        if given is None:
            notes.append(f"no {name} with the source: not in the folder (--tokenizer, "
                         "--mimi-weight add them)")
    return ConversionResult(out, model_file, files, manifest, notes)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))
