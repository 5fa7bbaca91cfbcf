"""Prompted generation as transformers' `MoshiForConditionalGeneration.generate(input_ids,
moshi_audio_codes, user_audio_codes, ...)` runs it (issue 19, "Library"): the three streams
of a prompt forced frame by frame, then generation with a blank user stream.

transformers prepends one frame of initial tokens (the text initial token, the audio initial
token on both streams) and places the acoustic codebooks one frame late, as the delays place
generated ones; `prompts.force_frames` does exactly that on our `LmGen`. After the prompt the
user stream is the codes of a silent frame, repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE
from moshi_mlx.conversation.prompts import NUM_OWN_CODEBOOKS, force_frames


@dataclass(frozen=True)
class PromptedGeneration:
    """What transformers' generate returns (with return_audio_codes=True).

    sequences: [B, 1 + T + N] text ids: the initial token, the T prompt ids, N new ones.
    audio_codes: [B, 8, T + N - 1] Moshi's audio frames, delays undone: the T prompt frames
      (their last one with the codebooks the delays had not placed yet generated) and N - 1
      new ones.
    """

    sequences: np.ndarray
    audio_codes: np.ndarray


def silent_user_codes(codec: Any) -> np.ndarray:
    """[8] codes of one all-zero frame through a fresh streaming Mimi (the engine's `Codec`),
    what transformers feeds as the user's stream after a prompt."""
    codec.reset()
    try:
        codes = codec.encode(np.zeros(FRAME_SIZE, np.float32))
    finally:
        codec.reset()
    return np.asarray(codes).reshape(-1)[:NUM_OWN_CODEBOOKS].astype(np.int64)


def generate_prompted(gen: Any, input_ids: np.ndarray, moshi_audio_codes: np.ndarray,
                      user_audio_codes: np.ndarray, blank_user_codes: np.ndarray,
                      max_new_tokens: int) -> PromptedGeneration:
    """Force the prompt (input_ids [B, T], moshi_audio_codes and user_audio_codes [B, 8, T],
    synchronized per frame) through a fresh `gen` (an `LmGen`, reset here), then step
    max_new_tokens - 1 more frames with `blank_user_codes` ([8] or [B, 8]) as the user's
    stream, sampling with the generator's settings (greedy: temperatures 0)."""
    text = np.asarray(input_ids, np.int64)
    moshi = np.asarray(moshi_audio_codes, np.int64)
    user = np.asarray(user_audio_codes, np.int64)
    if text.ndim != 2 or moshi.shape != (text.shape[0], NUM_OWN_CODEBOOKS, text.shape[1]) \
            or user.shape != moshi.shape:
        raise ValueError(f"expected input_ids [B, T] and audio codes [B, 8, T], got "
                         f"{text.shape}, {moshi.shape}, {user.shape}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    batch, prompt = text.shape
    cfg = gen.cfg
    initial_audio = np.full((batch, NUM_OWN_CODEBOOKS, 1), cfg.audio_initial_token, np.int64)
    text = np.concatenate([np.full((batch, 1), cfg.text_initial_token, np.int64), text], 1)
    moshi = np.concatenate([initial_audio, moshi], axis=2)
    user = np.concatenate([initial_audio, user], axis=2)
    blank = np.broadcast_to(np.asarray(blank_user_codes, np.int64).reshape(-1, NUM_OWN_CODEBOOKS),
                            (batch, NUM_OWN_CODEBOOKS))

    # Column c (= step c's input) holds text c and Moshi's codebook k of frame c - delay_k;
    # step c - 1 sampled (or was forced to) it.
    text_columns = [text[:, 0]]
    audio_columns = [moshi[:, :, 0]]

    def record(_: int) -> None:
        text_columns.append(np.array(gen.state.text, np.int64))
        audio_columns.append(np.array(gen.state.last_audio_tokens, np.int64)[:, :NUM_OWN_CODEBOOKS])

    gen.reset()
    force_frames(gen, text, moshi, user, observe=record)
    for _ in range(max_new_tokens - 1):
        gen.step(blank)
        record(0)
    columns = np.stack(audio_columns, axis=2)  # [B, 8, 1 + T + N]
    delays = np.asarray(cfg.delays)[1: 1 + NUM_OWN_CODEBOOKS]
    frames = prompt + max_new_tokens - 1
    audio = np.stack([columns[:, k, 1 + d: 1 + d + frames] for k, d in enumerate(delays)],
                     axis=1)
    return PromptedGeneration(np.stack(text_columns, axis=1), audio)
