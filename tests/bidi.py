"""A small WebDriver BiDi client, enough to drive stock Firefox from a test.

Firefox speaks WebDriver BiDi natively (no patched build, no geckodriver): started with
`--remote-debugging-port`, it serves a WebSocket at ws://127.0.0.1:<port>/session. Commands are
JSON objects {"id", "method", "params"}; the answer carries the same id, and events
({"type": "event"}) arrive in between. See https://w3c.github.io/webdriver-bidi/.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

FIREFOX = "/usr/bin/firefox-esr"
_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class BiDiError(RuntimeError):
    """A command the browser answered with an error, or a script that threw."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_profile(profile: Path, prefs: dict[str, bool | int | str]) -> None:
    """A fresh Firefox profile folder whose user.js sets `prefs`."""
    profile.mkdir(parents=True, exist_ok=True)
    lines = [f"user_pref({json.dumps(k)}, {json.dumps(v)});" for k, v in prefs.items()]
    (profile / "user.js").write_text("\n".join(lines) + "\n")


class BiDi:
    """One BiDi connection: `command` waits for its answer; events are kept in `events`."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self._ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict]] = {}
        self.events: list[dict] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            future = self._pending.pop(data.get("id"), None)
            if future is not None and not future.done():
                future.set_result(data)
            elif data.get("type") == "event":
                self.events.append(data)
        for future in self._pending.values():  # the browser went away
            if not future.done():
                future.set_exception(BiDiError("BiDi connection closed"))

    async def command(self, method: str, params: dict | None = None,
                      timeout_s: float = 30.0) -> dict:
        self._next_id += 1
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(
            json.dumps({"id": self._next_id, "method": method, "params": params or {}})
        )
        answer = await asyncio.wait_for(future, timeout_s)
        if answer.get("type") == "error":
            raise BiDiError(f"{method}: {answer.get('error')}: {answer.get('message')}")
        return answer["result"]

    async def evaluate_json(self, context: str, expression: str,
                            user_activation: bool = False) -> Any:
        """Evaluate `expression` (a promise is awaited) in the page; it must give a value that
        JSON.stringify can serialize, which comes back parsed."""
        result = await self.command("script.evaluate", {
            "expression": f"(async () => JSON.stringify(await ({expression})))()",
            "target": {"context": context},
            "awaitPromise": True,
            "userActivation": user_activation,
        })
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise BiDiError(f"{expression!r} threw: {details.get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value["type"] == "string" else None

    async def screenshot(self, context: str, path: Path) -> None:
        result = await self.command("browsingContext.captureScreenshot", {"context": context})
        path.write_bytes(base64.b64decode(result["data"]))

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def firefox(profile: Path, prefs: dict[str, bool | int | str], log: Path,
                  env: dict[str, str] | None = None,
                  start_timeout_s: float = 60.0) -> AsyncIterator[tuple[BiDi, str]]:
    """Headless Firefox on a fresh profile with a BiDi session: yields (bidi, top context id).

    Firefox's output goes to `log`; the process is always terminated (then killed) on exit.
    """
    write_profile(profile, prefs)
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [FIREFOX, "--headless", "--no-remote", f"--remote-debugging-port={port}",
             "--profile", str(profile), "about:blank"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    try:
        end = time.monotonic() + start_timeout_s
        while not (found := _LISTENING.search(log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > end:
                raise BiDiError(f"Firefox did not start BiDi (exit {proc.poll()}):\n"
                                + log.read_text(errors="replace")[-3000:])
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{found.group(1)}/session", max_msg_size=0)
            bidi = BiDi(ws)
            try:
                await bidi.command("session.new", {"capabilities": {}})
                tree = await bidi.command("browsingContext.getTree", {"maxDepth": 0})
                yield bidi, tree["contexts"][0]["context"]
                with contextlib.suppress(BiDiError, asyncio.TimeoutError):
                    await bidi.command("session.end", timeout_s=5)
            finally:
                await bidi.close()
    finally:
        _stop(proc)
