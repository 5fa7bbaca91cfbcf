"""Our wire format of the `/api/chat` WebSocket (see README.md in this folder): raw PCM.

A client selects it with the WebSocket subprotocol `SUBPROTOCOL`; without it, /api/chat speaks
Kyutai's Opus protocol (kyutai.py). Every message is binary: one kind byte, then its payload.

| kind | direction        | payload                                                     |
|------|------------------|-------------------------------------------------------------|
| 0x00 | server -> page   | handshake, UTF-8 JSON {"protocol", "sample_rate", "frame_size"} |
| 0x01 | both             | audio: int16 little-endian, 24 kHz mono, 1920 samples       |
| 0x02 | server -> page   | text piece, UTF-8                                           |
| 0x05 | server -> page   | status, UTF-8 JSON {"type": "busy" / "error" / "lag", ...}  |
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE

PROTOCOL_VERSION = 1
SUBPROTOCOL = "moshi-mlx-pcm"

KIND_HANDSHAKE = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02
KIND_STATUS = 0x05

AUDIO_MESSAGE_BYTES = 1 + 2 * FRAME_SIZE
# The page only ever sends audio messages; anything larger than one is refused by aiohttp
# itself (close code 1009) before it is buffered, a little headroom aside.
MAX_CLIENT_MESSAGE_BYTES = 4096


class ProtocolError(ValueError):
    """A client message that does not follow the wire format."""


def encode_pcm(pcm: np.ndarray) -> bytes:
    """float32 samples in [-1, 1) -> int16 little-endian bytes (x * 32768, clipped)."""
    scaled = np.rint(np.asarray(pcm, dtype=np.float32) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def decode_pcm(payload: bytes) -> np.ndarray:
    """int16 little-endian bytes -> float32 samples (x / 32768)."""
    return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0


def audio_message(pcm: np.ndarray) -> bytes:
    return bytes([KIND_AUDIO]) + encode_pcm(pcm)


def text_message(text: str) -> bytes:
    return bytes([KIND_TEXT]) + text.encode("utf-8")


def _json_message(kind: int, fields: dict[str, Any]) -> bytes:
    return bytes([kind]) + json.dumps(fields, separators=(",", ":")).encode("utf-8")


def handshake_message() -> bytes:
    return _json_message(
        KIND_HANDSHAKE,
        {"protocol": PROTOCOL_VERSION, "sample_rate": SAMPLE_RATE, "frame_size": FRAME_SIZE},
    )


def status_message(status_type: str, message: str = "", **fields: Any) -> bytes:
    return _json_message(KIND_STATUS, {"type": status_type, "message": message, **fields})


def parse_client_message(data: bytes) -> np.ndarray:
    """Validate one message from the page and return its audio frame, float32 (FRAME_SIZE,).

    Raises ProtocolError with a short reason for anything else.
    """
    if len(data) == 0:
        raise ProtocolError("empty message")
    kind = data[0]
    if kind != KIND_AUDIO:
        raise ProtocolError(f"unexpected message kind 0x{kind:02x} (the page sends only audio)")
    if len(data) != AUDIO_MESSAGE_BYTES:
        raise ProtocolError(
            f"audio message of {len(data) - 1} bytes; expected {2 * FRAME_SIZE} "
            f"({FRAME_SIZE} int16 samples)"
        )
    return decode_pcm(data[1:])


class PcmWire:
    """One connection's framing in our protocol: one audio message is one model frame."""

    name = "pcm"
    max_message_bytes = MAX_CLIENT_MESSAGE_BYTES

    def ready_message(self) -> bytes:
        return handshake_message()

    def frames(self, data: bytes) -> list[np.ndarray]:
        return [parse_client_message(data)]

    def output_messages(self, pcm: np.ndarray, text: str | None) -> list[bytes]:
        # Audio for every processed frame (the page paces its lag figure on it), text after.
        return [audio_message(pcm)] + ([text_message(text)] if text else [])

    def status_message(self, status_type: str, message: str = "", **fields: Any) -> bytes:
        return status_message(status_type, message, **fields)
