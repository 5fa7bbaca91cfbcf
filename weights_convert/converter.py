"""Convert a checkpoint of any model family (Moshi, STT, CSM; any layout the loader reads)
into a local MLX model folder.

The folder holds the weights in our layout (the official MLX one for the Kyutai models): bf16
`model.safetensors`, or `model.q8.safetensors` / `model.q4.safetensors` quantized like the
official MLX files; the text tokenizer and the Mimi weights when the source has them; a
`config.json` (the source's config keys plus the quantization) and `manifest.json` (sha256 of
the source and of every output file). Names, layouts and quantization come from
`moshi_mlx.loading`: the converter runs the loader's own checks, sanitize and quantize.

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
from moshi_mlx.loading import hub
from moshi_mlx.loading.checkpoint import Checkpoint, inspect_checkpoint, sanitized
from moshi_mlx.loading.config import json_beside, read_config_json
from moshi_mlx.loading.families import DEFAULT_MODEL_TYPE, FAMILIES
from moshi_mlx.loading.quantization import (
    QUANTIZATIONS,
    Quantization,
    quantizable_weights,
    quantize_tensor,
)
from moshi_mlx.loading.safetensors import (
    PlannedTensor,
    SafetensorsStreamWriter,
    TensorReader,
    planned,
)
from moshi_mlx.models.layouts import FRAGMENT
from weights_convert import __version__

_PARTIAL_MARK = ".partial-"
# Names this tool writes; `--force` removes exactly these (and stale temporaries) first.
MANAGED_NAMES = {*hub.MODEL_FILES.values(), hub.MOSHI_TOKENIZER_NAME, hub.MIMI_NAME,
                 hub.CONFIG_NAME, hub.MANIFEST_NAME}


@dataclass
class Sources:
    weights: list[Path]  # one file, or a transformers checkpoint's shards
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
        sources = Sources(hub.model_files(hf_repo, None), description=hf_repo)
        sources.config = hub.optional_file(hf_repo, hub.CONFIG_NAME)
        _fetch_stt_preprocessor(hf_repo, sources.config)
        names = _extra_names(sources.config)
        sources.tokenizer = hub.optional_file(hf_repo, names["tokenizer"])
        sources.mimi = hub.optional_file(hf_repo, names["mimi"])
    else:
        weights = Path(input_path).expanduser()
        if weights.is_dir():
            raise WeightsError(f"{weights} is a folder: use --hf-repo for a model folder")
        if not weights.is_file():
            raise WeightsError(f"{weights}: no such file")
        sources = Sources([weights], description=str(weights))
        # Standard names beside the input file are taken along, like a repo's.
        sources.config = hub.optional_file(weights.parent, hub.CONFIG_NAME)
        for attr, filename in _extra_names(sources.config).items():
            setattr(sources, attr, hub.optional_file(weights.parent, filename))
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


def _fetch_stt_preprocessor(hf_repo: str, config: Path | None) -> None:
    """A transformers STT repo (kyutai/stt-*-trfs) keeps its stt_config in
    preprocessor_config.json, which the config mapping reads beside config.json: fetch it."""
    from moshi_mlx.models.lm_layouts import (
        TRANSFORMERS_STT_MODEL_TYPE,
        TRANSFORMERS_STT_PREPROCESSOR,
    )

    if config is not None and read_config_json(config).get("model_type") == \
            TRANSFORMERS_STT_MODEL_TYPE:
        hub.optional_file(hf_repo, TRANSFORMERS_STT_PREPROCESSOR)


def _extra_names(config: Path | None) -> dict[str, str]:
    """File names of the tokenizer and Mimi beside the weights: the config's own
    `tokenizer_name` / `mimi_name` (official STT configs have them), else the family's
    tokenizer (CSM: tokenizer.json) and Moshi's Mimi (CSM decodes with it too)."""
    from moshi_mlx.loading.config import config_model_type

    data = read_config_json(config) if config is not None else {}
    tokenizer = hub.TOKENIZER_NAMES.get(config_model_type(data), hub.MOSHI_TOKENIZER_NAME)
    return {"tokenizer": str(data.get("tokenizer_name") or tokenizer),
            "mimi": str(data.get("mimi_name") or hub.MIMI_NAME)}


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


