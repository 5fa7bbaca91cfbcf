"""Which files a command loads: one resolution for every family and every command.

    resolve("moshi_mlx.local", quantize=4)                     # kyutai/moshiko-mlx-q4
    resolve("moshi_mlx.stt", "~/models/stt-q4", quantize=4)    # a weights_convert folder
    resolve("moshi_mlx.tts", weights="csm/model.safetensors", codec="mimi.safetensors")

A source is a file, a model folder or a Hugging Face repo id; without one (and without explicit
weights) it is the family's released repo for the variant and -q. Explicit files (--config,
--moshi-weight / --weights, --tokenizer, --mimi-weight) are taken as given; every other file is
looked up beside explicit weights, then in the source. A config.json names a folder's files
(`moshi_name`, `tokenizer_name`, `mimi_name`); the family's declaration gives the names it
does not (moshi_mlx.loading.families.FamilyFiles). The codec may also be bundled in the
checkpoint itself (transformers files) or, for a family whose repos hold none, come from the
codec family's released repo. The weights are checked from their header (family, tensors, -q)
before anything is loaded; a checkpoint of another family is one line naming its command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading import hub
from moshi_mlx.loading.config import config_beside, read_config_json
from moshi_mlx.loading.families import (
    FamilyFiles,
    config_ignored,
    families_for,
    files_of,
    model_type_of_tensors,
    other_family_error,
)

if TYPE_CHECKING:
    from moshi_mlx.loading.checkpoint import Checkpoint

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ResolvedFiles:
    model_type: str
    weights: list[Path]  # one file, or the shards of a transformers checkpoint
    config: Path | None  # None: the family's default config
    tokenizer: Path | None = None
    codec: Path | None = None  # Mimi's file (or the folder of a sharded one)
    quantize: int | None = None
    checkpoint: Checkpoint | None = field(default=None, repr=False)  # header-checked

    @property
    def weight(self) -> Path:
        """The weights as the loaders take them: the file, or a sharded checkpoint's folder."""
        return _one_path(self.weights)


def resolve(command: str, source: PathLike | None = None, *, variant: str | None = None,
            quantize: int | None = None, weights: PathLike | None = None,
            config: PathLike | None = None, tokenizer: PathLike | None = None,
            codec: PathLike | None = None, need_tokenizer: bool = True,
            need_codec: bool = True, required: bool = True) -> ResolvedFiles:
    """The files `command` (a module run with python -m) loads, checked before any loading.

    variant: which released model (a voice, a size) when no source is given. required=False
    (the converter): a missing tokenizer or codec is None instead of an error, and no released
    repo stands in for a missing source.
    """
    accepted = families_for(command)
    own = files_of(accepted[0])
    home = source
    if home is None and (weights is None or required):
        home = own.default_repo(variant, quantize)
    if weights is None and home is None:
        raise WeightsError("give the weights: a file, a model folder or a repo id")
    if own.model_type == "mimi":
        return _resolve_mimi(own, weights or home)
    from_home = weights is None or source is not None  # the source's config, else the weights'
    no_config = config is None and home is not None and config_ignored(str(home))
    config_path = None if no_config else _config(config, home if from_home else None,
                                                 own.needs_config and required)
    weight_files = _weight_files(weights, home, quantize, config_path)
    if config_path is None and config is None and not no_config:
        config_path = config_beside(weight_files[0])
    if config_path is None and all(files_of(t).needs_config for t in accepted):
        _refuse_other_family(weight_files, accepted)  # the config would not be the issue
        raise WeightsError(f"a {own.name} model needs its {hub.CONFIG_NAME}: there is none with "
                           f"{weight_files[0]}; pass --config")
    checkpoint = _checked(weight_files, config_path, accepted, quantize)
    spec = files_of(checkpoint.model_type)
    names = read_config_json(config_path) if config_path is not None else {}
    places = _local_places(weights, home)
    repo = None if home is None or Path(home).expanduser().exists() else str(home)
    found_tokenizer = found_codec = None
    if need_tokenizer and spec.tokenizer is not None:
        name = names.get(hub.TOKENIZER_NAME_KEY) or spec.default_tokenizer_name()
        found_tokenizer = _tokenizer(tokenizer, name, places, repo, required, config_path)
    if need_codec and spec.codec is not None:
        found_codec = _codec(spec, codec, names, places, repo, checkpoint, required)
    return ResolvedFiles(checkpoint.model_type, weight_files, config_path, found_tokenizer,
                         found_codec, quantize, checkpoint)


# --------------------------------------------------------------------------- weights, config


def _config(explicit: PathLike | None, home: PathLike | None, required: bool) -> Path | None:
    if explicit is not None:
        found: Path | None = hub.resolve_file(explicit, hub.CONFIG_NAME)
        location = explicit
    elif home is None:
        return None
    else:
        local = Path(home).expanduser().exists()
        found = (hub.resolve_file(home, hub.CONFIG_NAME) if required and not local
                 else hub.optional_file(home, hub.CONFIG_NAME))
        location = home
    if found is not None and not Path(location).expanduser().exists():
        _fetch_companions(location, found)
    return found


