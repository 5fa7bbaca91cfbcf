"""A real aiohttp server on a free loopback port, run by its own event loop in a background
thread, so blocking clients (the `openai` SDK, urllib) can talk to it from a test."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class ServeProcess:
    process: subprocess.Popen
    line: str  # the first line it printed ("serving ... at URL ...")
    url: str  # http://127.0.0.1:PORT


@contextmanager
def serve_command(argv: list[str], env: dict, cwd: Path | None = None
                  ) -> Iterator[ServeProcess]:
    """`python -m moshi_mlx.serve ARGV` on a free port (an --port of ARGV replaced); yields
    once it serves, then stops it with Ctrl-C and checks that it exits 0 without a traceback."""
    argv = list(argv)
    if "--port" in argv:
        del argv[argv.index("--port"): argv.index("--port") + 2]
    server = subprocess.Popen([sys.executable, "-m", "moshi_mlx.serve", *argv, "--port", "0"],
                              cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("serving "), server.stderr.read()[-3000:]
        url = line.split(" at ")[1].split()[0].replace("localhost", "127.0.0.1")
        yield ServeProcess(server, line, url)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
