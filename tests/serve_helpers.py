"""A real aiohttp server on a free loopback port, run by its own event loop in a background
thread, so blocking clients (the `openai` SDK, urllib) can talk to it from a test."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from aiohttp import web


class BackgroundServer:
    """`with BackgroundServer(make_app) as server:` serves make_app() (called on the server's
    loop) at server.url until the block ends. send_buffer: the connections' SO_SNDBUF (no
    kernel autotuning), so a client that stops reading blocks the server's writes soon."""

    def __init__(self, make_app: Callable[[], web.Application],
                 send_buffer: int | None = None) -> None:
        self.make_app = make_app
        self.send_buffer = send_buffer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server",
                                       daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.make_app(), access_log=None)
        await self.runner.setup()
        listener = socket.socket()
        if self.send_buffer is not None:  # accepted sockets inherit it
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        listener.bind(("127.0.0.1", 0))
        site = web.SockSite(self.runner, listener)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