def _fetch_companions(repo: PathLike, config: Path) -> None:
    """Files a config reads beside itself, fetched with it from a repo: a transformers STT
    config keeps its stt_config in preprocessor_config.json (kyutai/stt-*-trfs)."""
    from moshi_mlx.models.lm_layouts import (
        TRANSFORMERS_STT_MODEL_TYPE,
        TRANSFORMERS_STT_PREPROCESSOR,
    )

    if read_config_json(config).get("model_type") == TRANSFORMERS_STT_MODEL_TYPE:
        hub.optional_file(repo, TRANSFORMERS_STT_PREPROCESSOR)


def _weight_files(explicit: PathLike | None, home: PathLike | None, quantize: int | None,
                  config: Path | None) -> list[Path]:
    """Explicit weights by the hub's file / folder / repo / -q policy; from a repo whose
    config.json names its weights (`moshi_name`: Kyutai's STT repos, bf16 only), that file."""
    if explicit is not None:
        return hub.model_files(explicit, quantize)
    assert home is not None
    named = read_config_json(config).get(hub.WEIGHTS_NAME_KEY) if config is not None else None
    if isinstance(named, str) and not Path(home).expanduser().exists():
        return [hub.resolve_file(home, named)]
    return hub.model_files(home, quantize)


def _checked(weights: list[Path], config: Path | None, accepted: tuple[str, ...],
             quantize: int | None) -> Checkpoint:
    from moshi_mlx.loading import checkpoint as checks  # its functions, looked up per call

    found = checks.inspect_checkpoint(weights, config, model_types=accepted)
    checks.check_requested_bits(found, quantize)
    return found


# --------------------------------------------------------------------------- tokenizer, codec


def _local_places(weights: PathLike | None, home: PathLike | None) -> list[Path]:
    """Local folders to find a model's other files in: the explicit weights', the source."""
    places: list[Path] = []
    for given in (weights, home):
        if given is None:
            continue
        path = Path(given).expanduser()
        folder = path if path.is_dir() else path.parent if path.is_file() else None
        if folder is not None and folder not in places:
            places.append(folder)
    return places


def _tokenizer(explicit: PathLike | None, name: str | None, places: list[Path],
               repo: str | None, required: bool, config: Path | None) -> Path | None:
    """The text tokenizer: explicit (a file, folder or repo), else `name` in the first place
    that has it."""
    if explicit is not None:
        return hub.resolve_file(explicit, name)
    if name is None:
        if not required:
            return None
        said = f"{config} names no" if config is not None else "no config.json names the"
        raise WeightsError(f"{said} text tokenizer ({hub.TOKENIZER_NAME_KEY}): pass --tokenizer")
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    if repo is not None:
        return hub.resolve_file(repo, name) if required else hub.optional_file(repo, name)
    if required:
        raise WeightsError(f"no text tokenizer {name} in {', '.join(map(str, places))}: pass "
                           "--tokenizer")
    return None


def _codec(spec: FamilyFiles, explicit: PathLike | None, names: dict[str, Any],
           places: list[Path], repo: str | None, checkpoint: Checkpoint,
           required: bool) -> Path | None:
    """The codec: explicit, else the file the config names (or the codec family's own name)
    in a local place, else the one bundled in the checkpoint, else from the source repo (when
    its repos hold one or its config names one), else the codec family's released repo."""
    codec_spec = files_of(spec.codec)
    if explicit is not None:
        return _one_path(hub.mimi_files(explicit)[0])
    named = names.get(hub.CODEC_NAME_KEY)
    name = named or codec_spec.weight_names()[None]
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    if any(key.startswith(codec_spec.bundled_prefixes) for key in checkpoint.files.owner):
        return _one_path([header.path for header in checkpoint.files.headers])
    if repo is not None and (spec.codec_in_repos or named):
        return hub.resolve_file(repo, name) if required else hub.optional_file(repo, name)
    if not required:
        return None
    if not spec.codec_in_repos:  # Sesame's repos: Kyutai's released Mimi
        return _one_path(hub.mimi_files(codec_spec.default_repo())[0])
    where = ", ".join(map(str, places)) or "the model's files"
    raise WeightsError(f"no {codec_spec.name} weights {name} in {where}: pass --mimi-weight")


def _resolve_mimi(spec: FamilyFiles, source: PathLike) -> ResolvedFiles:
    """Mimi's own file(s); a checkpoint of another family without a Mimi in it is refused."""
    files, config = hub.mimi_files(source)
    names = _tensor_names(files)
    inner = [n.split(".", 1)[1] if n.startswith(spec.bundled_prefixes) else n for n in names]
    if spec.layout_of(inner) is None:
        _refuse_other_family(files, (spec.model_type,), names)
    return ResolvedFiles(spec.model_type, files, config)


def _tensor_names(files: list[Path]) -> list[str]:
    from moshi_mlx.loading.safetensors import CheckpointFiles

    return list(CheckpointFiles.read(files).owner)


def _refuse_other_family(files: list[Path], accepted: tuple[str, ...],
                         names: list[str] | None = None) -> None:
    """Weights whose tensor names show a family none of `accepted` is: one line naming the
    command that takes them."""
    found = model_type_of_tensors(_tensor_names(files) if names is None else names)
    if found is not None and found not in accepted:
        raise other_family_error(f"{_one_path(files).name} is", found, accepted, "checkpoint")


def _one_path(files: list[Path]) -> Path:
    return files[0] if len(files) == 1 else files[0].parent
