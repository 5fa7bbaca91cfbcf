"""Prompt phases before a Moshi conversation (issue 19): a voice prompt, a text prompt.

The contract (lead, 2026-12-07): the names and signatures below and the Engine methods listed
at the end are what the front ends (local, local_web, /api/chat) call. Change a signature
only with the lead.

The phases (NVIDIA PersonaPlex's `LMGen.step_system_prompts`, our own code), every stream
forced, one LM step per 80 ms frame:
  1. voice: the recording normalized to VOICE_PROMPT_LUFS, Mimi-encoded into Moshi's own audio
     stream; text = PAD; user stream = SINE_TOKENS. A PersonaPlex saved voice (`SavedVoice`)
     replays its saved input embeddings instead and then takes the tokens of its cache;
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
SAVED_VOICE_STREAMS = 1 + 2 * NUM_OWN_CODEBOOKS  # a saved voice's cache rows: text, Moshi, user


@dataclass(frozen=True, eq=False)
class SavedVoice:
    """A PersonaPlex saved voice (voices.tgz's .pt, read by
    `loading.torch_pickle.read_personaplex_voice`): what NVIDIA's voice phase left after N
    frames of a recording.

    embeddings: float32 [N - 1, dim], the summed input embedding of each of the phase's
      forwards (their forward t + 1 is our step t: frame 0 is never seen);
    cache: int [17, C], their token ring after the phase (rows: text, Moshi's 8 codebooks, the
      user's 8; column p % C holds position p, in the delayed layout);
    name: what it is called (for messages and the description of the prompt).
    """

    embeddings: np.ndarray
    cache: np.ndarray
    name: str = "saved voice"

    @property
    def frames(self) -> int:
        """N: the voice phase's frames (one more than its forwards)."""
        return int(self.embeddings.shape[0]) + 1

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def position(self, p: int) -> np.ndarray:
        """The cache's tokens [17] at position p (valid for the last C positions)."""
        return self.cache[:, p % self.cache.shape[1]]

    def last_tokens(self) -> np.ndarray:
        """[1 + 8]: the text and Moshi's tokens the step after the replay reads (position
        N - 1, delayed layout)."""
        return self.position(self.frames - 1)[: 1 + NUM_OWN_CODEBOOKS]

    def codes(self) -> np.ndarray:
        """Moshi's voice frames [8, N] as far as the cache still holds them, -1 elsewhere (those
        frames are replayed from the embeddings): the last frame, and codebooks 1..7 of the one
        before it."""
        n = self.frames
        codes = np.full((NUM_OWN_CODEBOOKS, n), -1, np.int64)
        codes[0, n - 1] = self.position(n - 1)[1]
        codes[1:, n - 1] = self.position(n)[2: 1 + NUM_OWN_CODEBOOKS]
        if n >= 2:
            codes[1:, n - 2] = self.position(n - 1)[2: 1 + NUM_OWN_CODEBOOKS]
        return codes


def check_saved_voice(voice: SavedVoice) -> SavedVoice:
    """PromptError (one line) unless `voice` holds what a saved voice holds."""
    embeddings, cache = np.asarray(voice.embeddings), np.asarray(voice.cache)
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f" or embeddings.shape[1] == 0:
        raise PromptError(f"{voice.name}: the embeddings must be float [frames, dim], got "
                          f"{embeddings.dtype} {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        raise PromptError(f"{voice.name}: the embeddings hold NaN or infinite values")
    if cache.ndim != 2 or cache.dtype.kind not in "iu" or cache.shape[0] != SAVED_VOICE_STREAMS \
            or cache.shape[1] < 2:
        raise PromptError(f"{voice.name}: the token cache must be integers "
                          f"[{SAVED_VOICE_STREAMS}, columns >= 2], got {cache.dtype} {cache.shape}")
    return voice


def check_saved_voice_fits(voice: SavedVoice, cfg: Any) -> SavedVoice:
    """`check_saved_voice`, and PromptError when it was saved for a model of another width or
    its tokens lie outside this model's vocabularies (`cfg`: the model's LmConfig)."""
    check_saved_voice(voice)
    if voice.dim != int(cfg.dim):
        raise PromptError(f"{voice.name} was saved for a model of dim {voice.dim}; this model's "
                          f"dim is {cfg.dim}")
    # The tokens the phases read (the others may be NVIDIA's "ungenerated" marks).
    last = voice.last_tokens()
    text = last[:1] if voice.frames >= 2 else np.zeros(1, np.int64)
    audio = np.concatenate([last[1:] if voice.frames >= 2 else [], voice.codes()[1:, -1]])
    if not ((0 <= text).all() and (text <= int(cfg.text_card)).all()
            and (0 <= audio).all() and (audio <= int(cfg.card)).all()):
        raise PromptError(f"{voice.name}: its tokens lie outside this model's vocabularies")
    return voice


@dataclass(frozen=True)
class MoshiPrompt:
    """What runs before the conversation. Every field is optional; an empty prompt runs no
    phase at all (the conversation starts from silence, as without prompts).

    text: the text prompt as the user wrote it (system tags are added by the phases when the
      model uses them, see `wrap_with_system_tags`).
    voice_pcm: a 24 kHz mono float32 recording, NOT yet loudness-normalized (the phases
      normalize it).
    voice_codes: [8, T] int Mimi codes of a voice already encoded (instead of voice_pcm).
    saved_voice: a PersonaPlex saved voice (instead of voice_pcm / voice_codes): its phase is
      replayed from its embeddings.
    """

    text: str | None = None
    voice_pcm: np.ndarray | None = None
    voice_codes: np.ndarray | None = None
    saved_voice: SavedVoice | None = None

    @property
    def empty(self) -> bool:
        return (not self.text and self.voice_pcm is None and self.voice_codes is None
                and self.saved_voice is None)


def prompt_token_limit(context: int, voice_frames: int = 0) -> int:
    """How many text prompt tokens a model of `context` frames leaves beside `voice_frames`
    frames of voice: every phase must stay within the context."""
    return int(context) - 2 * SILENCE_FRAMES - int(voice_frames)


def check_prompt_fits(text_tokens: int, context: int, voice_frames: int = 0) -> None:
    """PromptError (one line, with the limit) when `text_tokens` exceed `prompt_token_limit`."""
    limit = prompt_token_limit(context, voice_frames)
    if text_tokens > limit:
        beside = f" beside {voice_frames} frames of voice" if voice_frames else ""
        raise PromptError(f"the text prompt is {text_tokens} tokens; the model's context "
                          f"({context} frames) leaves {max(limit, 0)}{beside}")


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
    audio [8, F]; `phases` names the consecutive runs of frames ((name, count), ...).
    A saved voice's phase adds `embedded` [R, dim] (the first R steps read these instead of
    embedding their tokens) and `last_tokens` [1 + 8] (what the step after them reads)."""

    text: np.ndarray
    moshi: np.ndarray
    user: np.ndarray
    phases: tuple[tuple[str, int], ...]
    embedded: np.ndarray | None = None
    last_tokens: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(self.text.shape[0])


def phase_frames(text_tokens: Sequence[int], voice_codes: np.ndarray | None,
                 text_pad: int = DEFAULT_TEXT_PAD,
                 saved_voice: SavedVoice | None = None) -> PromptFrames:
    """The four phases as frames (NVIDIA PersonaPlex's order): the voice (its codes, text
    PAD, user SINE), silence, the text prompt (one token a frame, Moshi SILENCE, user SINE),
    silence. A phase with nothing to say (no voice, no text) has no frames. A `saved_voice`
    (instead of `voice_codes`) is the voice phase as NVIDIA replays it: its frames' steps read
    its embeddings, then the tokens of its cache."""
    if saved_voice is not None:
        voice_codes = saved_voice.codes()
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
    replay = {} if saved_voice is None or saved_voice.frames < 2 else {
        "embedded": np.asarray(saved_voice.embeddings, np.float32),
        "last_tokens": saved_voice.last_tokens().astype(np.int64)}
    return PromptFrames(text, np.concatenate(moshis, axis=1),
                        np.repeat(sine, text.size, axis=1), tuple(phases), **replay)


def force_frames(gen: Any, text: np.ndarray, moshi: np.ndarray, user: np.ndarray,
                 observe: Callable[[int], None] | None = None,
                 embedded: np.ndarray | None = None,
                 last_tokens: np.ndarray | None = None) -> None:
    """Run F steps of a fresh `LmGen` with every stream forced: text [B, F], Moshi's audio
    [B, 8, F], the user's audio [B, 8, F] (frame f of every stream is the frame at time f).

    The frames are placed as the delays place generated ones (NVIDIA's cache placement):
    step t reads frame t (the initial tokens where a stream's delay covers it, so frame 0
    and a delayed codebook's first frames are never seen) and is made to "sample" what
    frame t + 1 holds, codebook k of Moshi's audio at frame t + 1 - delay_k. The last step
    forces only Moshi's delayed codebooks (their frame F - 1); its text and undelayed codes
    are sampled: they are the conversation's first. Afterwards `gen.state.steps` == F, and
    the conversation's first user frame is frame F. `observe(t)` runs after each step.

    embedded [B, R, dim] (a saved voice, replayed as NVIDIA replays it): steps 0 .. R - 1 read
    these summed input embeddings instead of embedding their tokens (the tokens forced there
    matter to nothing), and then read `last_tokens` [B, 1 + 8] (text and Moshi's audio, in the
    delayed layout) as the tokens of step R - 1."""
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
        replayed = None
        if embedded is not None and t < embedded.shape[1]:
            import mlx.core as mx

            replayed = mx.array(embedded[:, t]).astype(gen.lm.out_norm.weight.dtype)
        gen.step(user[:, :, t], force_text=force_text, force_audio=force_audio,
                 embedded=replayed)
        if last_tokens is not None and embedded is not None and t == embedded.shape[1] - 1:
            gen.set_last_tokens(last_tokens[:, 0], last_tokens[:, 1:])
        if observe is not None:
            observe(t)


def run_phases(gen: Any, frames: PromptFrames,
               observe: Callable[[int], None] | None = None) -> None:
    """The prompt phases on a fresh `LmGen` (batch 1): `force_frames` of `frames`."""
    force_frames(gen, frames.text[None], frames.moshi[None], frames.user[None], observe,
                 None if frames.embedded is None else frames.embedded[None],
                 None if frames.last_tokens is None else frames.last_tokens[None])


# Engine methods the front ends call (in conversation/engine.py):
#   Engine.set_prompt(prompt: MoshiPrompt) -> None
#       run the phases now (from a fresh state) and keep the state after them; every later
#       reset() starts the conversation from that state. An empty prompt clears it.
#   Engine.save_prompt_state(path: str | Path) -> None     (safetensors, after set_prompt)
#   Engine.load_prompt_state(path: str | Path) -> None     (instead of set_prompt; a file of
#       another model or shape: PromptError, one line, before anything changes)
#   Engine.max_prompt_tokens -> int     (how many text tokens the context leaves a prompt)
