"""aiohttp server: a page, its static files, and one conversation at a time over /api/chat.

/api/chat speaks two protocols, chosen per connection: ours (raw PCM, protocol.py) for clients
that ask for the WebSocket subprotocol `protocol.SUBPROTOCOL` (our page does), Kyutai's
(Ogg/Opus, kyutai.py) for all others, so that Kyutai's unmodified clients work. Only the
framing differs (a "wire"); the conversation (model thread, bounded queue, lag) is one code.

All model work (loading, prompts, `reset`, `process`) runs on one dedicated worker thread, so
the event loop never waits on MLX and frames are processed strictly in arrival order.

Prompts (issue 19): every conversation starts from the server's own prompt (its command line's,
a `PromptPlan`) unless its client sends a text prompt of its own (`?text_prompt=...`, as NVIDIA
PersonaPlex's web client does); the phases then run on the model thread before the handshake.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from moshi_mlx.cli.model_thread import load_on_model_thread, start_model_thread, stop_model_thread
from moshi_mlx.cli.prompt_args import PromptPlan
from moshi_mlx.errors import PromptError
from moshi_mlx.web import kyutai, protocol
from moshi_mlx.web.address import DEFAULT_HOST
from moshi_mlx.web.http import HostPolicy, start_site, websocket_max_msg_size
from moshi_mlx.web.http import bound_port as bound_port  # re-exported for serve()'s callers
from moshi_mlx.web.http import make_app as make_http_app
from moshi_mlx.web.limits import MAX_TEXT_PROMPT_CHARS
from moshi_mlx.web.query import QueryError, sampling_overrides, text_prompt

log = logging.getLogger("moshi_mlx.web")

STATIC_DIR = Path(__file__).parent / "static"
OUR_PAGE = "ours"  # ChatServer(page=...): our page (the default), a folder, or None
FRAME_SECONDS = protocol.FRAME_SIZE / protocol.SAMPLE_RATE
LAG_LOG_INTERVAL_S = 5.0
# A conversation with no audio message from its client for this long ends (close 1001), so a
# client that answers pings but never talks does not hold the only slot forever.
IDLE_CONVERSATION_TIMEOUT_S = 30.0
# A client arriving while the previous conversation is tearing down (restoring the server's
# sampling settings on the model thread) waits this long at most for it, then is told busy.
TEARDOWN_WAIT_S = 5.0
# /api/chat and the pages take no request bodies.
MAX_REQUEST_BODY_BYTES = 64 * 1024
_UNKNOWN_PROMPT = object()  # the engine's prompt after a prompt failed half-way


class ConversationEngine(Protocol):
    """What the server needs from `moshi_mlx.conversation.engine.Engine`.

    Optional: `sampling` and `set_sampling(settings)` (moshi_mlx.modules.sampling.SamplingSettings),
    through which a client's sampling query parameters apply to its conversation only;
    `set_prompt` / `load_prompt_state` (moshi_mlx.conversation.prompts), through which a client's
    text prompt does.
    """

    def reset(self) -> None: ...

    def process(self, pcm: np.ndarray) -> Any:  # returns an object with .pcm and .text
        ...


class Wire(Protocol):
    """One connection's framing and audio codec (protocol.PcmWire, kyutai.OpusWire)."""

    name: str
    max_message_bytes: int

    def ready_message(self) -> bytes: ...

    def frames(self, data: bytes) -> list[np.ndarray]: ...  # raises protocol.ProtocolError

    def output_messages(self, pcm: np.ndarray, text: str | None) -> list[bytes]: ...

    def status_message(self, status_type: str, message: str = "", **fields: Any
                       ) -> bytes | None: ...