class _Mapping:
    """Source tensors -> output tensors: the loader's sanitize (fragments joined), then
    quantization of the weights the family quantizes.

    The output is written in sorted name order, whatever the source layout, so every layout of
    the same weights gives the same bytes. Each output comes from a group of source tensors
    (usually one; the q/k/v projections of a transformers layer together), read when needed:
    memory holds one group at a time (a source tensor that fans out to several outputs, e.g.
    a stacked depformer matrix, is read again for outputs written apart)."""

    def __init__(self, checkpoint: Checkpoint, quantization: Quantization | None) -> None:
        self.checkpoint = checkpoint
        self.quantization = quantization
        self.quantizable = (quantizable_weights(checkpoint.family, checkpoint.config)
                            if quantization is not None else frozenset())
        files = checkpoint.files
        placeholders = files.placeholders()
        producers: dict[str, list[str]] = {}
        for name in files.in_file_order():
            mapped = checkpoint.family.sanitize({name: placeholders[name]}, checkpoint.config)
            for key in mapped:
                producers.setdefault(key.split(FRAGMENT)[0], []).append(name)
        self.group_of: dict[str, tuple[str, ...]] = {}  # output name -> its source names
        self.plan: list[PlannedTensor] = []
        for group in dict.fromkeys(tuple(names) for names in producers.values()):
            for key, array in self.outputs(group, placeholders).items():
                self.group_of[key] = group
                self.plan.append(planned(key, array))
        self.plan.sort(key=lambda entry: entry.name)

    def outputs(self, group: tuple[str, ...], arrays: dict[str, mx.array]
                ) -> dict[str, mx.array]:
        checkpoint = self.checkpoint
        out: dict[str, mx.array] = {}
        pairs = ((name, arrays[name]) for name in group)
        for key, array, _ in sanitized(checkpoint.family, checkpoint.config, pairs,
                                       checkpoint.name):
            if key in self.quantizable:
                out.update(quantize_tensor(key, array, self.quantization))
            else:
                out[key] = array
        return out


def plan_weights(mapping: _Mapping) -> list[PlannedTensor]:
    """Names, dtypes and shapes of every output tensor, in write order, without reading data:
    the same mapping runs on lazy placeholders that are never evaluated."""
    return mapping.plan


def write_weights(
    mapping: _Mapping,
    plan: list[PlannedTensor],
    f: BinaryIO,
    progress: Callable[[int], None] | None = None,
) -> str:
    """Stream the converted tensors of `plan` into `f`; returns the output's sha256."""
    writer = SafetensorsStreamWriter(f, plan)
    group: tuple[str, ...] = ()
    outputs: dict[str, mx.array] = {}
    with TensorReader(mapping.checkpoint.files) as source:
        for entry in plan:
            if mapping.group_of[entry.name] != group:
                group = mapping.group_of[entry.name]
                outputs = mapping.outputs(group, {name: source.read(name) for name in group})
            array = outputs[entry.name]
            mx.eval(array)
            writer.write(entry.name, array)
            if progress is not None:
                progress(entry.nbytes)
    return writer.finish()


