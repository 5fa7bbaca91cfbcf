"""The streaming state of an `Lm`: what one batch of streams carries from one step to the next.

Both generators that drive the LM step by step (`conversation.lm_gen.LmGen` for Moshi,
`transcription.stt_gen.SttGen` for Kyutai STT) keep their streams in an `LmStreamState`, made
fresh by their `reset()` and read through their `state` property. The generator owns the step
logic and updates the fields in place; everyone else only reads them (`gen.state.steps`,
`gen.state.text_logits`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx

from moshi_mlx.modules.cache import KVCache
from moshi_mlx.modules.sampling import new_key

if TYPE_CHECKING:
    from moshi_mlx.models.lm import Lm


@dataclass(eq=False, slots=True)
class LmStreamState:
    """One batch of LM streams (batch rows are independent streams)."""

    caches: list[KVCache]  # the temporal transformer's keys/values, one cache per layer
    key: mx.array  # PRNG key of the next step's draws
    steps: int = 0  # `step()` calls since the state was made
    text: mx.array | None = None  # [B] text token of the last step (read by the next one)
    text_logits: mx.array | None = None  # [B, text_card] logits of the last step
    # Moshi only (empty / None for STT). The newest max_delay + 1 entries, oldest first, of
    # the audio tokens the depformer sampled [B, dep_q] (before the delays are undone) and
    # of the user's frames [B, num_user]; the audio logits of the last step, per codebook.
    audio_tokens: list[mx.array] = field(default_factory=list)
    user_codes: list[mx.array] = field(default_factory=list)
    audio_logits: list[mx.array] | None = None
    # dep_q 16 (PersonaPlex) only: the model's predictions of the user's codebooks [B,
    # num_user], newest max_delay + 1 steps, oldest first (before the delays are undone), and
    # what the last step leaves for its user slices, which run at the next step (they read
    # that step's user frame): (hidden, the token the first one reads, the depformer's cache
    # arrays, the step's PRNG keys).
    user_predicted: list[mx.array] = field(default_factory=list)
    user_slices_pending: tuple | None = None

    @classmethod
    def start(cls, lm: Lm, seed: int | None) -> LmStreamState:
        """Empty caches and the first key of `seed` (same seed -> same draws again)."""
        return cls(lm.make_cache(), new_key(seed))

    @property
    def last_audio_tokens(self) -> mx.array | None:
        """[B, dep_q]: the audio tokens the depformer sampled at the last step (Moshi)."""
        return self.audio_tokens[-1] if self.audio_tokens else None
