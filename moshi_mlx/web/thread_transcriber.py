"""The simplest AsyncTranscriber: one whole request at a time through a Transcriber on the
model thread (the server's batched transcriber may replace it; the routes do not care)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import numpy as np

from moshi_mlx.transcription.transcriber import Transcriber, Transcript

CHUNK_FRAMES = 4  # frames fed per call, as the stt command feeds files


class ThreadTranscriber:
    """Runs `transcriber.transcribe_pcm([pcm])` on `executor` (the model thread)."""

    def __init__(self, transcriber: Transcriber, executor: Executor) -> None:
        self.transcriber = transcriber
        self.executor = executor

    async def transcribe(self, pcm: np.ndarray,
                         on_text: Callable[[str], Awaitable[None]] | None = None) -> Transcript:
        """pcm: float32 mono 24 kHz. on_text(delta) gets the text as it is decoded; the deltas
        add up to the transcript's text."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        sent = ""

        def on_events(events: list) -> None:  # on the model thread
            nonlocal sent
            text = self.transcriber.stream_text(0)
            # Decoding more pieces can rewrite the text's tail (byte pieces): a delta goes
            # out only while what was sent stays a prefix.
            if text.startswith(sent) and len(text) > len(sent):
                loop.call_soon_threadsafe(deltas.put_nowait, text[len(sent):])
                sent = text

        def run() -> Transcript:
            try:
                return self.transcriber.transcribe_pcm([pcm], chunk_frames=CHUNK_FRAMES,
                                                       on_events=on_events)[0]
            finally:
                loop.call_soon_threadsafe(deltas.put_nowait, None)

        result = loop.run_in_executor(self.executor, run)
        while (delta := await deltas.get()) is not None:
            if on_text is not None:
                await on_text(delta)
        return await result