class ChatServer:
    """Serves the page and runs conversations on `engine`, one client at a time.

    max_queued_frames bounds the frames waiting for the model: when the model is slower than
    real time the oldest waiting frame is dropped (counted, logged, and reported to our page)
    instead of letting the delay grow without end.

    page: OUR_PAGE (our page at / and /static/), a folder to serve at / (a build of Kyutai's
    web client: its index.html and files), or None (no page, only /api/chat).

    idle_timeout_s: a conversation whose client sends no audio for this long ends.
    teardown_wait_s: how long a client arriving while the previous conversation tears down
    waits for the model instead of being told busy.

    prompt: the server's own prompt, already in the engine when it is given (the entry points
    apply it right after loading); a conversation whose client sends its own text prompt runs
    that one (with the server's voice prompt), and the next one without gets this one back.
    """

    def __init__(
        self,
        engine: ConversationEngine | None = None,
        *,
        max_queued_frames: int = 4,
        stats_every_frames: int = 6,
        page: str | Path | None = OUR_PAGE,
        idle_timeout_s: float = IDLE_CONVERSATION_TIMEOUT_S,
        teardown_wait_s: float = TEARDOWN_WAIT_S,
        executor: ThreadPoolExecutor | None = None,
        prompt: PromptPlan | None = None,
    ) -> None:
        """executor: the model thread to run on, when the caller owns one (the `serve`
        command shares its thread between families); by default the server starts its own
        and `close()` stops it."""
        if max_queued_frames < 1:
            raise ValueError("max_queued_frames must be at least 1")
        self.engine = engine
        self.max_queued_frames = max_queued_frames
        self.stats_every_frames = stats_every_frames
        self.page = page
        self.idle_timeout_s = idle_timeout_s
        self.teardown_wait_s = teardown_wait_s
        self.prompt = prompt or PromptPlan()
        # The client text prompt the engine holds now (model thread only); None: the server's.
        self._prompt_in_engine: object = None
        self._owns_executor = executor is None
        self._executor = executor or start_model_thread()
        self._busy = False
        self._finishing = False  # the conversation holding the slot is tearing down
        self._released: asyncio.Event | None = None  # set when that conversation has ended
        self._sockets: set[web.WebSocketResponse] = set()
        self._sphn: Any = None
        self._sphn_missing_logged = False

    # --- model thread -------------------------------------------------------------------

    def load_engine(self, factory: Callable[[], ConversationEngine]) -> ConversationEngine:
        """Build the engine on the model thread (MLX state then lives on that one thread)."""
        self.engine = load_on_model_thread(self._executor, factory)
        return self.engine

    async def run_on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def use_prompt(self, engine: ConversationEngine, client_text: str | None) -> None:
        """On the model thread: put in `engine` the prompt a conversation starts from (the
        client's text prompt, else the server's own), running it only when the engine does not
        hold it already. Raises PromptError (e.g. a text longer than the context allows)."""
        if client_text == self._prompt_in_engine:
            return
        if client_text is not None and not hasattr(engine, "set_prompt"):
            log.info("this engine takes no prompt; ignoring the client's text_prompt")
            return
        self._prompt_in_engine = _UNKNOWN_PROMPT
        if client_text is None:
            line = self.prompt.restore(engine)
            log.info("the server's prompt is back: %s", line)
        else:
            line = self.prompt.with_text(client_text).apply(engine)
            log.info("the client's prompt: %s", line)
        self._prompt_in_engine = client_text

    def close(self) -> None:
        if self._owns_executor:
            stop_model_thread(self._executor)

    @property
    def busy(self) -> bool:
        return self._busy

    # --- HTTP -----------------------------------------------------------------------------

    def make_app(self, policy: HostPolicy | None = None) -> web.Application:
        """An app of its own (http.make_app) with this server's routes; `policy` defaults to
        accepting only loopback names and IP literals."""
        app = make_http_app(policy or HostPolicy(DEFAULT_HOST),
                            client_max_size=MAX_REQUEST_BODY_BYTES)
        self.add_routes(app)
        return app

    def add_routes(self, app: web.Application) -> None:
        """Mount /api/chat (and the page, when there is one) on `app`, an http.make_app app."""
        app.router.add_get("/api/chat", self._chat)
        if self.page == OUR_PAGE:
            app.router.add_get("/", self._index)
            app.router.add_static("/static/", STATIC_DIR)
            app.on_response_prepare.append(_our_page_headers)
        elif self.page is not None:  # e.g. Kyutai's web client, as its server serves it
            folder = Path(self.page)

            async def folder_index(request: web.Request) -> web.FileResponse:
                return web.FileResponse(folder / "index.html")

            app.router.add_get("/", folder_index)
            app.router.add_static("/", folder)
        app.on_shutdown.append(self._close_sockets)

    async def _index(self, request: web.Request) -> web.Response:
        # The page learns the audio format here (the AudioContext is made before any socket).
        page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
        page = page.replace("{sample_rate}", str(protocol.SAMPLE_RATE))
        page = page.replace("{frame_size}", str(protocol.FRAME_SIZE))
        page = page.replace("{subprotocol}", protocol.SUBPROTOCOL)
        page = page.replace("{max_text_prompt_chars}", str(MAX_TEXT_PROMPT_CHARS))
        return web.Response(text=page, content_type="text/html")

    async def _close_sockets(self, app: web.Application) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    def _sphn_module(self) -> Any:
        """sphn, or None (then logged once per server: Kyutai's clients are refused)."""
        if self._sphn is None:
            self._sphn = kyutai.load_sphn()
            if self._sphn is None and not self._sphn_missing_logged:
                self._sphn_missing_logged = True
                log.warning("Kyutai's clients (Opus) are refused: sphn is not installed (%s)",
                            kyutai.INSTALL_HINT)
        return self._sphn

    async def _take_slot(self) -> bool:
        """The conversation slot, when free or once the conversation holding it has torn
        down (waiting at most teardown_wait_s); False: another conversation is running."""
        deadline = asyncio.get_running_loop().time() + self.teardown_wait_s
        while self._busy:
            released = self._released
            left = deadline - asyncio.get_running_loop().time()
            if not self._finishing or released is None or left <= 0:
                return False
            try:
                await asyncio.wait_for(released.wait(), left)
            except asyncio.TimeoutError:
                return False
        self._busy, self._finishing = True, False
        self._released = asyncio.Event()
        return True

    def _release_slot(self) -> None:
        self._busy, self._finishing = False, False
        if self._released is not None:
            self._released.set()

    def conversation_finishing(self) -> None:
        """Called once the client of the running conversation is gone: from here on, a new
        client waits for the teardown instead of being told busy."""
        self._finishing = True

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        ours = protocol.SUBPROTOCOL in _requested_subprotocols(request)
        # The heartbeat ends a conversation whose page vanished without closing (a laptop
        # put to sleep), so the model does not stay taken forever. Compression is off: audio
        # barely compresses, and aiohttp checks the size of compressed messages differently.
        ws = web.WebSocketResponse(
            protocols=(protocol.SUBPROTOCOL,) if ours else (),
            max_msg_size=websocket_max_msg_size(protocol.MAX_CLIENT_MESSAGE_BYTES if ours
                                                else kyutai.MAX_CLIENT_MESSAGE_BYTES),
            heartbeat=10.0,
            compress=False,
        )
        await ws.prepare(request)
        wire: Wire | None = protocol.PcmWire() if ours else None
        try:
            overrides = sampling_overrides(request.query)
            client_prompt = text_prompt(request.query)
        except QueryError as exc:
            log.info("conversation refused (%s): bad query parameter: %s", request.remote, exc)
            await _refuse(ws, wire, "error", f"bad query parameter: {exc}",
                          WSCloseCode.POLICY_VIOLATION)
            return ws
        if not ours:
            sphn = self._sphn_module()
            if sphn is None:
                await _refuse(ws, None, "error",
                              f"Opus needs sphn on the server: {kyutai.INSTALL_HINT}",
                              WSCloseCode.INTERNAL_ERROR)
                return ws
            wire = kyutai.OpusWire(sphn)
        assert wire is not None
        if self.engine is None:
            await _refuse(ws, wire, "error", "the model is not loaded yet",
                          WSCloseCode.TRY_AGAIN_LATER)
            return ws
        if not await self._take_slot():
            await _refuse(ws, wire, "busy",
                          "Moshi is already in a conversation with another client; try later.",
                          WSCloseCode.TRY_AGAIN_LATER)
            return ws
        self._sockets.add(ws)
        peer = request.remote
        log.info("conversation started (%s, %s protocol%s%s)", peer, wire.name,
                 f", sampling {overrides}" if overrides else "",
                 f", text prompt of {len(client_prompt)} characters" if client_prompt else "")
        try:
            conversation = _Conversation(self, self.engine, ws, wire, overrides, client_prompt)
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
            self._release_slot()
        return ws