def _refuse_overwriting_sources(out: Path, sources: Sources) -> None:
    """The output folder must not be where the inputs are (with --force they would be removed
    before being read)."""
    for path in (*sources.weights, sources.config, sources.tokenizer, sources.mimi):
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
    checkpoint = inspect_checkpoint(sources.weights, sources.config,
                                    model_types=tuple(FAMILIES))
    if checkpoint.quantization is not None:
        raise WeightsError(
            f"{checkpoint.name} is already {checkpoint.quantization.bits}-bit quantized; "
            "convert from a bf16 checkpoint"
        )

    out = Path(out_dir).expanduser()
    _refuse_overwriting_sources(out, sources)
    mapping = _Mapping(checkpoint, quantization)
    plan = plan_weights(mapping)
    prepare_out_dir(out, force)
    _check_free_space(out, sum(entry.nbytes for entry in plan) + _copied_bytes(sources))
    model_file = out / hub.MODEL_FILES[bits]
    names = _extra_names(sources.config)
    try:
        with _progress_bar(sum(entry.nbytes for entry in plan)) as bar, \
                atomic_file(model_file) as f:
            model_sha = write_weights(mapping, plan, f, bar.update)
        source_sha = checkpoint.files.sha256()
        files = {model_file.name: model_file}
        for attr, given in (("tokenizer", sources.tokenizer), ("mimi", sources.mimi)):
            if given is not None:
                copy_into(given, out / names[attr])
                files[names[attr]] = out / names[attr]
        config_data = _output_config(sources.config, checkpoint)
        config_data["moshi_name"] = model_file.name
        for attr, given in (("tokenizer", sources.tokenizer), ("mimi", sources.mimi)):
            if given is not None:
                config_data[f"{attr}_name"] = names[attr]
        config_data["quantization"] = (
            None if quantization is None
            else {"bits": quantization.bits, "group_size": quantization.group_size}
        )
        _write_json(out / hub.CONFIG_NAME, config_data)
        files[hub.CONFIG_NAME] = out / hub.CONFIG_NAME

        hashes = {name: model_sha if name == model_file.name else sha256_file(path)
                  for name, path in files.items()}
        manifest = {
            "tool": "weights_convert",
            "version": __version__,
            "source": {
                "weights": sources.description,
                "file": ", ".join(path.name for path in sources.weights),
                "sha256": source_sha,
                "model_type": checkpoint.model_type,
                "config": str(sources.config) if sources.config else "built-in default",
            },
            "quantization": config_data["quantization"],
            "files": {name: {"sha256": hashes[name], "bytes": path.stat().st_size}
                      for name, path in sorted(files.items())},
        }
        _write_json(out / hub.MANIFEST_NAME, manifest)
    except OSError as exc:
        raise WeightsError(f"cannot write into {out}: {exc.strerror or exc}") from None
    files[hub.MANIFEST_NAME] = out / hub.MANIFEST_NAME
    notes = []
    if sources.config is None:
        notes.append(f"no {hub.CONFIG_NAME} with the source: used the released 7B LM config")
    for attr, given in (("tokenizer", sources.tokenizer), ("mimi", sources.mimi)):
        if given is None:
            notes.append(f"no {names[attr]} with the source: not in the folder (--tokenizer, "
                         "--mimi-weight add them)")
    return ConversionResult(out, model_file, files, manifest, notes)


def _output_config(source: Path | None, checkpoint: Checkpoint) -> dict[str, Any]:
    """The source's config keys as they are (official keys we do not model survive), or
    the default config's; a non-default family is named."""
    if source is not None and not _is_transformers_config(read_config_json(source)):
        data = read_config_json(source)
        data.pop("quantization", None)  # ours, when re-converting our own output
        if hasattr(checkpoint.family, "complete_config"):  # e.g. CSM's flavors.json, inlined
            data = checkpoint.family.complete_config(data, json_beside(source))
    else:  # none, or a transformers one: the official keys of what was read
        data = checkpoint.config.to_dict()
    if checkpoint.model_type != DEFAULT_MODEL_TYPE:
        data["model_type"] = checkpoint.model_type
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_file(path) as f:
        f.write((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _is_transformers_config(data: dict[str, Any]) -> bool:
    """A transformers config.json (`architectures`, sub-configs): its keys are not the
    official ones our folders carry."""
    return "architectures" in data or "depth_decoder_config" in data
