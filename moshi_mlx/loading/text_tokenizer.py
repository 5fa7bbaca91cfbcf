"""Text tokenizer files: a SentencePiece model (Moshi, Kyutai STT) read into its processor."""

from __future__ import annotations

import os
from typing import Any

from moshi_mlx.errors import WeightsError


def load_sentencepiece(path: str | os.PathLike) -> Any:
    """The `sentencepiece.SentencePieceProcessor` of a .model file; WeightsError (one line)
    when the file is not a SentencePiece model."""
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        raise WeightsError(f"{path} is not a SentencePiece model") from None
