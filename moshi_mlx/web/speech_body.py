"""A speech response's body, streamed as the frames are decoded."""

from __future__ import annotations

import asyncio
import io
import logging
import struct
from collections.abc import AsyncIterator

import numpy as np
from aiohttp import web

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import MoshiError
from moshi_mlx.web import limits

log = logging.getLogger("moshi_mlx.web")
PCM16_SCALE = 32767


def streamed_wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 32-bit float mono WAV header of unknown length (RIFF and data sizes 0xFFFFFFFF, the
    convention players and ffmpeg read as "until the end of the stream")."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)  # IEEE float
    return b"".join([b"RIFF", struct.pack("<I", unknown), b"WAVE",
                     b"fmt ", struct.pack("<I", len(fmt)), fmt,
                     b"data", struct.pack("<I", unknown)])


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """Float audio as raw signed 16-bit little-endian samples (clipped to -1..1)."""
    scaled = np.round(np.clip(audio, -1.0, 1.0) * PCM16_SCALE)
    return scaled.astype("<i2").tobytes()


def flac_bytes(audio: np.ndarray) -> bytes:
    """A whole 16-bit FLAC file; no audio gives no bytes (libsndfile writes no empty FLAC)."""
    import soundfile

    if audio.size == 0:
        return b""
    out = io.BytesIO()
    soundfile.write(out, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return out.getvalue()


CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}


async def send_speech(request: web.Request, chunks: AsyncIterator[np.ndarray],
                       first: np.ndarray | None, response_format: str) -> web.StreamResponse:
    """Stream the audio as it is decoded: wav (one header, then float32 samples) and pcm
    (s16le) frame by frame; flac as a whole file at the end."""
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[response_format]})
    await response.prepare(request)
    whole: list[np.ndarray] = []
    frames = 0

    async def write(data: bytes) -> None:
        # A client that stops reading would hold the one speech slot: it is dropped.
        try:
            await asyncio.wait_for(response.write(data), limits.SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"not read for {limits.SEND_TIMEOUT_S:g} s") from None

    try:
        if response_format == "wav":
            await write(streamed_wav_header())
        pending = [] if first is None else [first]
        while True:
            for audio in pending:
                frames += 1
                if response_format == "flac":
                    whole.append(audio)
                elif response_format == "wav":
                    await write(audio.astype("<f4").tobytes())
                else:
                    await write(pcm16_bytes(audio))
            try:
                pending = [await anext(chunks)]
            except StopAsyncIteration:
                break
        if response_format == "flac":
            audio = np.concatenate(whole) if whole else np.zeros(0, np.float32)
            await write(flac_bytes(audio))
        await response.write_eof()
    except ConnectionError as exc:
        log.info("%s %s: the client left after %d frames (%s)", request.method, request.path,
                 frames, exc)
    except MoshiError as exc:  # a later sentence could not be spoken: the body ends there
        log.info("%s %s: speech ended early after %d frames: %s", request.method,
                 request.path, frames, exc)
    except Exception:  # our bug; the status is sent, so the body just ends
        log.exception("%s %s: speech failed after %d frames", request.method, request.path,
                      frames)
    return response
