"""The conversation engine: one 80 ms frame in, one frame of Moshi out.

Both front ends (the terminal loop in `moshi_mlx.local` and the web server) drive the same
`Engine.process`: Mimi encode of the user's frame -> one Moshi step -> Mimi decode of Moshi's
frame. The engine holds all streaming state; `reset()` starts a fresh conversation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import MoshiError, PromptError, WeightsError
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.loading.text_tokenizer import printable_piece

if TYPE_CHECKING:  # (sampling imports MLX, which this module loads only when stepping)
    from moshi_mlx.conversation.prompts import MoshiPrompt
    from moshi_mlx.modules.sampling import SamplingSettings

NUM_CODEBOOKS = 8  # Moshi's codebooks per stream
MIMI_BACKENDS = ("mlx", "rustymimi")  # ours, or Kyutai's Rust Mimi


@dataclass(frozen=True)
class EngineOptions:
    """How `Engine.from_files` loads and runs Moshi: the options every model-loading command
    shares (-q, --dtype, --cpu-threads, --seed), the text and audio sampling (None: the
    released defaults, `SamplingSettings()`), and which Mimi implementation codes the audio."""

    model: ModelOptions = ModelOptions()
    sampling: SamplingSettings | None = None
    mimi_backend: str = "mlx"
    # A LoRA to run Moshi with (moshi_mlx.training.moshi_lora.LmAdapterOptions): its
    # apply(lm, cpu_threads) puts it on the loaded LM before generation starts.
    adapter: Any = None


@dataclass
class FrameOutput:
    pcm: np.ndarray  # (1920,) float32: Moshi's audio for this frame (zeros while none yet)
    text: str | None  # the text piece said at this step, None for PAD/EPAD/no token
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, step, decode


class Codec(Protocol):
    """Streaming Mimi seen by the engine: numpy in, numpy out, one frame at a time."""

    def encode(self, pcm: np.ndarray) -> np.ndarray: ...  # (1920,) f32 -> (8,) int codes

    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # (8,) int -> (1920,) f32

    def reset(self) -> None: ...


class MlxCodec:
    """`moshi_mlx.Mimi` (our MLX implementation) behind the `Codec` interface: one stream
    (`MimiStream`) through a Mimi that may serve other streams too."""

    def __init__(self, mimi: Any):
        from moshi_mlx.models.mimi import MimiStream

        self.mimi = mimi
        self.stream = MimiStream(mimi)

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        codes = self.stream.encode_step(mx.array(pcm.reshape(1, 1, -1)))
        return np.asarray(codes)[0, :NUM_CODEBOOKS, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        pcm = self.stream.decode_step(mx.array(codes.reshape(1, -1, 1).astype(np.int32)))
        return np.asarray(pcm.astype(mx.float32)).reshape(-1)

    def reset(self) -> None:
        self.stream.reset()


class RustyCodec:
    """Kyutai's Rust Mimi (`rustymimi`): one tokenizer instance per direction, so that
    encoder and decoder streaming states never interfere."""

    def __init__(self, path: str | Path):
        import rustymimi

        self._path = str(path)
        self._make = lambda: rustymimi.Tokenizer(self._path, num_codebooks=NUM_CODEBOOKS)
        self.encoder = self._make()
        self.decoder = self._make()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        codes = self.encoder.encode_step(pcm.reshape(1, 1, -1).astype(np.float32))
        return np.asarray(codes)[0, :NUM_CODEBOOKS, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        pcm = self.decoder.decode_step(codes.reshape(1, -1, 1).astype(np.uint32))
        return np.asarray(pcm, dtype=np.float32).reshape(-1)

    def reset(self) -> None:
        self.encoder.reset()
        self.decoder.reset()


class Engine:
    """Full-duplex Moshi, frame by frame: `process(user_pcm) -> FrameOutput`."""

    sample_rate: int = SAMPLE_RATE
    frame_size: int = FRAME_SIZE

    def __init__(
        self,
        codec: Codec,
        lm_gen: Any,
        text_tokenizer: Any,
        silent_text_ids: Sequence[int] = (0, 3),
    ):
        self.codec = codec
        self.lm_gen = lm_gen
        self.text_tokenizer = text_tokenizer
        self.silent_text_ids = frozenset(int(i) for i in silent_text_ids)
        self.frames = 0
        self._prompt_state: Any = None  # the LmStreamState after the prompt phases, if any
        self.prompt_description: dict[str, Any] | None = None  # what that prompt was

    @classmethod
    def from_files(
        cls,
        moshi_weight: str | Path,
        mimi_weight: str | Path,
        tokenizer: str | Path,
        config: str | Path | None = None,
        options: EngineOptions | None = None,
    ) -> Engine:
        """Load Moshi, Mimi and the text tokenizer from these files and warm the engine up."""
        from moshi_mlx.conversation.lm_gen import LmGen
        from moshi_mlx.loading.models import load_lm
        from moshi_mlx.loading.text_tokenizer import load_sentencepiece
        from moshi_mlx.modules.sampling import SamplingSettings

        options = options or EngineOptions()
        model = options.model
        for path, what in ((moshi_weight, "Moshi weights"), (mimi_weight, "Mimi weights"),
                           (tokenizer, "text tokenizer")):
            if not Path(path).is_file():
                raise WeightsError(f"{what} not found: {path}")
        try:
            lm = load_lm(str(moshi_weight), config=config, **model.load_kwargs())
            if options.adapter is not None:
                options.adapter.apply(lm, model.cpu_threads)
            codec = make_codec(mimi_weight, options.mimi_backend)
        except MemoryError:
            raise MoshiError(
                f"out of memory while loading {Path(moshi_weight).name}; try -q 4 or close "
                "other programs"
            ) from None
        except RuntimeError as exc:
            if "memory" in str(exc).lower() or "alloc" in str(exc).lower():
                raise MoshiError(
                    f"out of memory while loading {Path(moshi_weight).name}; try -q 4 or close "
                    "other programs"
                ) from None
            raise
        sampling = options.sampling or SamplingSettings()
        gen = LmGen(lm, text_temp=sampling.text_temp, text_topk=sampling.text_topk,
                    audio_temp=sampling.audio_temp, audio_topk=sampling.audio_topk,
                    seed=model.seed)
        sp = load_sentencepiece(tokenizer)
        pad_id = getattr(getattr(lm, "cfg", None), "existing_text_padding_id", None)
        engine = cls(codec, gen, sp, silent_text_ids=(0, 3 if pad_id is None else int(pad_id)))
        engine.warm_up()
        return engine

    def reset(self) -> None:
        """A fresh conversation: from the state after the prompt phases when a prompt is set
        (a copy: conversations never change it), else from silence."""
        self.codec.reset()
        if self._prompt_state is None:
            self.lm_gen.reset()
        else:
            from moshi_mlx.conversation.prompt_state import copy_state

            self.lm_gen.reset(copy_state(self._prompt_state))
        self.frames = 0

    # ------------------------------------------------------------------ prompts (issue 19)
    @property
    def max_prompt_tokens(self) -> int:
        """How many text prompt tokens the context leaves (less the frames of a voice
        prompt): every prompt phase must stay within the context."""
        from moshi_mlx.conversation.prompts import prompt_token_limit

        return prompt_token_limit(self.lm_gen.cfg.context)

    def set_prompt(self, prompt: MoshiPrompt) -> None:
        """Run the prompt phases now and start every later conversation (`reset`) from the
        state after them; an empty prompt clears it. PromptError (nothing changed) for a
        voice that is not audio or is silent, a saved voice of another model, or a text longer
        than the context allows."""
        from moshi_mlx.conversation.prompt_state import copy_state
        from moshi_mlx.conversation.prompts import (
            DEFAULT_TEXT_PAD,
            check_prompt_fits,
            check_saved_voice_fits,
            encode_frames,
            phase_frames,
            prompt_text_tokens,
            run_phases,
            voice_frames,
        )

        if prompt.empty:
            self._prompt_state, self.prompt_description = None, None
            self.reset()
            return
        cfg = self.lm_gen.cfg
        tokens = prompt_text_tokens(prompt.text, self.text_tokenizer,
                                    bool(getattr(cfg, "system_prompt_tags", False)))
        voice, voice_pcm_frames, saved = None, None, prompt.saved_voice
        if saved is not None:
            if prompt.voice_codes is not None or prompt.voice_pcm is not None:
                raise PromptError("give one voice prompt: a saved voice or a recording (codes)")
            voice_count = check_saved_voice_fits(saved, cfg).frames
        elif prompt.voice_codes is not None:
            voice = _checked_voice_codes(prompt.voice_codes, int(cfg.card))
            voice_count = voice.shape[1]
        elif prompt.voice_pcm is not None:
            voice_pcm_frames = voice_frames(prompt.voice_pcm)  # checked, normalized
            voice_count = voice_pcm_frames.shape[0]
        else:
            voice_count = 0
        check_prompt_fits(len(tokens), cfg.context, voice_count)
        if voice_pcm_frames is not None:
            voice = encode_frames(voice_pcm_frames, self.codec)
        pad = getattr(cfg, "existing_text_padding_id", None)
        frames = phase_frames(tokens, voice, DEFAULT_TEXT_PAD if pad is None else int(pad),
                              saved_voice=saved)
        self.lm_gen.reset()
        run_phases(self.lm_gen, frames)
        self._prompt_state = copy_state(self.lm_gen.state)
        self.prompt_description = {"text": prompt.text or "", "text_tokens": len(tokens),
                                   "voice_frames": voice_count,
                                   "phases": [list(p) for p in frames.phases]}
        self.reset()

    def save_prompt_state(self, path: str | Path) -> None:
        """Save the state after the prompt phases (safetensors), for `load_prompt_state`."""
        from moshi_mlx.conversation.prompt_state import model_identity, save_state

        if self._prompt_state is None:
            raise PromptError("no prompt to save: give a text or voice prompt first")
        save_state(path, self._prompt_state, model_identity(self.lm_gen.lm),
                   self.prompt_description or {})

    def load_prompt_state(self, path: str | Path) -> None:
        """Start conversations from a saved prompt state instead of running the phases.
        PromptError (one line, nothing changed) for a file of another model or shape."""
        from moshi_mlx.conversation.prompt_state import load_state, model_identity

        state, description = load_state(path, model_identity(self.lm_gen.lm))
        self._prompt_state, self.prompt_description = state, description
        self.reset()

    @property
    def sampling(self) -> SamplingSettings:
        return self.lm_gen.sampling

    def set_sampling(self, settings: SamplingSettings) -> None:
        """Sample the next conversation with `settings` (call `reset` before it). A change is
        compiled now, by warm-up frames, not during the conversation's first frames."""
        if self.lm_gen.set_sampling(settings):
            self.warm_up()

    def warm_up(self, frames: int = 2) -> None:
        """Run `frames` frames of silence, then reset: graphs are compiled and buffers
        allocated now, not during the first frames of a conversation (where a stall of a
        second would pile up microphone audio and then a burst of output). Frame 0 steps
        only; frame 1 also decodes."""
        for _ in range(frames):
            self.process(np.zeros(self.frame_size, dtype=np.float32))
        self.reset()

    def text_piece(self, token: int) -> str | None:
        """Printable text of a text token; None for padding, end-of-padding and control ids."""
        return printable_piece(self.text_tokenizer, token, self.silent_text_ids)

    def process(self, pcm: np.ndarray) -> FrameOutput:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.shape[0] != self.frame_size:
            raise ValueError(f"expected {self.frame_size} samples, got {pcm.shape[0]}")
        t0 = time.perf_counter()
        codes = self.codec.encode(pcm)
        t1 = time.perf_counter()
        text_token, audio_codes = self._step(codes)
        t2 = time.perf_counter()
        if audio_codes is None:
            out = np.zeros(self.frame_size, dtype=np.float32)
        else:
            out = self.codec.decode(audio_codes)
        t3 = time.perf_counter()
        self.frames += 1
        text = None if text_token is None else self.text_piece(text_token)
        return FrameOutput(out, text, {"encode": t1 - t0, "step": t2 - t1, "decode": t3 - t2})

    def _step(self, codes: np.ndarray) -> tuple[int | None, np.ndarray | None]:
        import mlx.core as mx

        user = mx.array(np.asarray(codes, dtype=np.int32).reshape(1, NUM_CODEBOOKS))
        text, audio = self.lm_gen.step(user)  # evaluates its outputs (one host sync)
        token = None if text is None else int(np.array(text).reshape(-1)[0])
        if audio is None:
            return token, None
        audio_np = np.array(audio).reshape(-1)[:NUM_CODEBOOKS].astype(np.int64)
        if (audio_np < 0).any():  # a delayed codebook not known yet
            return token, None
        return token, audio_np


