"""Moshi, Mimi and Sesame CSM in MLX. Public names are imported lazily (`import moshi_mlx` is
cheap)."""

from __future__ import annotations

import importlib
from typing import Any

from moshi_mlx.cli.blas import load_system_openblas

__version__ = "0.1.0"

# Before any submodule imports MLX: on Linux its CPU matrix products then use an installed
# OpenBLAS instead of the wheel's reference BLAS (see moshi_mlx.cli.blas).
load_system_openblas()

_EXPORTS = {
    "MoshiError": "moshi_mlx.errors",
    "WeightsError": "moshi_mlx.errors",
    "AudioError": "moshi_mlx.errors",
    "NoFreeSlot": "moshi_mlx.errors",
    "Mimi": "moshi_mlx.models.mimi",
    "MimiConfig": "moshi_mlx.models.mimi",
    "MimiStream": "moshi_mlx.models.mimi",
    "load_mimi": "moshi_mlx.loading.models",
    "LmConfig": "moshi_mlx.models.lm_config",
    "Lm": "moshi_mlx.models.lm",
    "load_lm": "moshi_mlx.loading.models",
    "LmGen": "moshi_mlx.conversation.lm_gen",
    "TextGenerator": "moshi_mlx.conversation.text_gen",
    "SttGen": "moshi_mlx.transcription.stt_gen",
    "Transcriber": "moshi_mlx.transcription.transcriber",
    "SttSlots": "moshi_mlx.transcription.slots",
    "load_transcriber": "moshi_mlx.transcription.loader",
    "read_audio": "moshi_mlx.audio.io",
    "load_sentencepiece": "moshi_mlx.loading.text_tokenizer",
    "Transcript": "moshi_mlx.transcription.transcriber",
    "Csm": "moshi_mlx.models.csm",
    "CsmConfig": "moshi_mlx.models.csm",
    "load_csm": "moshi_mlx.loading.models",
    "CsmTokenizer": "moshi_mlx.speech.generate",
    "load_tokenizer": "moshi_mlx.speech.generate",
    "Segment": "moshi_mlx.speech.generate",
    "generate_speech": "moshi_mlx.speech.generate",
    "stream_speech": "moshi_mlx.speech.generate",
    "stream_long_speech": "moshi_mlx.speech.generate",
    "ContextCache": "moshi_mlx.speech.generate",
    "frames_to_audio": "moshi_mlx.speech.generate",
    "stream_audio": "moshi_mlx.speech.generate",
    "stream_decoded": "moshi_mlx.speech.generate",
    "StopRules": "moshi_mlx.speech.stopping",
    "SpeechRequest": "moshi_mlx.speech.batch",
    "generate_batch": "moshi_mlx.speech.batch",
    "stream_batch": "moshi_mlx.speech.batch",
    "voice_from_recording": "moshi_mlx.speech.recordings",
    "save_voice": "moshi_mlx.speech.voices",
    "load_voice": "moshi_mlx.speech.voices",
    "list_voices": "moshi_mlx.speech.voices",
    "PromptError": "moshi_mlx.errors",
    "MoshiPrompt": "moshi_mlx.conversation.prompts",
    "generate_prompted": "moshi_mlx.conversation.prompted",
    "PromptedGeneration": "moshi_mlx.conversation.prompted",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moshi_mlx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
