"""Prompt phases before a Moshi conversation (issue 19): a voice prompt, a text prompt.

The contract (lead, 2026-12-07): the names and signatures below and the Engine methods listed
at the end are what the front ends (local, local_web, /api/chat) call. Change a signature
only with the lead.

The phases (NVIDIA PersonaPlex's `LMGen.step_system_prompts`, our own code), every stream
forced, one LM step per 80 ms frame:
  1. voice: the recording normalized to VOICE_PROMPT_LUFS, Mimi-encoded into Moshi's own audio
     stream; text = PAD; user stream = SINE_TOKENS;
  2. PROMPT_SILENCE_S of silence: Moshi's stream = SILENCE_TOKENS, text PAD, user SINE;
  3. the text prompt, one token per frame (wrapped in system tags when the model uses them);
     Moshi's stream SILENCE, user SINE;
  4. PROMPT_SILENCE_S of silence again.
Frame 0 (the voice's first, else the first silence frame) is never seen: as in NVIDIA's code,
the first step reads the initial tokens (see `force_frames`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moshi_mlx.audio.loudness import normalize_loudness
from moshi_mlx.audio.rates import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import PromptError

# Hard-coded Mimi codes (made for the released Mimi), as PersonaPlex uses them.
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
PROMPT_SILENCE_S = 0.5  # each silence phase: int(0.5 * 12.5) = 6 frames
VOICE_PROMPT_LUFS = -24.0
SYSTEM_TAG = "<system>"
SILENCE_FRAMES = int(PROMPT_SILENCE_S * FRAME_RATE)
NUM_OWN_CODEBOOKS = 8  # Moshi's own audio stream (the voice, SILENCE_TOKENS) and the user's
DEFAULT_TEXT_PAD = 3  # the text PAD of the released models (their `existing_text_padding_id`)


@dataclass(frozen=True)
class MoshiPrompt:
    """What runs before the conversation. Every field is optional; an empty prompt runs no
    phase at all (the conversation starts from silence, as without prompts).

    text: the text prompt as the user wrote it (system tags are added by the phases when the
      model uses them, see `wrap_with_system_tags`).
    voice_pcm: a 24 kHz mono float32 recording, NOT yet loudness-normalized (the phases
      normalize it).
    voice_codes: [8, T] int Mimi codes of a voice already encoded (instead of voice_pcm).
    """

    text: str | None = None
    voice_pcm: np.ndarray | None = None
    voice_codes: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.text and self.voice_pcm is None and self.voice_codes is None


def wrap_with_system_tags(text: str) -> str:
    """`text` stripped, inside "<system> ... <system>" unless it already starts and ends with
    the tag."""
    cleaned = text.strip()
    if cleaned.startswith(SYSTEM_TAG) and cleaned.endswith(SYSTEM_TAG):
        return cleaned
    return f"{SYSTEM_TAG} {cleaned} {SYSTEM_TAG}"


def prompt_text_tokens(text: str | None, tokenizer: Any, system_tags: bool) -> list[int]:
    """The text prompt's SentencePiece ids (no BOS / EOS), wrapped in system tags when the
    model uses them; [] for no text."""
    if not text or not text.strip():
        return []
    return list(tokenizer.encode(wrap_with_system_tags(text) if system_tags else text.strip()))


def voice_frames(pcm: np.ndarray) -> np.ndarray:
    """A voice recording (24 kHz mono) normalized to VOICE_PROMPT_LUFS and cut into frames
    [n, FRAME_SIZE] (the last one zero-padded). PromptError when it is not mono audio, is
    shorter than a loudness block, or is silent."""
    pcm = np.asarray(pcm)
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1 or pcm.size == 0 or not np.issubdtype(pcm.dtype, np.floating):
        raise PromptError(f"the voice prompt is not mono audio samples (got {pcm.dtype} "
                          f"{pcm.shape})")
    if not np.isfinite(pcm).all():
        raise PromptError("the voice prompt holds NaN or infinite samples")
    try:
        normalized = normalize_loudness(pcm.astype(np.float32), SAMPLE_RATE, VOICE_PROMPT_LUFS)
    except ValueError as exc:
        raise PromptError(f"the voice prompt cannot be used: {exc}") from None
    padded = np.zeros(-(-normalized.size // FRAME_SIZE) * FRAME_SIZE, np.float32)
    padded[: normalized.size] = normalized
    return padded.reshape(-1, FRAME_SIZE)


def encode_voice(pcm: np.ndarray, codec: Any) -> np.ndarray:
    """Voice codes [8, T]: `voice_frames(pcm)` through the streaming Mimi `codec`."""
    return encode_frames(voice_frames(pcm), codec)


def encode_frames(frames: np.ndarray, codec: Any) -> np.ndarray:
    """Codes [8, n] of frames [n, FRAME_SIZE] through the streaming Mimi `codec` (the
    engine's `Codec`: one frame at a time), from a fresh state, reset again after."""
    codec.reset()
    try:
        codes = [np.asarray(codec.encode(frame)).reshape(-1)[:NUM_OWN_CODEBOOKS]
                 for frame in frames]
    finally:
        codec.reset()
    return np.stack(codes, axis=1).astype(np.int64)


@dataclass(frozen=True)
class PromptFrames:
    """Every stream of the prompt, frame by frame: text [F], Moshi's audio [8, F], the user's
    audio [8, F]; `phases` names the consecutive runs of frames ((name, count), ...)."""

    text: np.ndarray
    moshi: np.ndarray
    user: np.ndarray
    phases: tuple[tuple[str, int], ...]

    @property
    def count(self) -> int:
        return int(self.text.shape[0])


def phase_frames(text_tokens: Sequence[int], voice_codes: np.ndarray | None,
                 text_pad: int = DEFAULT_TEXT_PAD) -> PromptFrames:
    """The four phases as frames (NVIDIA PersonaPlex's order): the voice (its codes, text
    PAD, user SINE), silence, the text prompt (one token a frame, Moshi SILENCE, user SINE),
    silence. A phase with nothing to say (no voice, no text) has no frames."""
    sine = np.array(SINE_TOKENS, np.int64)[:, None]
    silence = np.array(SILENCE_TOKENS, np.int64)[:, None]
    texts, moshis, phases = [], [], []

    def add(name: str, text: np.ndarray, moshi: np.ndarray) -> None:
        if text.size:
            texts.append(text)
            moshis.append(moshi)
            phases.append((name, int(text.size)))

    voice = np.zeros((NUM_OWN_CODEBOOKS, 0), np.int64) if voice_codes is None else \
        np.asarray(voice_codes, np.int64).reshape(NUM_OWN_CODEBOOKS, -1)
    add("voice", np.full(voice.shape[1], text_pad, np.int64), voice)
    add("silence", np.full(SILENCE_FRAMES, text_pad, np.int64),
        np.repeat(silence, SILENCE_FRAMES, axis=1))
    tokens = np.asarray(list(text_tokens), np.int64)
    add("text", tokens, np.repeat(silence, tokens.size, axis=1))
    add("silence", np.full(SILENCE_FRAMES, text_pad, np.int64),
        np.repeat(silence, SILENCE_FRAMES, axis=1))
    text = np.concatenate(texts)
    return PromptFrames(text, np.concatenate(moshis, axis=1),
                        np.repeat(sine, text.size, axis=1), tuple(phases))


def force_frames(gen: Any, text: np.ndarray, moshi: np.ndarray, user: np.ndarray,
                 observe: Callable[[int], None] | None = None) -> None:
    """Run F steps of a fresh `LmGen` with every stream forced: text [B, F], Moshi's audio
    [B, 8, F], the user's audio [B, 8, F] (frame f of every stream is the frame at time f).

    The frames are placed as the delays place generated ones (NVIDIA's cache placement):
    step t reads frame t (the initial tokens where a stream's delay covers it, so frame 0
    and a delayed codebook's first frames are never seen) and is made to "sample" what
    frame t + 1 holds, codebook k of Moshi's audio at frame t + 1 - delay_k. The last step
    forces only Moshi's delayed codebooks (their frame F - 1); its text and undelayed codes
    are sampled: they are the conversation's first. Afterwards `gen.state.steps` == F, and
    the conversation's first user frame is frame F. `observe(t)` runs after each step."""
    state = gen.state
    if state.steps != 0:
        raise ValueError("prompt frames are forced from a fresh generator (reset it first)")
    text = np.asarray(text, np.int64)
    moshi = np.asarray(moshi, np.int64)
    user = np.asarray(user, np.int64)
    batch, count = text.shape
    cfg = gen.cfg
    own = moshi.shape[1]
    delays = np.asarray(cfg.delays)
    own_delays = delays[1: 1 + own]
    initial = cfg.audio_initial_token
    for t in range(count):
        column = t + 1
        force_text = text[:, column] if column < count else np.full(batch, -1)
        force_audio = np.full((batch, cfg.dep_q), -1, np.int64)
        for k, delay in enumerate(own_delays):
            source = column - delay
            if column <= delay:
                force_audio[:, k] = initial
            elif source < count:
                force_audio[:, k] = moshi[:, k, source]
        gen.step(user[:, :, t], force_text=force_text, force_audio=force_audio)
        if observe is not None:
            observe(t)


def run_phases(gen: Any, frames: PromptFrames,
               observe: Callable[[int], None] | None = None) -> None:
    """The prompt phases on a fresh `LmGen` (batch 1): `force_frames` of `frames`."""
    force_frames(gen, frames.text[None], frames.moshi[None], frames.user[None], observe)


# Engine methods the front ends call (in conversation/engine.py):
#   Engine.set_prompt(prompt: MoshiPrompt) -> None
#       run the phases now (from a fresh state) and keep the state after them; every later
#       reset() starts the conversation from that state. An empty prompt clears it.
#   Engine.save_prompt_state(path: str | Path) -> None     (safetensors, after set_prompt)
#   Engine.load_prompt_state(path: str | Path) -> None     (instead of set_prompt; a file of
#       another model or shape: PromptError, one line, before anything changes)
#   Engine.max_prompt_tokens -> int     (how many text tokens the context leaves a prompt)
