"""Kyutai's own `/api/chat` protocol, as the official clients speak it (see README.md here).

Every message is binary, one kind byte then its payload:

| kind | direction        | payload                                                       |
|------|------------------|---------------------------------------------------------------|
| 0x00 | server -> client | nothing: the server is ready for audio                        |
| 0x01 | both             | Ogg/Opus bytes (pages) of one 24 kHz mono stream per direction |
| 0x02 | server -> client | text piece, UTF-8                                             |

Opus comes from `sphn`, Kyutai's Opus package, an optional dependency: `load_sphn` says whether
it is installed. Ogg pages carry any number of samples, so the decoded microphone audio is cut
here into model frames (`FRAME_SIZE`), the remainder waiting for the next page.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.web.protocol import ProtocolError

KIND_READY = 0x00
KIND_AUDIO = 0x01
KIND_TEXT = 0x02

# The largest Ogg page: a 27-byte header, 255 lacing values, 255 segments of 255 bytes. Room
# for two in one message (a stream's first message may carry its header pages too); larger
# messages are refused by aiohttp before they are buffered (close code 1009).
MAX_OGG_PAGE_BYTES = 27 + 255 + 255 * 255
MAX_CLIENT_MESSAGE_BYTES = 1 + 2 * MAX_OGG_PAGE_BYTES

INSTALL_HINT = "pip install 'moshi_mlx[kyutai]'"


def load_sphn() -> ModuleType | None:
    """The `sphn` module, or None when it is not installed."""
    try:
        import sphn
    except ImportError:
        return None
    return sphn


class OpusWire:
    """One connection's Kyutai framing: Ogg/Opus in and out, re-framed to model frames."""

    name = "kyutai"
    max_message_bytes = MAX_CLIENT_MESSAGE_BYTES

    def __init__(self, sphn: ModuleType):
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)

    def ready_message(self) -> bytes:
        return bytes([KIND_READY])

    def frames(self, data: bytes) -> list[np.ndarray]:
        """The complete model frames this client message finishes (often none or one).

        Raises ProtocolError for anything but Ogg/Opus audio.
        """
        if len(data) == 0:
            raise ProtocolError("empty message")
        kind = data[0]
        if kind != KIND_AUDIO:
            raise ProtocolError(
                f"unexpected message kind 0x{kind:02x} (clients send only audio, 0x01)"
            )
        try:
            pcm = self._reader.append_bytes(data[1:])
        except (ValueError, RuntimeError) as exc:
            raise ProtocolError(f"audio is not an Ogg/Opus stream ({exc})") from None
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return []
        samples = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = samples.size // FRAME_SIZE * FRAME_SIZE
        self._pending = samples[whole:].copy()
        return list(samples[:whole].reshape(-1, FRAME_SIZE))

    def output_messages(self, pcm: np.ndarray, text: str | None) -> list[bytes]:
        """Moshi's frame as Ogg/Opus (when the encoder completed a page), then its text."""
        messages = []
        page = self._writer.append_pcm(np.asarray(pcm, dtype=np.float32).reshape(-1))
        if len(page) > 0:
            messages.append(bytes([KIND_AUDIO]) + bytes(page))
        if text:
            messages.append(bytes([KIND_TEXT]) + text.encode("utf-8"))
        return messages

    def status_message(self, status_type: str, message: str = "", **fields: object) -> None:
        """Kyutai's clients have no status messages: reasons go in the close frame only."""
        return None
