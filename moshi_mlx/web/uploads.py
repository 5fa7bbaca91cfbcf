"""Uploaded audio files, decoded off the event loop (a 25 MiB upload takes long enough to stall
every other connection)."""

from __future__ import annotations

import asyncio

import numpy as np


async def decode_upload(data: bytes, name: str) -> np.ndarray:
    """The upload as 24 kHz mono float32 audio, decoded on a worker thread; AudioError (one
    line naming `name`) when it is not audio."""
    from moshi_mlx.audio.io import decode_audio_bytes

    return await asyncio.get_running_loop().run_in_executor(None, decode_audio_bytes, data, name)
