"""The HTTP layer under hostile and careless clients (moshi_mlx/web/http.py, issue 17's "HTTP
layer every route shares, hardened"): DNS rebinding and foreign pages refused, one log line
per client mistake and never a traceback, exact WebSocket size limits, idle conversations
ended, reconnects right after a conversation served, a raised file-descriptor limit.

The engine is test_web_server's FakeEngine (frame n answers -0.5 x its input and " s<n>");
expected values come from the issue's rules and the limits the README documents."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from test_web_server import PCM, FakeEngine, audio_bytes, expect_handshake, frame_int16

from moshi_mlx.modules.sampling import SamplingSettings
from moshi_mlx.web import kyutai, protocol
from moshi_mlx.web.http import HostPolicy, bound_port, start_site
from moshi_mlx.web.server import ChatServer

OUR_LIMIT = 4096  # README: messages over 4096 bytes are refused in our protocol
KYUTAI_LIMIT = 130_615  # README: over two of the largest Ogg pages in Kyutai's
LOGGERS = ("aiohttp", "asyncio", "moshi_mlx")


@asynccontextmanager
async def serving(engine=None, *, bind_host: str = "127.0.0.1", idle_connection_s: float = 15.0,
                  **server_args):
    server = ChatServer(engine or FakeEngine(), **server_args)
    runner = await start_site(server.make_app(HostPolicy(bind_host)), "127.0.0.1", 0,
                              idle_timeout_s=idle_connection_s)
    try:
        yield bound_port(runner), server
    finally:
        await runner.cleanup()
        server.close()


@pytest.fixture
def logs(caplog):
    """Every record our, aiohttp's and asyncio's loggers emit, from DEBUG up."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def records(caplog, level: int = logging.INFO) -> list[logging.LogRecord]:
    """The log lines a server run at `level` shows."""
    return [r for r in caplog.records
            if r.name.split(".")[0] in LOGGERS and r.levelno >= level]


def assert_one_line_each(recs: list[logging.LogRecord]) -> None:
    for record in recs:
        assert record.exc_info is None and not record.exc_text, record.getMessage()
        assert "\n" not in record.getMessage() and "Traceback" not in record.getMessage()


async def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return answer


async def status_of(session, port: int, path: str, host: str, origin: str | None = None) -> int:
    headers = {"Host": host} | ({"Origin": origin} if origin else {})
    if path == "/api/chat":
        try:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}{path}", protocols=PCM,
                                          headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await expect_handshake(ws)
        await ws.close()
        return 101
    async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
        return response.status


# --- which hosts may talk to the server ------------------------------------------------------

def test_host_policy_follows_the_rebinding_rules():
    policy = HostPolicy("127.0.0.1")
    accepted = [("localhost:8998", None), ("LOCALHOST", None), ("app.localhost:1", None),
                ("127.0.0.1:8998", None), ("127.9.9.9", None), ("[::1]:8998", None),
                ("192.168.1.5:8998", None), ("[fe80::1]:80", None), (None, None),
                ("localhost:8998", "http://localhost:3000"),  # loopback origin, any port
                ("192.168.1.5:8998", "http://192.168.1.5:8998"),
                ("127.0.0.1:8998", "http://[::1]:5173")]
    for host, origin in accepted:
        assert policy.refusal(host, origin) is None, (host, origin)
    refused = [("evil.example:8998", None), ("evil.example:8998", "http://evil.example:8998"),
               ("127.0.0.1:8998", "http://evil.example"), ("127.0.0.1:8998", "null"),
               ("localhost.evil.example", None), ("127.0.0.1.nip.io", None),
               ("192.168.1.5:8998", "http://192.168.1.6:8998"), ("a b", None),
               ("127.0.0.1:99999", None), ("mymac.local:8998", None)]
    for host, origin in refused:
        assert policy.refusal(host, origin) is not None, (host, origin)
    named = HostPolicy("MyMac.local")
    assert named.refusal("mymac.local:8998", "http://mymac.local:8998") is None
    assert named.refusal("mymac.local:8998", "http://other.local:8998") is not None
    assert named.refusal("other.local:8998", None) is not None


