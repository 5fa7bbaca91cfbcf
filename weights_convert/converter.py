"""Convert a checkpoint of any model family (Moshi, STT, CSM; any layout the loader reads)
into a local MLX model folder that the family's commands load with nothing else given.

The folder holds the weights in our layout (the official MLX one for the Kyutai models): bf16
`model.safetensors`, or `model.q8.safetensors` / `model.q4.safetensors` quantized like the
official MLX files; the text tokenizer and the Mimi weights when the source has them (a Mimi
bundled in a transformers checkpoint is taken out into `mimi.safetensors`); a `config.json`
(the source's config keys, the quantization, and the names of exactly the files the folder
holds) and `manifest.json` (sha256 of the source and of every output file). Which files go with
the weights comes from the loader's one resolution (`moshi_mlx.loading.resolve`); names,
layouts and quantization from `moshi_mlx.loading`: the converter runs the loader's own checks,
sanitize and quantize.

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
from moshi_mlx.loading.checkpoint import Checkpoint, sanitized
from moshi_mlx.loading.config import json_beside, read_config_json
from moshi_mlx.loading.families import (
    DEFAULT_MODEL_TYPE,
    FAMILIES,
    SENTENCEPIECE,
    FamilyFiles,
    describe,
    files_of,
)
from moshi_mlx.loading.quantization import (
    QUANTIZATIONS,
    Quantization,
    quantizable_weights,
    quantize_tensor,
)
from moshi_mlx.loading.resolve import ResolvedFiles, resolve
from moshi_mlx.loading.safetensors import (
    CheckpointFiles,
    PlannedTensor,
    SafetensorsStreamWriter,
    TensorReader,
    planned,
)
from moshi_mlx.models.layouts import FRAGMENT
from weights_convert import __version__

_PARTIAL_MARK = ".partial-"


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
) -> ResolvedFiles:
    """The checkpoint (header-checked) and the files that go with it, from a repo / folder or
    a local file (the files beside it are taken along, like a repo's), through the loader's
    one resolution: explicit files first, then the names config.json gives, then the family's
    own names; a codec bundled in a transformers checkpoint counts as its codec."""
    if (hf_repo is None) == (input_path is None):
        raise WeightsError("give exactly one of --hf-repo or --input")
    if input_path is not None:
        weights = Path(input_path).expanduser()
        if weights.is_dir():
            raise WeightsError(f"{weights} is a folder: use --hf-repo for a model folder")
        if not weights.is_file():
            raise WeightsError(f"{weights}: no such file")
    for value, option in ((config, "--config"), (tokenizer, "--tokenizer"),
                          (mimi_weight, "--mimi-weight")):
        if value is not None and not Path(value).expanduser().is_file():
            raise WeightsError(f"{Path(value).expanduser()}: no such file ({option})")
    return resolve("weights_convert", hf_repo, weights=input_path, config=config,
                   tokenizer=tokenizer, codec=mimi_weight, required=False)


def managed_names(out_dir: Path) -> set[str]:
    """Names this tool writes (`--force` removes exactly these, and stale temporaries): every
    family's, and those the folder's previous manifest lists."""
    names = {*hub.MODEL_FILES.values(), hub.CONFIG_NAME, hub.MANIFEST_NAME,
             hub.EXTRACTED_CODEC_NAME}
    for model_type in FAMILIES:
        spec = files_of(model_type)
        names.update(n for n in (spec.default_tokenizer_name(), *spec.weight_names().values())
                     if n is not None)
    try:
        names.update(json.loads((out_dir / hub.MANIFEST_NAME).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return names


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


def _adapter_record(adapter_path: str | os.PathLike) -> dict[str, str]:
    from moshi_mlx.training.moshi_lora import adapter_weights_file

    return {"path": str(adapter_path), "sha256": sha256_file(adapter_weights_file(adapter_path))}


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
    managed = managed_names(out_dir)
    for entry in entries:
        if entry.name in managed or _PARTIAL_MARK in entry.name:
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

    def __init__(self, checkpoint: Checkpoint, quantization: Quantization | None,
                 adapter_path: str | os.PathLike | None = None) -> None:
        self.checkpoint = checkpoint
        self.quantization = quantization
        self.deltas: dict[str, mx.array] = {}  # LoRA fused into these weights
        self.shapes: dict[str, tuple[int, ...]] = {}  # every output's shape before quantizing
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
        if adapter_path is not None:
            from moshi_mlx.training.moshi_lora import fuse_deltas

            self.deltas = fuse_deltas(adapter_path, self.shapes, checkpoint.model_type)

    def outputs(self, group: tuple[str, ...], arrays: dict[str, mx.array]
                ) -> dict[str, mx.array]:
        checkpoint = self.checkpoint
        out: dict[str, mx.array] = {}
        pairs = ((name, arrays[name]) for name in group)
        for key, array, _ in sanitized(checkpoint.family, checkpoint.config, pairs,
                                       checkpoint.name):
            self.shapes[key] = tuple(array.shape)
            if key in self.deltas:  # base + scale * B A, in float32, then stored as the base
                array = (array.astype(mx.float32) + self.deltas[key]).astype(array.dtype)
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


def _refuse_overwriting_sources(out: Path, inputs: list[Path]) -> None:
    """The output folder must not be where the inputs are (with --force they would be removed
    before being read)."""
    managed = managed_names(out)
    for path in inputs:
        if path.name in managed and out.is_dir() and path.resolve().parent == out.resolve():
            raise WeightsError(f"the output folder {out} holds the input {path.name}; "
                               "choose another --out")


@dataclass(frozen=True)
class _Extra:
    """A file that goes into the folder beside the weights: copied, or (a codec bundled in a
    transformers checkpoint) its tensors taken out under `bundled_prefix`."""

    name_key: str  # the config.json key that names it
    source: Path
    nbytes: int
    bundled_prefix: str | None = None


def _extras(files: ResolvedFiles, spec: FamilyFiles, names: dict[str, Any]
            ) -> tuple[dict[str, _Extra], dict[str, Any] | None]:
    """Output name -> the tokenizer and codec the folder gets, and the codec's transformers
    config when our Mimi defaults do not describe it."""
    extras: dict[str, _Extra] = {}
    if files.tokenizer is not None:
        name = (names.get(hub.TOKENIZER_NAME_KEY) or spec.default_tokenizer_name()
                or files.tokenizer.name)
        extras[name] = _Extra(hub.TOKENIZER_NAME_KEY, files.tokenizer,
                              files.tokenizer.stat().st_size)
    if files.codec is None:
        return extras, None
    codec_spec = files_of(spec.codec)
    tensors = files.checkpoint.files.tensors
    if files.codec == files.weight:  # bundled in the checkpoint
        prefix = next(p for p in codec_spec.bundled_prefixes
                      if any(name.startswith(p) for name in tensors))
        extras[hub.EXTRACTED_CODEC_NAME] = _Extra(
            hub.CODEC_NAME_KEY, files.codec,
            sum(info.nbytes for name, info in tensors.items() if name.startswith(prefix)),
            prefix)
        return extras, _codec_config(files.config)
    if files.codec.is_dir():
        raise WeightsError(f"{files.codec}: a sharded {codec_spec.name} cannot go into the "
                           "folder; pass one file with --mimi-weight")
    name = names.get(hub.CODEC_NAME_KEY) or codec_spec.weight_names()[None]
    extras[name] = _Extra(hub.CODEC_NAME_KEY, files.codec, files.codec.stat().st_size)
    return extras, _codec_config_beside(files.codec)


def _codec_config(config: Path | None) -> dict[str, Any] | None:
    """The transformers Mimi config that a config.json holds for the codec bundled in its
    checkpoint (transformers: `audio_encoder_config`, `codec_config`), else None."""
    if config is None:
        return None
    return next((value for value in read_config_json(config).values()
                 if isinstance(value, dict) and value.get("model_type") == "mimi"), None)


def _codec_config_beside(codec: Path) -> dict[str, Any] | None:
    """The transformers config of a Mimi file, when the config.json beside it describes it: a
    transformers Mimi folder's own, or a converted folder's `codec_config` for its codec."""
    beside = codec.parent / hub.CONFIG_NAME
    if not beside.is_file():
        return None
    data = read_config_json(beside)
    if data.get("model_type") == "mimi":
        return data
    described = data.get(hub.CODEC_CONFIG_KEY)
    if data.get(hub.CODEC_NAME_KEY) == codec.name and isinstance(described, dict):
        return described
    return None


def write_bundled_codec(files: CheckpointFiles, prefix: str, f: BinaryIO) -> str:
    """The tensors under `prefix` (the codec a transformers checkpoint bundles), without it,
    as they are; returns the output's sha256."""
    names = [name for name in files.in_file_order() if name.startswith(prefix)]
    tensors = files.tensors
    plan = [PlannedTensor(name[len(prefix):], tensors[name].dtype, tensors[name].shape)
            for name in names]
    writer = SafetensorsStreamWriter(f, plan)
    with TensorReader(files) as source:
        for name in names:
            writer.write(name[len(prefix):], source.read(name))
    return writer.finish()


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
    adapter_path: str | os.PathLike | None = None,
) -> ConversionResult:
    """Convert a Moshi, STT or CSM checkpoint into the model folder `out_dir` (see module
    docstring).

    bits: None for bf16, 4 (group 32) or 8 (group 64). adapter_path: a LoRA adapter folder
    (adapters.safetensors + adapter_config.json) fused into the weights before quantization,
    or for Moshi moshi-finetune's lora.safetensors (or its folder, with config.json).
    All input problems raise WeightsError before anything is written.
    """
    if bits is not None and bits not in QUANTIZATIONS:
        raise WeightsError(f"-q must be 4 or 8 (or absent for bf16), got {bits}")
    quantization = QUANTIZATIONS[bits] if bits is not None else None
    sources = find_sources(hf_repo, input_path, config, tokenizer, mimi_weight)
    checkpoint: Checkpoint = sources.checkpoint
    if checkpoint.quantization is not None:
        raise WeightsError(
            f"{checkpoint.name} is already {checkpoint.quantization.bits}-bit quantized; "
            "convert from a bf16 checkpoint"
        )
    spec = files_of(checkpoint.model_type)
    names = read_config_json(sources.config) if sources.config is not None else {}
    extras, codec_config = _extras(sources, spec, names)

    out = Path(out_dir).expanduser()
    _refuse_overwriting_sources(out, [*sources.weights, *([sources.config] if sources.config
                                                          else []),
                                      *(extra.source for extra in extras.values())])
    mapping = _Mapping(checkpoint, quantization, adapter_path)
    plan = plan_weights(mapping)
    prepare_out_dir(out, force)
    _check_free_space(out, sum(entry.nbytes for entry in plan)
                      + sum(extra.nbytes for extra in extras.values()))
    model_file = out / hub.MODEL_FILES[bits]
    try:
        with _progress_bar(sum(entry.nbytes for entry in plan)) as bar, \
                atomic_file(model_file) as f:
            model_sha = write_weights(mapping, plan, f, bar.update)
        source_sha = checkpoint.files.sha256()
        files = {model_file.name: model_file}
        hashes = {model_file.name: model_sha}
        config_data = _output_config(sources.config, checkpoint)
        config_data[hub.WEIGHTS_NAME_KEY] = model_file.name
        for name, extra in extras.items():
            if extra.bundled_prefix is None:
                copy_into(extra.source, out / name)
            else:
                with atomic_file(out / name) as f:
                    hashes[name] = write_bundled_codec(checkpoint.files, extra.bundled_prefix, f)
            files[name] = out / name
            config_data[extra.name_key] = name
        if codec_config is not None:
            config_data[hub.CODEC_CONFIG_KEY] = codec_config
        config_data["quantization"] = (
            None if quantization is None
            else {"bits": quantization.bits, "group_size": quantization.group_size}
        )
        _write_json(out / hub.CONFIG_NAME, config_data)
        files[hub.CONFIG_NAME] = out / hub.CONFIG_NAME

        for name, path in files.items():
            hashes.setdefault(name, sha256_file(path))
        manifest = {
            "tool": "weights_convert",
            "version": __version__,
            "source": {
                "weights": hf_repo if hf_repo is not None else str(input_path),
                "file": ", ".join(path.name for path in sources.weights),
                "sha256": source_sha,
                "model_type": checkpoint.model_type,
                "config": str(sources.config) if sources.config else "built-in default",
            },
            "quantization": config_data["quantization"],
            **({"adapter": _adapter_record(adapter_path)} if adapter_path else {}),
            "files": {name: {"sha256": hashes[name], "bytes": path.stat().st_size}
                      for name, path in sorted(files.items())},
        }
        _write_json(out / hub.MANIFEST_NAME, manifest)
    except OSError as exc:
        raise WeightsError(f"cannot write into {out}: {exc.strerror or exc}") from None
    files[hub.MANIFEST_NAME] = out / hub.MANIFEST_NAME
    return ConversionResult(out, model_file, files, manifest,
                            _notes(sources, checkpoint, spec, names))


