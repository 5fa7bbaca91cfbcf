"""Streaming generation with a Kyutai STT LM: one `SttGen.step` per 80 ms Mimi frame."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from moshi_mlx.models.lm import Lm
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.models.lm_state import LmStreamState
from moshi_mlx.modules.sampling import Sampler


def initial_tokens(cfg: LmConfig) -> np.ndarray:
    """The tokens official step 0 reads: text `text_initial_token`, then every audio codebook's
    `audio_initial_token` (int32 [1 + n_q])."""
    return np.array([cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q,
                    dtype=np.int32)


class SttGen:
    """Streaming Kyutai STT: one Mimi frame (all n_q codebooks) in, one text token out.

    Timing is the one of the official Rust/MLX/transformers generators (timing B of the
    fixtures): official step 0 reads only the initial tokens (text `text_card`, audio `card`)
    and runs in `reset()` (its outputs: `initial_text`, `initial_vad`); `step(frame t)` runs
    official step t + 1, which reads frame t and the text token of the step before, and
    returns that step's token. Attention sees the current step and the `context - 1` before it
    (a ring of `context` keys per layer: constant memory for any length). Batch rows are
    independent streams; their streaming state is `state` (an `LmStreamState`, new at every
    `reset`).
    """

    def __init__(self, lm: Lm, temp: float = 0.0, seed: int | None = None, top_k: int = 50,
                 batch_size: int = 1, compile: bool = True) -> None:
        if not lm.cfg.is_stt:
            raise ValueError(f"SttGen needs a speech-to-text LM (dep_q 0), this one has "
                             f"dep_q {lm.cfg.dep_q}")
        self.lm = lm
        self.cfg = lm.cfg
        self.sampler = Sampler(temp, top_k)
        self.seed = seed
        self.compile = compile
        self.has_vad = lm.cfg.extra_heads_num_heads > 0
        self.reset(batch_size)

    def reset(self, batch_size: int | None = None) -> None:
        """Start new streams (same seed -> same samples again) and run official step 0."""
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            self.batch_size = batch_size
        cfg = self.cfg
        self._state = LmStreamState.start(self.lm, self.seed)
        initial = initial_tokens(cfg)
        tokens = mx.array(np.broadcast_to(initial, (self.batch_size, initial.size)))
        self.initial_text, self.initial_vad = self._run(tokens)

    @property
    def state(self) -> LmStreamState:
        """The streams' state (read it; `step` and `reset` change it)."""
        return self._state

    def _run(self, tokens: mx.array) -> tuple[mx.array, mx.array | None]:
        state = self._state
        hidden, logits = self.lm.temporal(tokens, state.caches, compiled=self.compile)
        if self.sampler.greedy:
            text = self.sampler(logits, None)
        else:
            state.key, draw = mx.random.split(state.key)
            text = self.sampler(logits, draw)
        vad = self.lm.extra_head_probs(hidden) if self.has_vad else None
        state.text, state.text_logits = text, logits
        outputs = [text, state.key] + ([] if vad is None else [vad])
        for cache in state.caches:
            outputs += [cache.keys, cache.values]
        mx.eval(outputs)  # the one host sync of a step
        return text, vad

    def step(self, codes) -> tuple[mx.array, mx.array | None]:
        """codes int [B, n_q]: Mimi frame t of every stream -> (text token [B] of official step
        t + 1, VAD [B, heads, classes] softmax of the extra heads, or None without heads)."""
        frame = mx.array(codes).astype(mx.int32)
        if frame.ndim != 2 or frame.shape[1] != self.cfg.n_q:
            raise ValueError(f"codes must be [B, {self.cfg.n_q}], got {tuple(frame.shape)}")
        if frame.shape[0] != self.batch_size:
            if self._state.steps:
                raise ValueError(f"these streams have batch size {self.batch_size}, got "
                                 f"{frame.shape[0]} rows (reset to change it)")
            self.reset(frame.shape[0])
        state = self._state
        tokens = mx.concatenate([state.text[:, None], frame], axis=1)
        state.steps += 1
        return self._run(tokens)
