"""User-facing errors: one clear line, raised instead of a deep library trace."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar


class MoshiError(Exception):
    """An error whose message is meant for the user, as one line."""


class WeightsError(MoshiError):
    """A weight file is missing, corrupt, or does not match what was asked for."""


class AudioError(MoshiError):
    """An audio file or device cannot be used."""


class TrainingDataError(MoshiError):
    """Fine-tuning data cannot be used: a missing or unreadable audio file, a data list or
    alignment file that does not parse, a data set with nothing to train on."""


class SlotError(MoshiError):
    """A stream of a fixed pool (batched transcription) is used wrongly: a closed slot, an
    ended stream."""


class NoFreeSlot(SlotError):
    """Every slot of a fixed pool of streams is taken."""

    def __init__(self, message: str = "no free channels") -> None:
        super().__init__(message)


class PromptError(MoshiError):
    """A Moshi prompt cannot be used: a voice prompt that is not audio or is silent, a text
    prompt longer than the context allows, a saved prompt state of another model."""


F = TypeVar("F", bound=Callable[..., int | None])


def cli_errors(main: F) -> F:
    """Wrap a CLI entry point: MoshiError -> 'error: ...' on stderr and exit code 1."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except MoshiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]
