"""CSM speech for the server: one generation at a time, stepped frame by frame on the model
thread so other work queued there (transcription streams) runs between its frames.

The frames are made exactly as `python -m moshi_mlx.tts` makes them (stream_long_speech: long
text by sentences, the stop rules, Mimi's streaming decoder through stream_decoded) and are
not watermarked, as the tts command's streamed and played audio (silentcipher marks whole
clips only).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from moshi_mlx.errors import MoshiError
from moshi_mlx.speech import defaults
from moshi_mlx.speech.stopping import StopRules
from moshi_mlx.speech.voices import default_voices_folder, list_voices, load_voice
from moshi_mlx.web.limits import MAX_QUEUED_SPEECH

T = TypeVar("T")
_END = object()  # what one step returns when the speech is over


def is_speaker_id(voice: str) -> bool:
    return voice.isascii() and voice.isdigit()


class SpeechBusy(Exception):
    """Too many speech requests are already waiting."""


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str = str(defaults.SPEAKER)
    temperature: float = defaults.TEMPERATURE
    top_k: int = defaults.TOP_K
    seed: int | None = None


@dataclass
class SpeechService:
    """CSM `model`, its `tokenizer` and `mimi`, used only on `executor` (the model thread);
    `voices`: the saved voices' folder."""

    model: Any
    tokenizer: Any
    mimi: Any
    executor: Executor
    voices: Path = field(default_factory=default_voices_folder)
    stop: StopRules = field(default_factory=StopRules)
    max_queued: int = MAX_QUEUED_SPEECH
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _waiting: int = field(default=0, init=False, repr=False)

    def voice_names(self) -> list[str]:
        return list_voices(self.voices)

    def check_voice(self, voice: str) -> None:
        """MoshiError naming the voices there are, unless `voice` is a speaker id or a saved
        voice."""
        if not (is_speaker_id(voice) or voice in self.voice_names()):
            raise MoshiError(self._unknown_voice(voice))

    def _unknown_voice(self, voice: str) -> str:
        saved = self.voice_names()
        names = f"saved voices: {', '.join(saved)}" if saved else f"no voice saved in {self.voices}"
        return f"unknown voice {voice!r}: give a speaker id (0, 1, ...) or a saved voice ({names})"

    def _speaker_and_context(self, voice: str) -> tuple[int, list]:
        if is_speaker_id(voice):
            return int(voice), []
        self.check_voice(voice)
        turn = load_voice(self.voices, voice)
        return turn.speaker, [turn]

    async def stream(self, request: SpeechRequest) -> AsyncIterator[np.ndarray]:
        """The speech's 24 kHz float32 audio, one decoded frame (1920 samples) at a time.
        Waits its turn (SpeechBusy when `max_queued` requests already wait); MoshiError for
        what the request asks that cannot be spoken. Closing the iterator early (a client
        gone) ends the generation at once."""
        if self._turn.locked() and self._waiting >= self.max_queued:
            raise SpeechBusy(f"busy: {self._waiting} speech requests are waiting; try again")
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1
        frames: Iterator[tuple[np.ndarray, np.ndarray]] | None = None
        try:
            speaker, context = self._speaker_and_context(request.voice)
            frames = await self._on_model_thread(self._start, request, speaker, context)
            while (item := await self._on_model_thread(next, frames, _END)) is not _END:
                yield item[1]
        finally:
            if frames is not None:
                # Its MLX state is released on the thread that made it.
                await asyncio.shield(self._on_model_thread(frames.close))
            self._turn.release()

    def _start(self, request: SpeechRequest, speaker: int, context: list
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        from moshi_mlx.speech.generate import stream_decoded, stream_long_speech

        speech = stream_long_speech(self.model, self.tokenizer, request.text, speaker, context,
                                    request.temperature, request.top_k, None, request.seed,
                                    self.mimi, stop=self.stop)
        return stream_decoded(self.mimi, speech)

    async def _on_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
