"""config.json -> (family, config object): model_type, aliases, markers, quantization entry."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading import hub
from moshi_mlx.loading.families import (
    DEFAULT_MODEL_TYPE,
    FAMILIES,
    MODEL_TYPE_ALIASES,
    config_ignored,
    family_module,
    other_family_error,
)
from moshi_mlx.loading.quantization import QUANTIZATIONS, Quantization


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


def json_beside(config_path: str | os.PathLike | None) -> Callable[[str], dict[str, Any] | None]:
    """A reader of the JSON files beside a config.json, for the families' `complete_config`:
    name -> that file's JSON object, or None where there is no such file (or no path)."""

    def read(name: str) -> dict[str, Any] | None:
        if config_path is None:
            return None
        path = Path(config_path).parent / name
        return read_config_json(path) if path.is_file() else None

    return read


def config_beside(weights_path: Path) -> Path | None:
    """The config.json beside a weight file, unless that file is a released repo's whose
    config.json is not ours to read (PersonaPlex's, `families.config_ignored`)."""
    beside = weights_path.parent / hub.CONFIG_NAME
    if not beside.is_file() or config_ignored(hub.cached_repo(weights_path) or ""):
        return None
    return beside


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
    caller can use: a config of another family is one line naming the command that takes it."""
    if config is not None and not isinstance(config, (dict, str, os.PathLike)):
        for model_type in model_types:
            family = family_module(model_type)
            if isinstance(config, family.Config):
                found = _model_type_of(config, model_type)
                if found not in model_types:
                    raise other_family_error("the config describes", found, model_types)
                return ResolvedConfig(found, family, config, None, "config")
        raise WeightsError(f"config of type {type(config).__name__} is not a "
                           f"{'/'.join(model_types)} config")
    source, path = "config", None
    if isinstance(config, dict):
        data = dict(config)
    elif config is not None:
        path = Path(config)
    elif weights_path is not None and (beside := config_beside(weights_path)) is not None:
        path = beside
    if path is not None:
        data, source = read_config_json(path), str(path)
    elif not isinstance(config, dict):
        family = family_module(model_types[0])
        return ResolvedConfig(model_types[0], family, family.Config.default(), None, "default")
    model_type = _model_type_of_data(data, model_types)
    family = family_module(model_type, source)
    if all(family is not family_module(t) for t in model_types):
        raise other_family_error(f"{source} describes", model_type, model_types)
    if hasattr(family, "complete_config"):  # e.g. CSM: flavors.json beside a Sesame config
        data = family.complete_config(data, json_beside(path))
    quantization = _config_quantization(data.pop("quantization", None), source)
    parsed = family.Config.from_dict(data, source=source)
    model_type = _model_type_of(parsed, model_type)  # an LM config says moshi or stt itself
    if model_type not in model_types:
        raise other_family_error(f"{source} describes", model_type, model_types)
    return ResolvedConfig(model_type, family, parsed, quantization, source)


def config_model_type(data: dict[str, Any]) -> str:
    """The family a config.json mapping describes (moshi when nothing says otherwise)."""
    return _model_type_of_data(data, tuple(FAMILIES))


def _model_type_of_data(data: dict[str, Any], model_types: tuple[str, ...]) -> str:
    """config.json's `model_type` (or its alias), else the family whose `CONFIG_MARKERS` keys
    it has (a family module serving several model_types names its first), else the caller's
    first family."""
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

