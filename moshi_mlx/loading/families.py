"""The model families the loader knows, by model_type."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from moshi_mlx.errors import WeightsError

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


def describe(family: ModuleType, config: Any) -> str:
    """What a checkpoint of this family and config is, for messages ("Moshi LM")."""
    return family.describe(config) if hasattr(family, "describe") else family.DESCRIPTION


def family_module(model_type: str, source: str = "config") -> ModuleType:
    if model_type not in FAMILIES:
        raise WeightsError(f"{source}: unknown model_type {model_type!r} "
                           f"(supported: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[model_type])