def _checked_voice_codes(codes: np.ndarray, card: int) -> np.ndarray:
    """Voice codes [8, T] as given in a MoshiPrompt; PromptError when they are not."""
    array = np.asarray(codes)
    if array.ndim != 2 or array.shape[0] != NUM_CODEBOOKS or array.shape[1] == 0 \
            or not np.issubdtype(array.dtype, np.integer):
        raise PromptError(f"voice codes must be integers [{NUM_CODEBOOKS}, frames], got "
                          f"{array.dtype} {array.shape}")
    if array.min() < 0 or array.max() >= card:
        raise PromptError(f"voice codes must lie in 0..{card - 1}")
    return array.astype(np.int64)


def make_codec(mimi_weight: str | Path, backend: str = "mlx") -> Codec:
    if backend == "rustymimi":
        try:
            return RustyCodec(mimi_weight)
        except ImportError:
            raise MoshiError("--mimi-backend rustymimi needs `pip install rustymimi`") from None
    if backend != "mlx":
        raise MoshiError(f"unknown Mimi backend {backend!r} (use {' or '.join(MIMI_BACKENDS)})")
    from moshi_mlx.loading.models import load_mimi

    return MlxCodec(load_mimi(str(mimi_weight), num_codebooks=NUM_CODEBOOKS))
