"""aiohttp server: the page, its static files, and one conversation at a time over /api/chat.

All model work (loading, `reset`, `process`) runs on one dedicated worker thread, so the
event loop never waits on MLX and frames are processed strictly in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from ..model_thread import load_on_model_thread, start_model_thread, stop_model_thread
from . import protocol

log = logging.getLogger("moshi_mlx.web")

STATIC_DIR = Path(__file__).parent / "static"
FRAME_SECONDS = protocol.FRAME_SIZE / protocol.SAMPLE_RATE


class ConversationEngine(Protocol):
    """What the server needs from `moshi_mlx.engine.Engine`."""

    def reset(self) -> None: ...

    def process(self, pcm: np.ndarray) -> Any:  # returns an object with .pcm and .text
        ...


class ChatServer:
    """Serves the page and runs conversations on `engine`, one client at a time.

    max_queued_frames bounds the frames waiting for the model: when the model is slower than
    real time the oldest waiting frame is dropped (counted, and reported to the page) instead
    of letting the delay grow without end.
    """

    def __init__(
        self,
        engine: ConversationEngine | None = None,
        *,
        max_queued_frames: int = 4,
        stats_every_frames: int = 6,
    ) -> None:
        if max_queued_frames < 1:
            raise ValueError("max_queued_frames must be at least 1")
        self.engine = engine
        self.max_queued_frames = max_queued_frames
        self.stats_every_frames = stats_every_frames
        self._executor = start_model_thread()
        self._busy = False
        self._sockets: set[web.WebSocketResponse] = set()

    # --- model thread -------------------------------------------------------------------

    def load_engine(self, factory: Callable[[], ConversationEngine]) -> ConversationEngine:
        """Build the engine on the model thread (MLX state then lives on that one thread)."""
        self.engine = load_on_model_thread(self._executor, factory)
        return self.engine

    async def run_on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        stop_model_thread(self._executor)

    @property
    def busy(self) -> bool:
        return self._busy

    # --- HTTP -----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/chat", self._chat)
        app.router.add_static("/static/", STATIC_DIR)
        app.on_response_prepare.append(_no_cache_headers)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def _index(self, request: web.Request) -> web.Response:
        # The page learns the audio format here (the AudioContext is made before any socket).
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        page = page.replace("{sample_rate}", str(protocol.SAMPLE_RATE))
        page = page.replace("{frame_size}", str(protocol.FRAME_SIZE))
        return web.Response(text=page, content_type="text/html")

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            # A page from another site must not drive the local model through the browser.
            raise web.HTTPForbidden(text="cross-origin WebSocket refused")
        # The heartbeat ends a conversation whose page vanished without closing (a laptop
        # put to sleep), so the model does not stay taken forever.
        ws = web.WebSocketResponse(max_msg_size=protocol.MAX_CLIENT_MESSAGE_BYTES, heartbeat=10.0)
        await ws.prepare(request)
        if self._busy:
            await ws.send_bytes(
                protocol.status_message(
                    "busy", "Moshi is already in a conversation with another client; try later."
                )
            )
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return ws
        if self.engine is None:
            await ws.send_bytes(protocol.status_message("error", "the model is not loaded yet"))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"not ready")
            return ws
        self._busy = True  # no await since the check above: no other handler can slip in
        self._sockets.add(ws)
        peer = request.remote
        log.info("conversation started (%s)", peer)
        try:
            conversation = _Conversation(self, self.engine, ws)
            await conversation.run()
            log.info(
                "conversation ended (%s): %d frames in, %d out, %d dropped",
                peer,
                conversation.frames_in,
                conversation.frames_out,
                conversation.frames_dropped,
            )
        finally:
            self._sockets.discard(ws)
            self._busy = False
        return ws


class _Conversation:
    """One WebSocket session: a receive loop feeding a bounded queue, a model loop draining it."""

    def __init__(self, server: ChatServer, engine: ConversationEngine, ws: web.WebSocketResponse):
        self.server = server
        self.engine = engine
        self.ws = ws
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=server.max_queued_frames)
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self._dropped_reported = 0
        self._last_step_ms = 0.0

    async def run(self) -> None:
        try:
            await self.server.run_on_model_thread(self.engine.reset)
        except Exception:
            log.exception("engine.reset failed")
            await self._fail("the model could not start a conversation", WSCloseCode.INTERNAL_ERROR)
            return
        try:
            await self.ws.send_bytes(protocol.handshake_message())
        except (ConnectionError, RuntimeError):
            return  # the page left while the model was resetting
        model_task = asyncio.create_task(self._model_loop())
        try:
            await self._receive_loop()
        finally:
            model_task.cancel()
            # A step already running on the model thread finishes there; the next
            # conversation's reset is queued behind it on the same thread.
            await asyncio.gather(model_task, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close()

    async def _receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                try:
                    pcm = protocol.parse_client_message(msg.data)
                except protocol.ProtocolError as exc:
                    await self._fail(f"malformed message: {exc}", WSCloseCode.UNSUPPORTED_DATA)
                    return
                self._enqueue(pcm)
            elif msg.type == WSMsgType.TEXT:
                await self._fail(
                    "malformed message: text frames are not part of the protocol",
                    WSCloseCode.UNSUPPORTED_DATA,
                )
                return
            elif msg.type == WSMsgType.ERROR:
                # e.g. a message over max_msg_size: aiohttp has already closed with 1009.
                log.info("websocket error: %s", self.ws.exception())
                return

    def _enqueue(self, pcm: np.ndarray) -> None:
        self.frames_in += 1
        if self.queue.full():
            self.queue.get_nowait()  # skip ahead: the oldest waiting frame is the most stale
            self.frames_dropped += 1
        self.queue.put_nowait(pcm)

    async def _model_loop(self) -> None:
        try:
            while True:
                pcm = await self.queue.get()
                started = time.perf_counter()
                try:
                    out = await self.server.run_on_model_thread(self.engine.process, pcm)
                except Exception:
                    log.exception("engine.process failed")
                    await self._fail("the model failed on a frame", WSCloseCode.INTERNAL_ERROR)
                    return
                self._last_step_ms = 1000.0 * (time.perf_counter() - started)
                await self.ws.send_bytes(protocol.audio_message(out.pcm))
                if out.text:
                    await self.ws.send_bytes(protocol.text_message(out.text))
                self.frames_out += 1
                if (
                    self.frames_dropped != self._dropped_reported
                    or self.frames_out % self.server.stats_every_frames == 0
                ):
                    await self._send_lag()
        except (ConnectionError, RuntimeError) as exc:
            # The page went away while we were sending; the receive loop ends the session.
            log.debug("send failed: %s", exc)

    async def _send_lag(self) -> None:
        self._dropped_reported = self.frames_dropped
        await self.ws.send_bytes(
            protocol.status_message(
                "lag",
                queued_frames=self.queue.qsize(),
                dropped_frames=self.frames_dropped,
                step_ms=round(self._last_step_ms, 1),
                realtime_factor=round(self._last_step_ms / (1000.0 * FRAME_SECONDS), 3),
            )
        )

    async def _fail(self, message: str, code: int) -> None:
        try:
            await self.ws.send_bytes(protocol.status_message("error", message))
        except (ConnectionError, RuntimeError):
            pass
        await self.ws.close(code=code, message=message[:120].encode("utf-8"))


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser (scripts, tests): nothing to protect against
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


async def _no_cache_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-cache"
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:"
        )


async def serve(server: ChatServer, host: str, port: int) -> web.AppRunner:
    """Start listening; returns the runner (call `await runner.cleanup()` to stop)."""
    runner = web.AppRunner(server.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("server is not listening")