def test_dns_rebinding_is_refused_on_the_socket_and_the_page(logs):
    engine = FakeEngine()

    async def scenario():
        async with serving(engine) as (port, _), aiohttp.ClientSession() as session:
            rebound = f"evil.example:{port}"
            for path in ("/api/chat", "/", "/static/app.js"):
                assert await status_of(session, port, path, rebound,
                                       f"http://{rebound}") == 403, path
            assert await status_of(session, port, "/api/chat", rebound) == 403
            # A foreign page through a loopback Host is refused too.
            local = f"127.0.0.1:{port}"
            for origin in ("http://evil.example", f"http://evil.example:{port}", "null"):
                assert await status_of(session, port, "/api/chat", local, origin) == 403
                assert await status_of(session, port, "/", local, origin) == 403

    asyncio.run(scenario())
    assert engine.resets == 0  # no conversation was started
    refusals = [r for r in records(logs) if "refused" in r.getMessage()]
    assert len(refusals) == 4 + 6 and all(r.levelno == logging.WARNING for r in refusals)
    assert "evil.example" in refusals[0].getMessage()
    assert_one_line_each(records(logs))


def test_loopback_ip_and_bind_host_names_are_served():
    async def scenario():
        async with serving() as (port, _), aiohttp.ClientSession() as session:
            for host, origin in [(f"localhost:{port}", f"http://localhost:{port}"),
                                 (f"app.localhost:{port}", "http://localhost:5173"),
                                 (f"[::1]:{port}", f"http://[::1]:{port}"),
                                 (f"10.1.2.3:{port}", f"http://10.1.2.3:{port}"),
                                 (f"127.0.0.1:{port}", None)]:
                for path, expected in (("/", 200), ("/api/chat", 101)):
                    assert await status_of(session, port, path, host, origin) == expected
        async with serving(bind_host="mymac.local") as (port, _), \
                aiohttp.ClientSession() as session:
            host = f"mymac.local:{port}"
            assert await status_of(session, port, "/api/chat", host, f"http://{host}") == 101
            assert await status_of(session, port, "/", host, f"http://{host}") == 200
            assert await status_of(session, port, "/", f"other.local:{port}") == 403

    asyncio.run(scenario())


# --- one log line per client mistake ---------------------------------------------------------

def upgrade_request(port: int) -> bytes:
    return (f"GET /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {PCM[0]}\r\n\r\n").encode()


@pytest.mark.parametrize("when", ["right after the upgrade", "mid-conversation"])
def test_upgrade_then_tcp_reset_is_one_log_line(when, logs):
    engine = FakeEngine()

    async def scenario():
        async with serving(engine) as (port, _), aiohttp.ClientSession() as session:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.write(upgrade_request(port))
            if when == "mid-conversation":
                await reader.readuntil(b"\r\n\r\n")  # 101 and its headers
                await reader.readexactly(2 + len(protocol.handshake_message()))
                # One audio frame of silence, masked with a zero key (its bytes stay as they are).
                audio = b"\x01" + bytes(3840)
                writer.write(struct.pack("!BBH", 0x82, 0xFE, len(audio)) + bytes(4) + audio)
                await reader.readexactly(4 + 3841)  # Moshi's answer to it
            writer.transport.abort()  # SO_LINGER 0: a TCP reset instead of a goodbye
            await asyncio.sleep(0.5)
            before = len(records(logs))
            ws = await session.ws_connect(f"http://127.0.0.1:{port}/api/chat", protocols=PCM)
            await expect_handshake(ws)  # the server still serves
            await ws.close()
            return before

    before = asyncio.run(scenario())
    recs = records(logs)[:before]
    if when == "mid-conversation":  # the conversation's own start and end lines, nothing else
        assert [r.getMessage().split(" (")[0] for r in recs] == [
            "conversation started", "conversation ended"], [r.getMessage() for r in recs]
        assert engine.inputs and not engine.inputs[0].any()
    else:
        assert len(recs) == 1, [r.getMessage() for r in recs]
        assert "127.0.0.1" in recs[0].getMessage()
    assert_one_line_each(records(logs, logging.DEBUG))


