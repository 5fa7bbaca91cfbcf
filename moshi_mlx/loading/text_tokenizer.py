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


def printable_piece(tokenizer: Any, token: int, silent_ids: frozenset[int]) -> str | None:
    """The text a generated token prints ("▁" as a space); None for `silent_ids` (Moshi's PAD
    and EPAD), control, unknown and out-of-vocabulary ids."""
    if token < 0 or token in silent_ids or token >= tokenizer.get_piece_size():
        return None
    if tokenizer.is_control(token) or tokenizer.is_unknown(token):
        return None
    return tokenizer.id_to_piece(token).replace("\u2581", " ")