class _Conversation:
    """One WebSocket session: a receive loop feeding a bounded queue, a model loop draining it.

    `wire` turns client messages into model frames and model output into messages; nothing
    else here depends on the protocol.
    """

    def __init__(self, server: ChatServer, engine: ConversationEngine, ws: web.WebSocketResponse,
                 wire: Wire, sampling: dict[str, float | int] | None = None,
                 text_prompt: str | None = None):
        self.server = server
        self.engine = engine
        self.ws = ws
        self.wire = wire
        self.sampling = sampling or {}
        self.text_prompt = text_prompt
        self.queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=server.max_queued_frames)
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        self._dropped_reported = 0
        self._dropped_logged = 0
        self._lag_logged_at = 0.0
        self._last_step_ms = 0.0

    def _start(self) -> Any:
        """On the model thread: this client's prompt (or the server's), its sampling settings,
        then a fresh state. Returns the settings to restore afterwards (None: nothing
        changed)."""
        self.server.use_prompt(self.engine, self.text_prompt)
        previous = None
        if self.sampling:
            previous = getattr(self.engine, "sampling", None)
            if previous is None:
                log.info("this engine has no sampling settings; ignoring %s", self.sampling)
            else:
                self.engine.set_sampling(  # type: ignore[attr-defined]
                    dataclasses.replace(previous, **self.sampling))
        self.engine.reset()
        return previous

    async def run(self) -> None:
        try:
            previous = await self.server.run_on_model_thread(self._start)
        except PromptError as exc:
            if self.text_prompt is None:
                log.error("the server's prompt could not be restored: %s", exc)
                await self._fail("the model could not start a conversation",
                                 WSCloseCode.INTERNAL_ERROR)
            else:
                log.info("conversation refused: text_prompt: %s", exc)
                await self._fail(f"bad text_prompt: {exc}", WSCloseCode.POLICY_VIOLATION)
            return
        except Exception:
            log.exception("engine.reset failed")
            await self._fail("the model could not start a conversation", WSCloseCode.INTERNAL_ERROR)
            return
        try:
            await self._converse()
        finally:
            if previous is not None:  # the next client gets the server's settings again
                try:
                    await self.server.run_on_model_thread(
                        self.engine.set_sampling, previous)  # type: ignore[attr-defined]
                except Exception:
                    log.exception("restoring the sampling settings failed")

    async def _converse(self) -> None:
        try:
            await self.ws.send_bytes(self.wire.ready_message())
        except (ConnectionError, RuntimeError):
            return  # the client left while the model was resetting
        model_task = asyncio.create_task(self._model_loop())
        try:
            await self._receive_loop()
        finally:
            self.server.conversation_finishing()
            model_task.cancel()
            # A step already running on the model thread finishes there; the next
            # conversation's reset is queued behind it on the same thread.
            await asyncio.gather(model_task, return_exceptions=True)
            if not self.ws.closed:
                await self.ws.close()

    async def _receive_loop(self) -> None:
        idle_s = self.server.idle_timeout_s
        while True:
            try:
                # Pings and pongs are answered inside receive() and do not count as activity.
                msg = await asyncio.wait_for(self.ws.receive(), idle_s)
            except asyncio.TimeoutError:
                log.info("conversation idle: no audio for %g s", idle_s)
                await _refuse(self.ws, self.wire, "error",
                              f"no audio for {idle_s:g} s: conversation ended",
                              WSCloseCode.GOING_AWAY)
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.BINARY:
                try:
                    frames = self.wire.frames(msg.data)
                except protocol.ProtocolError as exc:
                    await self._fail(f"malformed message: {exc}", WSCloseCode.UNSUPPORTED_DATA)
                    return
                for pcm in frames:
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
                for message in self.wire.output_messages(out.pcm, out.text):
                    await self.ws.send_bytes(message)
                self.frames_out += 1
                self._log_drops()
                if (
                    self.frames_dropped != self._dropped_reported
                    or self.frames_out % self.server.stats_every_frames == 0
                ):
                    await self._send_lag()
        except (ConnectionError, RuntimeError) as exc:
            # The client went away while we were sending; the receive loop ends the session.
            log.debug("send failed: %s", exc)

    def _log_drops(self) -> None:
        """A log line while frames are being dropped, at most every LAG_LOG_INTERVAL_S."""
        now = time.monotonic()
        if (self.frames_dropped != self._dropped_logged
                and now - self._lag_logged_at >= LAG_LOG_INTERVAL_S):
            log.info("model slower than real time: %d frames dropped so far (step %.0f ms)",
                     self.frames_dropped, self._last_step_ms)
            self._dropped_logged = self.frames_dropped
            self._lag_logged_at = now

    async def _send_lag(self) -> None:
        self._dropped_reported = self.frames_dropped
        status = self.wire.status_message(
            "lag",
            queued_frames=self.queue.qsize(),
            dropped_frames=self.frames_dropped,
            step_ms=round(self._last_step_ms, 1),
            realtime_factor=round(self._last_step_ms / (1000.0 * FRAME_SECONDS), 3),
        )
        if status is not None:
            await self.ws.send_bytes(status)

    async def _fail(self, message: str, code: int) -> None:
        await _refuse(self.ws, self.wire, "error", message, code)


async def _refuse(ws: web.WebSocketResponse, wire: Wire | None, status_type: str, message: str,
                  code: int) -> None:
    """Tell the client why (a status message where its protocol has them), then close with
    the reason (WebSocket close reasons are at most 123 bytes)."""
    status = wire.status_message(status_type, message) if wire is not None else None
    if status is not None:
        try:
            await ws.send_bytes(status)
        except (ConnectionError, RuntimeError):
            pass
    reason = message if status_type == "error" else f"{status_type}: {message}"
    cut = reason.encode("utf-8")[:120].decode("utf-8", errors="ignore")  # whole characters
    await ws.close(code=code, message=cut.encode("utf-8"))


def _requested_subprotocols(request: web.Request) -> list[str]:
    header = request.headers.get("Sec-WebSocket-Protocol", "")
    return [name.strip() for name in header.split(",") if name.strip()]


async def _our_page_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:"
        )


async def serve(server: ChatServer, host: str, port: int) -> web.AppRunner:
    """Start listening on host:port, accepting the hosts HostPolicy(host) does; returns the
    runner (call `await runner.cleanup()` to stop)."""
    return await start_site(server.make_app(HostPolicy(host)), host, port)