MALFORMED_HTTP = {
    "9 KB header": "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + "a" * 9000 + "\r\n\r\n",
    "space in the path": "GET /a b HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "Content-Length with Transfer-Encoding": (
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("name", list(MALFORMED_HTTP))
def test_malformed_http_is_400_and_one_log_line(name, logs):
    async def scenario():
        async with serving() as (port, _):
            answer = await raw_exchange(port, MALFORMED_HTTP[name].encode())
            await asyncio.sleep(0.1)
            return answer

    answer = asyncio.run(scenario())
    assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer[:80]
    recs = records(logs)
    assert len(recs) == 1, [r.getMessage() for r in recs]
    assert recs[0].getMessage().startswith("malformed HTTP request from 127.0.0.1: ")
    assert_one_line_each(records(logs, logging.DEBUG))


# --- connections that hold resources ---------------------------------------------------------

def test_half_sent_and_idle_keep_alive_connections_are_closed():
    async def scenario():
        async with serving(idle_connection_s=0.5) as (port, _):
            started = time.monotonic()
            answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Par")
            assert answer == b""  # closed without an answer: the headers never ended
            half_sent_s = time.monotonic() - started
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            started = time.monotonic()
            answer = await asyncio.wait_for(reader.read(), 5)  # served, then kept alive
            idle_s = time.monotonic() - started
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 ")
            # A conversation is no idle connection: it outlives that timeout.
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/api/chat", protocols=PCM)
                await expect_handshake(ws)
                for i in range(10):
                    await ws.send_bytes(audio_bytes(frame_int16(i)))
                    while (await ws.receive(timeout=5)).data[0] != 0x02:
                        pass  # its audio (and lag statuses) first, then its text
                    await asyncio.sleep(0.1)
                await ws.close()
            return half_sent_s, idle_s

    half_sent_s, idle_s = asyncio.run(scenario())
    assert 0.4 <= half_sent_s < 3 and 0.4 <= idle_s < 3, (half_sent_s, idle_s)


def test_start_site_raises_the_soft_open_files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        async def scenario():
            async with serving():
                return resource.getrlimit(resource.RLIMIT_NOFILE)

        raised, kept_hard = asyncio.run(scenario())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert kept_hard == hard
    assert raised == (4096 if hard == resource.RLIM_INFINITY else min(hard, 4096))


ACCEPT_FLOOD_SERVER = """
import asyncio, logging, os, resource, sys
from moshi_mlx.web.http import HostPolicy, bound_port, make_app, start_site

async def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    runner = await start_site(make_app(HostPolicy("127.0.0.1"), client_max_size=1024),
                              "127.0.0.1", 0)
    # As with macOS's default limit and a page opening many connections: few fds left.
    open_now = len(os.listdir("/dev/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (open_now + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(bound_port(runner), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_accept_out_of_file_descriptors_is_one_line_per_interval():
    server = subprocess.Popen([sys.executable, "-c", ACCEPT_FLOOD_SERVER],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
    clients = []
    try:
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
        time.sleep(3.0)  # asyncio retries accept() every second
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=10)
        for client in clients:
            client.close()
    lines = [line for line in errors.splitlines() if line.strip()]
    flood = [line for line in lines if "out of system resource" in line]
    assert len(flood) == 1, lines
    assert "Too many open files" in flood[0]
    assert not any("Traceback" in line for line in lines), lines


# --- WebSocket size limits -------------------------------------------------------------------

async def close_code_after(ws, message: bytes) -> int:
    await ws.send_bytes(message)
    while True:
        msg = await ws.receive(timeout=5)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return ws.close_code


def test_our_protocol_limit_is_exactly_4096_bytes():
    async def scenario():
        async with serving() as (port, _), aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/chat"
            codes = []
            for size, compress in ((OUR_LIMIT, 0), (OUR_LIMIT + 1, 0), (OUR_LIMIT + 1, 15)):
                ws = await session.ws_connect(url, protocols=PCM, compress=compress)
                await expect_handshake(ws)
                codes.append(await close_code_after(ws, b"\x01" + bytes(size - 1)))
            return codes

    # At the limit the message is read, then refused as malformed (it is no audio frame:
    # 4095 payload bytes); one byte more is refused by size, compression asked or not.
    assert asyncio.run(scenario()) == [aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                                       aiohttp.WSCloseCode.MESSAGE_TOO_BIG,
                                       aiohttp.WSCloseCode.MESSAGE_TOO_BIG]


def test_kyutai_protocol_limit_is_exactly_two_largest_ogg_pages():
    if kyutai.load_sphn() is None:
        pytest.fail("sphn is not installed (pip install -e '.[dev]')")
    assert KYUTAI_LIMIT == kyutai.MAX_CLIENT_MESSAGE_BYTES == 1 + 2 * (27 + 255 + 255 * 255)

    async def scenario():
        async with serving() as (port, _), aiohttp.ClientSession() as session:
            codes = []
            for size in (KYUTAI_LIMIT, KYUTAI_LIMIT + 1):
                ws = await session.ws_connect(f"http://127.0.0.1:{port}/api/chat")
                assert (await ws.receive(timeout=5)).data == b"\x00"
                codes.append(await close_code_after(ws, b"\x01" + bytes(size - 1)))
            return codes

    # At the limit the message is read and its bytes refused as no Ogg stream; one byte more
    # is refused by size before it is read.
    assert asyncio.run(scenario()) == [aiohttp.WSCloseCode.UNSUPPORTED_DATA,
                                       aiohttp.WSCloseCode.MESSAGE_TOO_BIG]


# --- the conversation slot -------------------------------------------------------------------

def test_pinging_client_that_sends_no_audio_is_closed():
    idle_s = 0.6

    async def scenario():
        async with serving(idle_timeout_s=idle_s) as (port, _), \
                aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/chat"
            # Talking for longer than idle_s keeps the conversation.
            ws = await session.ws_connect(url, protocols=PCM, heartbeat=0.1)
            await expect_handshake(ws)
            for i in range(12):
                await ws.send_bytes(audio_bytes(frame_int16(i)))
                await asyncio.sleep(0.1)
            answered = 0
            while answered < 12:
                kind = (await ws.receive(timeout=5)).data[0]
                answered += kind == 0x01
            last_audio = time.monotonic()
            # Then silent, while its heartbeat pings the server every 0.1 s.
            statuses = []
            while True:
                msg = await ws.receive(timeout=5)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                if msg.data[0] == 0x05:
                    statuses.append(json.loads(msg.data[1:]))
            closed_after = time.monotonic() - last_audio
            assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
            assert statuses[-1]["type"] == "error" and "no audio" in statuses[-1]["message"]
            again = await session.ws_connect(url, protocols=PCM)
            await expect_handshake(again)  # the slot is free again
            await again.close()
            return closed_after

    closed_after = asyncio.run(scenario())
    assert idle_s - 0.2 <= closed_after < idle_s + 1.5, closed_after


class SlowSamplingEngine(FakeEngine):
    """Changing its sampling settings takes a while, as the real engine's warm-up does."""

    def __init__(self, set_sampling_s: float):
        super().__init__()
        self.sampling = SamplingSettings(0.7, 25, 0.8, 250)
        self.set_sampling_s = set_sampling_s
        self.seen: list[SamplingSettings] = []

    def set_sampling(self, settings: SamplingSettings) -> None:
        time.sleep(self.set_sampling_s)
        self.sampling = settings

    def process(self, pcm: np.ndarray) -> SimpleNamespace:
        self.seen.append(self.sampling)
        return super().process(pcm)


def test_back_to_back_reconnects_with_sampling_settings_are_all_served():
    engine = SlowSamplingEngine(set_sampling_s=0.1)
    query = "?text_temperature=0.3&text_topk=10&audio_temperature=0.6&audio_topk=100"

    async def scenario():
        async with serving(engine) as (port, _), aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/chat{query}"
            for i in range(25):
                ws = await session.ws_connect(url, protocols=PCM)
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == 0x00, \
                    (i, msg, ws.close_code)
                await ws.send_bytes(audio_bytes(frame_int16(i)))
                while (await ws.receive(timeout=5)).data[0] != 0x02:
                    pass
                await ws.close()

    asyncio.run(scenario())
    assert engine.resets == 25
    assert engine.seen == [SamplingSettings(0.3, 10, 0.6, 100)] * 25
    assert engine.sampling == SamplingSettings(0.7, 25, 0.8, 250)  # restored after the last


def test_a_running_conversation_still_makes_the_next_client_busy_at_once():
    async def scenario():
        async with serving(teardown_wait_s=5.0) as (port, _), \
                aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/chat"
            first = await session.ws_connect(url, protocols=PCM)
            await expect_handshake(first)
            started = time.monotonic()
            second = await session.ws_connect(url, protocols=PCM)
            msg = await second.receive(timeout=5)
            waited = time.monotonic() - started
            assert json.loads(msg.data[1:])["type"] == "busy"
            await first.close()
            return waited

    assert asyncio.run(scenario()) < 1.0  # not held for the teardown wait


def test_teardown_longer_than_the_wait_makes_the_next_client_busy():
    engine = SlowSamplingEngine(set_sampling_s=1.0)

    async def scenario():
        async with serving(engine, teardown_wait_s=0.3) as (port, _), \
                aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/chat"
            first = await session.ws_connect(url + "?text_topk=3", protocols=PCM)
            await expect_handshake(first)
            await first.close()  # restoring the settings now takes 1 s on the model thread
            started = time.monotonic()
            second = await session.ws_connect(url, protocols=PCM)
            msg = await second.receive(timeout=5)
            return json.loads(msg.data[1:])["type"], time.monotonic() - started

    status, waited = asyncio.run(scenario())
    assert status == "busy" and 0.25 <= waited < 0.9, (status, waited)
