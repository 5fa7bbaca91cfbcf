"""Kyutai's speech-to-text protocol at /api/asr-streaming, so Kyutai's own clients (Unmute, the
delayed-streams-modeling scripts, the livekit / pipecat plugins) work unmodified.

WebSocket, binary msgpack maps tagged by "type". The client sends `Audio` {pcm: floats, 24 kHz
mono, any length}, `OggOpus` {data}, `Marker` {id} and `Init` (start again); the server sends
`Ready` first, then `Word` {text, start_time}, `EndWord` {stop_time}, `Step` {step_idx, prs,
buffered_pcm} after each 80 ms step of this stream when the model has VAD heads, `Marker` {id}
once the audio sent before it is transcribed, and `Error` {message} before closing. Text frames
are ignored, as Kyutai's server does. A POST of an audio file on the same path answers the JSON
list of the file's Word / EndWord messages.

Times are seconds of the stream's own audio. The key comes in the `kyutai-api-key` header or
the `auth_id` query parameter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import AudioError, NoFreeSlot
from moshi_mlx.transcription.slots import StepInfo
from moshi_mlx.transcription.transcriber import Flushed
from moshi_mlx.transcription.words import Word, WordEnd
from moshi_mlx.web import limits
from moshi_mlx.web.http import websocket_max_msg_size
from moshi_mlx.web.keys import ApiKeys
from moshi_mlx.web.stt_service import MarkerReached, SttChannel, SttService
from moshi_mlx.web.uploads import decode_upload

log = logging.getLogger("moshi_mlx.serve")

PATH = "/api/asr-streaming"


class ProtocolError(ValueError):
    """A client message the server refuses (answered by Error, then close with `code`)."""

    def __init__(self, message: str, code: int = WSCloseCode.UNSUPPORTED_DATA) -> None:
        super().__init__(message)
        self.code = code


def pack(message: dict[str, Any]) -> bytes:
    import msgpack

    return msgpack.packb(message, use_bin_type=True)


def word_message(event: Word | WordEnd) -> dict[str, Any]:
    if isinstance(event, Word):
        return {"type": "Word", "text": event.text, "start_time": float(event.start)}
    return {"type": "EndWord", "stop_time": float(event.end)}


class AsrStreamingRoute:
    """/api/asr-streaming over an `SttService` (every connection is one slot of its batch)."""

    def __init__(self, service: SttService, keys: ApiKeys) -> None:
        self.service = service
        self.keys = keys
        self._sphn: Any = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(PATH, self._websocket)
        app.router.add_post(PATH, self._post)

    # ------------------------------------------------------------------ POST
    async def _post(self, request: web.Request) -> web.Response:
        if not self.keys.kyutai_ok(request):
            log.info("asr-streaming POST refused (%s): bad or missing key", request.remote)
            raise web.HTTPUnauthorized(text="missing or wrong kyutai-api-key / auth_id")
        body = await request.read()
        try:
            pcm = await decode_upload(body, "the posted audio")
        except AudioError as exc:
            log.info("asr-streaming POST refused (%s): %s", request.remote, exc)
            raise web.HTTPBadRequest(text=str(exc)) from None
        try:
            channel = self.service.open()
        except NoFreeSlot:
            log.info("asr-streaming POST refused (%s): no free channels", request.remote)
            return web.json_response([{"type": "Error", "message": "no free channels"}],
                                     status=503)
        messages: list[dict[str, Any]] = []
        try:
            channel.push(pcm)
            channel.end()
            while True:
                event = await channel.events.get()
                if isinstance(event, Exception):
                    messages.append({"type": "Error", "message": "the model failed"})
                    break
                if isinstance(event, (Word, WordEnd)):
                    messages.append(word_message(event))
                elif isinstance(event, Flushed):
                    break
        finally:
            channel.close()
        log.info("asr-streaming POST (%s): %.1f s of audio, %d words", request.remote,
                 len(pcm) / SAMPLE_RATE, sum(m["type"] == "Word" for m in messages))
        return web.json_response(messages)

    # ------------------------------------------------------------------ WebSocket
    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        if not self.keys.kyutai_ok(request):
            log.info("asr-streaming refused (%s): bad or missing key", request.remote)
            raise web.HTTPUnauthorized(text="missing or wrong kyutai-api-key / auth_id")
        ws = web.WebSocketResponse(
            max_msg_size=websocket_max_msg_size(limits.MAX_ASR_MESSAGE_BYTES),
            heartbeat=limits.ASR_PING_SECONDS, compress=False)
        await ws.prepare(request)
        try:
            channel = self.service.open()
        except NoFreeSlot:
            log.info("asr-streaming refused (%s): no free channels", request.remote)
            await _error_and_close(ws, "no free channels", WSCloseCode.TRY_AGAIN_LATER)
            return ws
        session = _Session(self, ws, channel, request.remote)
        log.info("asr-streaming stream opened (%s, %d/%d in use)", request.remote,
                 self.service.open_channels, self.service.capacity)
        try:
            await session.run()
        finally:
            session.channel.close()
            log.info("asr-streaming stream closed (%s): %.1f s of audio, %d words%s",
                     request.remote, session.samples_in / SAMPLE_RATE, session.words_out,
                     f", {session.error}" if session.error else "")
        return ws

    def decode_opus(self) -> Any:
        """A fresh Ogg/Opus reader, or None when sphn is not installed."""
        from moshi_mlx.web import kyutai

        if self._sphn is None:
            self._sphn = kyutai.load_sphn() or False
        return self._sphn.OpusStreamReader(SAMPLE_RATE) if self._sphn else None


class _Session:
    """One WebSocket: a receive loop feeding the channel, a send loop draining its events."""

    def __init__(self, route: AsrStreamingRoute, ws: web.WebSocketResponse,
                 channel: SttChannel, peer: str | None) -> None:
        self.route = route
        self.ws = ws
        self.channel = channel
        self.peer = peer
        self.samples_in = 0
        self.words_out = 0
        self.error: str | None = None
        self._opus: Any = None
        self._last_data = time.monotonic()

    async def run(self) -> None:
        await self.ws.send_bytes(pack({"type": "Ready"}))
        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._idle_watchdog())
        try:
            await self._receive_loop()
        finally:
            watchdog.cancel()
            sender.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close()

    async def _fail(self, message: str, code: int = WSCloseCode.UNSUPPORTED_DATA) -> None:
        self.error = message
        await _error_and_close(self.ws, message, code)

    async def _receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                try:
                    await self._handle(msg.data)
                except ProtocolError as exc:
                    await self._fail(str(exc), exc.code)
                    return
            elif msg.type == WSMsgType.ERROR:
                self.error = f"websocket error: {self.ws.exception()}"
                return
            # text frames are ignored, as by Kyutai's server

    async def _handle(self, data: bytes) -> None:
        self._last_data = time.monotonic()
        message = _unpack(data)
        kind = message.get("type")
        if kind == "Audio":
            self._audio(_float_pcm(message.get("pcm")))
        elif kind == "OggOpus":
            await self._ogg_opus(message.get("data"))
        elif kind == "Marker":
            marker_id = message.get("id")
            if not isinstance(marker_id, int) or isinstance(marker_id, bool):
                raise ProtocolError("malformed message: Marker needs an integer id")
            self.channel.mark(marker_id)
        elif kind == "Init":
            self.channel.close()
            self.channel = self.route.service.reopen(self.channel)
            await self.ws.send_bytes(pack({"type": "Ready"}))
        else:
            raise ProtocolError(f"malformed message: unknown message type {kind!r}")
        await self.channel.wait_buffer_below(limits.ASR_MAX_BUFFERED_SAMPLES)

    def _audio(self, pcm: np.ndarray) -> None:
        self.samples_in += pcm.size
        self.channel.push(pcm)

    async def _ogg_opus(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray)):
            raise ProtocolError("malformed message: OggOpus needs binary data")
        if self._opus is None:
            self._opus = self.route.decode_opus()
            if self._opus is None:
                raise ProtocolError("OggOpus needs sphn on the server (pip install sphn)",
                                    WSCloseCode.INTERNAL_ERROR)
        try:
            pcm = self._opus.append_bytes(bytes(data))
        except (ValueError, RuntimeError) as exc:
            raise ProtocolError(f"malformed message: data is not an Ogg/Opus stream ({exc})"
                                ) from None
        self._audio(np.asarray(pcm, dtype=np.float32).reshape(-1))

    async def _send_loop(self) -> None:
        try:
            while True:
                channel = self.channel
                event = await channel.events.get()
                if channel is not self.channel:
                    continue  # an event of the stream before an Init
                message = self._message(event)
                if message is None:
                    continue
                await self.ws.send_bytes(pack(message))
                if message["type"] == "Error":
                    await self.ws.close(code=WSCloseCode.INTERNAL_ERROR)
                    return
        except (ConnectionError, RuntimeError):
            return  # the client left; the receive loop ends the session

    def _message(self, event: Any) -> dict[str, Any] | None:
        if isinstance(event, Exception):
            self.error = "the model failed"
            return {"type": "Error", "message": "the model failed"}
        if isinstance(event, Word):
            self.words_out += 1
        if isinstance(event, (Word, WordEnd)):
            return word_message(event)
        if isinstance(event, StepInfo) and event.prs is not None:
            return {"type": "Step", "step_idx": event.step,
                    "prs": [float(p) for p in event.prs],
                    "buffered_pcm": int(event.buffered_samples)}
        if isinstance(event, MarkerReached):
            return {"type": "Marker", "id": event.id}
        return None

    async def _idle_watchdog(self) -> None:
        """Close a stream that sends no audio for ASR_IDLE_SECONDS (it holds a slot)."""
        while True:
            left = self._last_data + limits.ASR_IDLE_SECONDS - time.monotonic()
            if left <= 0:
                await self._fail(f"no audio for {limits.ASR_IDLE_SECONDS:g} s",
                                 WSCloseCode.POLICY_VIOLATION)
                return
            await asyncio.sleep(left)


def _unpack(data: bytes) -> dict[str, Any]:
    import msgpack

    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"malformed message: not msgpack ({type(exc).__name__})") from None
    except Exception as exc:  # msgpack's ExtraData etc.
        raise ProtocolError(f"malformed message: not msgpack ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed message: a message is a msgpack map with a \"type\"")
    return message


def _float_pcm(pcm: Any) -> np.ndarray:
    """Audio's `pcm`: a flat list of numbers (floats; ints accepted), finite."""
    if not isinstance(pcm, list):
        raise ProtocolError("malformed message: Audio needs pcm, a list of float samples")
    try:
        samples = np.array(pcm)  # numbers -> a float or int array; anything else shows in it
    except (ValueError, TypeError):
        samples = np.array([], dtype=object)
    if samples.size and (samples.dtype.kind not in "fiu" or samples.ndim != 1):
        raise ProtocolError("malformed message: Audio pcm holds something other than numbers")
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError("malformed message: Audio pcm holds NaN or infinite samples")
    return samples


async def _error_and_close(ws: web.WebSocketResponse, message: str, code: int) -> None:
    try:
        await ws.send_bytes(pack({"type": "Error", "message": message}))
    except (ConnectionError, RuntimeError):
        pass
    await ws.close(code=code, message=message.encode("utf-8")[:120])
