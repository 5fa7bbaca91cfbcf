"""The model families the loader knows: their contract (`ModelFamily`), what files each needs
and where the released ones are (`FamilyFiles`), and the registry (model_type -> module).

A family is a module in `moshi_mlx.models` that satisfies `ModelFamily`. Its `FILES` maps each
model_type it serves to the keyword arguments of a `FamilyFiles` (plain data, so that model
modules import nothing from the loader); `files_of(model_type)` gives the checked object.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading import hub

FAMILIES: dict[str, str] = {
    "moshi": "moshi_mlx.models.lm",
    "stt": "moshi_mlx.models.lm",
    "csm": "moshi_mlx.models.csm",
    "mimi": "moshi_mlx.models.mimi",
}


DEFAULT_MODEL_TYPE = "moshi"


# transformers' model_type of a family's checkpoints in its layout (the family's sanitize and
# Config.from_dict read that layout); "moshi" and "csm" are the same name in both.
MODEL_TYPE_ALIASES: dict[str, str] = {"kyutai_speech_to_text": "stt",
                                      "sesame": "csm"}  # mlx-audio's name for CSM

SENTENCEPIECE = "sentencepiece"  # a SentencePiece .model (Moshi, STT)
HUGGINGFACE = "huggingface"  # a Hugging Face tokenizer.json (CSM's Llama-3 one)


class FamilyConfig(Protocol):
    """A family's config type: built from a config.json mapping (any layout the family reads),
    or the config of a checkpoint that comes without one (which may refuse)."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Any: ...

    @classmethod
    def default(cls) -> Any: ...


@runtime_checkable
class ModelFamily(Protocol):
    """What a family module provides to the loader.

    - `Config` (see FamilyConfig) and `Model` (built from a Config; its parameter names are the
      layout we load);
    - `sanitize(weights, config)`: any supported layout -> our names, lazily, tensor by tensor;
    - `quant_predicate(path, module)`: which modules -q quantizes;
    - `DESCRIPTION` (for messages; a module may refine it with `describe(config)`) and
      `STORED_DTYPE` (the safetensors float dtype its checkpoints must use, or None for any);
    - `FILES`: model_type -> FamilyFiles keyword arguments.

    Optional hooks: `describe(config)`, `fit_layout(config, tensor_names, source)` (the config
    fitted to the checkpoint's tensor names before they are mapped), `fit_config(config,
    tensors)` (the config fitted to optional parts a checkpoint may or may not have),
    `complete_config(data, read_beside)` (config.json data completed from the files beside
    it, read by `read_beside(name)`), `keeps_stored_dtype(key)` (bf16 / f16 tensors kept as
    stored under float32 activations), `ROWS_FROM_FILE` (embedding weights left in the file,
    their rows read on lookup) and
    `CONFIG_MARKERS` (keys that identify its config.json when `model_type` is absent).
    """

    Config: type[FamilyConfig]
    Model: type
    DESCRIPTION: str
    STORED_DTYPE: str | None
    FILES: Mapping[str, Mapping[str, Any]]

    def sanitize(self, weights: dict[str, Any], config: Any) -> dict[str, Any]: ...

    def quant_predicate(self, path: str, module: Any) -> bool: ...


@dataclass(frozen=True)
class FamilyFiles:
    """The files of one model family and where its released checkpoints are.

    Files are found by `moshi_mlx.loading.resolve`: a config.json's `moshi_name` /
    `tokenizer_name` / `mimi_name` name them when present; the names below are the defaults.
    """

    model_type: str
    name: str  # in messages: "a Kyutai STT model"
    # Modules (`python -m ...`) that take this family's checkpoints; the first is named when
    # another command is given one.
    commands: tuple[str, ...]
    # variant (voice, size) -> -q -> released repo; the first variant is the default, and a -q
    # a variant has no repo for takes its bf16 repo (quantized while loading).
    repos: Mapping[str, Mapping[int | None, str]]
    # layout -> tensor-name prefixes that only checkpoints of this family in that layout have
    # (registry order settles overlaps: a Moshi checkpoint holds STT's temporal transformer too).
    layouts: Mapping[str, tuple[str, ...]]
    weights: Mapping[int | None, str] | None = None  # file by -q; None: hub.MODEL_FILES
    tokenizer: str | None = None  # SENTENCEPIECE, HUGGINGFACE, or None (no text)
    tokenizer_name: str | None = None  # when the config names none (HUGGINGFACE: tokenizer.json)
    codec: str | None = None  # the family of the codec it speaks through ("mimi")
    # Its released repos hold the codec; else, when a model's own files have none, the codec
    # family's default repo gives it.
    codec_in_repos: bool = True
    needs_config: bool = False  # no usable default config: a checkpoint needs its config.json
    bundled_prefixes: tuple[str, ...] = ()  # where other families' checkpoints carry this one
    # Released repos whose config.json does not describe their weights (PersonaPlex's: its
    # own loader never reads it): the config comes from the weights (`fit_layout`).
    repos_without_config: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return self.commands[0]

    def default_repo(self, variant: str | None = None, quantize: int | None = None) -> str:
        repos = self.repos[variant or next(iter(self.repos))]
        return repos.get(quantize, repos[None])

    def default_tokenizer_name(self) -> str | None:
        if self.tokenizer_name is None and self.tokenizer == HUGGINGFACE:
            return hub.TOKENIZER_JSON_NAME
        return self.tokenizer_name

    def weight_names(self) -> Mapping[int | None, str]:
        return self.weights or hub.MODEL_FILES

    def layout_of(self, tensor_names: Any) -> str | None:
        """The layout whose marker prefixes the names have, or None."""
        for layout, prefixes in self.layouts.items():
            if any(name.startswith(prefixes) for name in tensor_names):
                return layout
        return None


def describe(family: ModuleType, config: Any) -> str:
    """What a checkpoint of this family and config is, for messages ("Moshi LM")."""
    return family.describe(config) if hasattr(family, "describe") else family.DESCRIPTION


def family_module(model_type: str, source: str = "config") -> ModuleType:
    if model_type not in FAMILIES:
        raise WeightsError(f"{source}: unknown model_type {model_type!r} "
                           f"(supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])


@cache
def files_of(model_type: str) -> FamilyFiles:
    return FamilyFiles(model_type=model_type, **family_module(model_type).FILES[model_type])


def families_for(command: str) -> tuple[str, ...]:
    """The model_types a command takes, in registry order (the first is its default)."""
    return tuple(t for t in FAMILIES if command in files_of(t).commands)


def config_ignored(repo: str) -> bool:
    """A released repo whose config.json is not read (FamilyFiles.repos_without_config)."""
    return any(repo in files_of(t).repos_without_config for t in FAMILIES)


def model_type_of_tensors(tensor_names: Any) -> str | None:
    """The family whose layout markers a checkpoint's tensor names have, or None."""
    names = list(tensor_names)
    return next((t for t in FAMILIES if files_of(t).layout_of(names) is not None), None)


def other_family_error(what: str, found: str, wanted: tuple[str, ...],
                       noun: str = "model") -> WeightsError:
    """`what` ("x.safetensors is", "config.json describes") a `noun` of family `found`, which
    none of `wanted` is: one line naming the command that takes it."""
    names = " or ".join(files_of(t).name for t in wanted)
    spec = files_of(found)
    return WeightsError(f"{what} a {spec.name} {noun}, not a {names} {noun}; use "
                        f"python -m {spec.command}")