def _notes(sources: ResolvedFiles, checkpoint: Checkpoint, spec: FamilyFiles,
           names: dict[str, Any]) -> list[str]:
    """What the source lacked (the folder goes without it), and the option that adds it."""
    notes = []
    if sources.config is None:
        notes.append(f"no {hub.CONFIG_NAME} with the source: it was read against the default "
                     f"{describe(checkpoint.family, checkpoint.config)} config")
    if spec.tokenizer is not None and sources.tokenizer is None:
        name = names.get(hub.TOKENIZER_NAME_KEY) or spec.default_tokenizer_name()
        kind = name or ("a SentencePiece .model" if spec.tokenizer == SENTENCEPIECE
                        else hub.TOKENIZER_JSON_NAME)
        notes.append(f"no text tokenizer ({kind}) with the source: the folder has none "
                     "(--tokenizer adds it)")
    if spec.codec is not None and sources.codec is None:
        named = names.get(hub.CODEC_NAME_KEY)
        what = files_of(spec.codec).name + (f" weights ({named})" if named else " weights")
        notes.append(f"no {what} with the source: the folder has none (--mimi-weight adds it)")
    return notes


def _output_config(source: Path | None, checkpoint: Checkpoint) -> dict[str, Any]:
    """The source's config keys as they are (official keys we do not model survive), or
    the default config's; a non-default family is named. The keys that name or describe a
    folder's files are left out: the converter writes those for the files it writes."""
    if source is not None and not _is_transformers_config(read_config_json(source)):
        data = read_config_json(source)
        data.pop("quantization", None)  # ours, when re-converting our own output
        if hasattr(checkpoint.family, "complete_config"):  # e.g. CSM's flavors.json, inlined
            data = checkpoint.family.complete_config(data, json_beside(source))
    else:  # none, or a transformers one: the official keys of what was read
        data = checkpoint.config.to_dict()
    if hasattr(checkpoint.family, "layout_keys"):  # found in the tensors (PersonaPlex)
        data.update(checkpoint.family.layout_keys(checkpoint.config))
    for key in (hub.WEIGHTS_NAME_KEY, hub.TOKENIZER_NAME_KEY, hub.CODEC_NAME_KEY,
                hub.CODEC_CONFIG_KEY):
        data.pop(key, None)
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
