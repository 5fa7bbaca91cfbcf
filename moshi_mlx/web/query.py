"""What a client asks for in the `/api/chat` URL: sampling settings, as Kyutai's web client
sends them (`?text_temperature=0.7&text_topk=25&audio_temperature=0.8&audio_topk=250&...`), and
a text prompt, as NVIDIA PersonaPlex's web client sends it (`&text_prompt=...`).

Only the parameters our sampler has are read; the others Kyutai's client sends (`pad_mult`,
`repetition_penalty`, `repetition_penalty_context`, `text_seed`, `audio_seed`, ...), the
`voice_prompt` file name PersonaPlex's client sends, and any unknown ones are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from moshi_mlx.web.limits import MAX_TEXT_PROMPT_CHARS

TEXT_PROMPT_PARAMETER = "text_prompt"


class QueryError(ValueError):
    """A sampling parameter whose value cannot be used."""


def _temperature(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name}={raw[:20]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise QueryError(f"{name}={raw[:20]!r}: expected a number >= 0 (0: greedy)")
    return value


def _top_k(name: str, raw: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        raise QueryError(f"{name}={raw[:20]!r} is not a number") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise QueryError(f"{name}={raw[:20]!r}: expected a whole number >= 0 (0: no cut)")
    return int(value)


# URL parameter -> (field of moshi_mlx.modules.sampling.SamplingSettings, parser)
SAMPLING_PARAMETERS = {
    "text_temperature": ("text_temp", _temperature),
    "text_topk": ("text_topk", _top_k),
    "audio_temperature": ("audio_temp", _temperature),
    "audio_topk": ("audio_topk", _top_k),
}


def sampling_overrides(query: Mapping[str, str]) -> dict[str, float | int]:
    """{SamplingSettings field: value} for the sampling parameters present in `query`.

    Raises QueryError (one short line) for a value that is not usable.
    """
    overrides: dict[str, float | int] = {}
    for name, (field, parse) in SAMPLING_PARAMETERS.items():
        raw = query.get(name)
        if raw is not None:
            overrides[field] = parse(name, raw)
    return overrides


def text_prompt(query: Mapping[str, str]) -> str | None:
    """The client's own text prompt, stripped; None when absent or blank (PersonaPlex's client
    always sends the parameter, empty for none): the server's prompt then applies.

    Raises QueryError over MAX_TEXT_PROMPT_CHARS characters.
    """
    raw = query.get(TEXT_PROMPT_PARAMETER)
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if len(text) > MAX_TEXT_PROMPT_CHARS:
        raise QueryError(f"{TEXT_PROMPT_PARAMETER} of {len(text)} characters: at most "
                         f"{MAX_TEXT_PROMPT_CHARS}")
    return text
