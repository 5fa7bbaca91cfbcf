"""The /api/chat server against a real aiohttp client: wire format, one conversation at a
time, fresh state per conversation, bounded queue under a slow model, bad messages.

The engine here is a fake that follows the `moshi_mlx.conversation.engine.Engine` contract, so each
expected value is derived by hand from what the test sent (the real engine runs in
test_web_browser.py)."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest

from moshi_mlx.local_web import build_parser
from moshi_mlx.web import protocol
from moshi_mlx.web.address import page_url
from moshi_mlx.web.server import ChatServer, bound_port, serve

FRAME = 1920
PCM = ("moshi-mlx-pcm",)  # the WebSocket subprotocol that selects our protocol


class FakeEngine:
    """Answers frame n with -0.5 x its input and the text " s<n>" (n counts from reset)."""

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None):
        self.delay_s = delay_s
        self.fail_at = fail_at
        self.steps = 0
        self.resets = 0
        self.inputs: list[np.ndarray] = []
        self.threads: set[int] = set()

    def reset(self) -> None:
        self.threads.add(threading.get_ident())
        self.steps = 0
        self.resets += 1

    def process(self, pcm: np.ndarray) -> SimpleNamespace:
        self.threads.add(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_at is not None and self.steps == self.fail_at:
            raise RuntimeError("boom")
        self.inputs.append(pcm.copy())
        out = SimpleNamespace(pcm=-0.5 * pcm, text=f" s{self.steps}")
        self.steps += 1
        return out


@asynccontextmanager
async def running(engine: FakeEngine, **kwargs):
    server = ChatServer(engine, **kwargs)
    runner = await serve(server, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}", server
    finally:
        await runner.cleanup()
        server.close()


def frame_int16(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, size=FRAME, dtype=np.int16)


def audio_bytes(samples: np.ndarray) -> bytes:
    return b"\x01" + struct.pack(f"<{len(samples)}h", *samples.tolist())


async def receive_kind(ws, timeout: float = 5.0) -> tuple[int, bytes]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return msg.data[0], msg.data[1:]


async def expect_handshake(ws) -> dict:
    kind, payload = await receive_kind(ws)
    assert kind == 0x00
    return json.loads(payload)


async def read_until_closed(ws, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    received = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            received.append((msg.data[0], msg.data[1:]))
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                          aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
            return received


async def connect_when_free(session, url: str, deadline_s: float = 5.0):
    """The server frees itself once the previous socket's handler returns: retry briefly."""
    end = time.monotonic() + deadline_s
    while True:
        ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
        kind, payload = await receive_kind(ws)
        if kind == 0x00:
            return ws
        assert json.loads(payload)["type"] == "busy"
        await ws.close()
        assert time.monotonic() < end, "server stayed busy after the previous client left"
        await asyncio.sleep(0.05)


def test_pcm_wire_format_is_int16_little_endian():
    # Hand-computed: 0.5 * 32768 = 16384; -1.0 -> -32768; +1.0 clips to 32767.
    assert protocol.encode_pcm(np.array([0.5, -1.0, 1.0, 0.0])) == struct.pack(
        "<4h", 16384, -32768, 32767, 0
    )
    assert protocol.decode_pcm(struct.pack("<2h", -16384, 1)).tolist() == [-0.5, 1 / 32768]
    assert protocol.AUDIO_MESSAGE_BYTES == 1 + 2 * 1920


def test_round_trip_in_order_on_a_worker_thread():
    engine = FakeEngine()

    async def scenario():
        # Room for the whole burst: here no frame may be dropped.
        async with running(engine, max_queued_frames=8) as (url, _), \
                aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            assert ws.protocol == "moshi-mlx-pcm"  # the server agreed on our protocol
            handshake = await expect_handshake(ws)
            assert handshake["sample_rate"] == 24000 and handshake["frame_size"] == 1920
            sent = [frame_int16(i) for i in range(5)]
            for samples in sent:
                await ws.send_bytes(audio_bytes(samples))
            for n, samples in enumerate(sent):
                kind, payload = await receive_kind(ws)
                assert kind == 0x01 and len(payload) == 2 * FRAME
                got = np.array(struct.unpack(f"<{FRAME}h", payload))
                # -0.5 * (x / 32768), back to int16: rint(-x / 2), ties to even.
                np.testing.assert_array_equal(got, np.rint(-0.5 * samples.astype(np.float64)))
                kind, payload = await receive_kind(ws)
                assert (kind, payload.decode()) == (0x02, f" s{n}")
            await ws.close()
            for samples, seen in zip(sent, engine.inputs, strict=True):
                np.testing.assert_array_equal(seen, samples / 32768.0)
            assert threading.get_ident() not in engine.threads
            assert len(engine.threads) == 1  # reset and every step on the same model thread

    asyncio.run(scenario())


def test_second_client_is_told_busy_and_first_keeps_talking():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, server), aiohttp.ClientSession() as session:
            first = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(first)
            second = await session.ws_connect(url + "/api/chat", protocols=PCM)
            kind, payload = await receive_kind(second)
            status = json.loads(payload)
            assert kind == 0x05 and status["type"] == "busy" and "try" in status["message"]
            assert (await second.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
            assert second.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER
            assert engine.resets == 1  # the busy client did not touch the conversation
            await first.send_bytes(audio_bytes(frame_int16(0)))
            kinds = [(await receive_kind(first))[0] for _ in range(2)]
            assert kinds == [0x01, 0x02]
            await first.close()
            third = await connect_when_free(session, url)
            await third.close()
            assert not server.busy or engine.resets == 2

    asyncio.run(scenario())


def test_disconnect_frees_the_model_with_a_fresh_state():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            first = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(first)
            for i in range(3):
                await first.send_bytes(audio_bytes(frame_int16(i)))
            texts = []
            while len(texts) < 3:
                kind, payload = await receive_kind(first)
                if kind == 0x02:
                    texts.append(payload.decode())
            assert texts == [" s0", " s1", " s2"]
            await first.close()

            second = await connect_when_free(session, url)
            await second.send_bytes(audio_bytes(frame_int16(9)))
            kind, _ = await receive_kind(second)
            kind, payload = await receive_kind(second)
            # Step counter restarted: the new conversation began from engine.reset().
            assert (kind, payload.decode()) == (0x02, " s0")
            assert engine.resets == 2
            await second.close()

    asyncio.run(scenario())


BAD_MESSAGES = {
    "text frame": "hello",
    "empty": b"",
    "unknown kind": b"\x07" + bytes(3840),
    "handshake kind from client": b"\x00" + bytes(3840),
    "odd byte count": b"\x01" + bytes(3839),
    "short audio": b"\x01" + bytes(100),
    "audio a little too long": b"\x01" + bytes(3842),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_malformed_message_is_rejected_and_server_keeps_serving(name):
    engine = FakeEngine()
    bad = BAD_MESSAGES[name]

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(ws)
            if isinstance(bad, str):
                await ws.send_str(bad)
            else:
                await ws.send_bytes(bad)
            received = await read_until_closed(ws)
            statuses = [json.loads(p) for k, p in received if k == 0x05]
            assert [s["type"] for s in statuses] == ["error"]
            assert "malformed" in statuses[0]["message"]
            assert ws.close_code == aiohttp.WSCloseCode.UNSUPPORTED_DATA
            assert engine.inputs == []  # nothing reached the model

            again = await connect_when_free(session, url)
            await again.send_bytes(audio_bytes(frame_int16(1)))
            assert (await receive_kind(again))[0] == 0x01
            await again.close()

    asyncio.run(scenario())


def test_oversized_message_is_refused_before_buffering():
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(ws)
            await ws.send_bytes(b"\x01" + bytes(2_000_000))
            await read_until_closed(ws)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            assert engine.inputs == []
            again = await connect_when_free(session, url)
            await again.send_bytes(audio_bytes(frame_int16(2)))
            assert (await receive_kind(again))[0] == 0x01
            await again.close()

    asyncio.run(scenario())


def test_slow_model_bounded_queue_drops_oldest_and_reports_lag():
    engine = FakeEngine(delay_s=0.15)
    sent = [frame_int16(100 + i) for i in range(20)]

    async def scenario():
        async with running(engine, max_queued_frames=3) as (url, _), \
                aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(ws)
            for samples in sent:  # 1.6 s of audio at once, the model needs 3 s for it
                await ws.send_bytes(audio_bytes(samples))
            # The event loop stays free while the model thread sleeps in process().
            started = time.perf_counter()
            async with session.get(url + "/") as response:
                assert response.status == 200
            assert time.perf_counter() - started < 0.12
            audio, lags = 0, []
            while True:
                try:
                    msg = await ws.receive(timeout=1.0)
                except asyncio.TimeoutError:
                    break  # nothing more is coming: the queue has drained
                kind, payload = msg.data[0], msg.data[1:]
                audio += kind == 0x01
                if kind == 0x05:
                    lags.append(json.loads(payload))
            await ws.close()
            return audio, lags

    audio, lags = asyncio.run(scenario())
    processed = len(engine.inputs)
    assert audio == processed
    assert processed <= 1 + 3 + 1  # one in the model, three waiting, at most one more
    dropped = max(s["dropped_frames"] for s in lags if s["type"] == "lag")
    assert dropped == len(sent) - processed
    assert lags[0]["step_ms"] >= 150
    # Processed frames are in send order, and the newest frame was kept.
    sent_index = [next(i for i, s in enumerate(sent) if np.array_equal(s / 32768.0, x))
                  for x in engine.inputs]
    assert sent_index == sorted(sent_index) and sent_index[-1] == len(sent) - 1


def test_model_failure_reports_error_then_next_client_starts_fresh():
    engine = FakeEngine(fail_at=1)

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(ws)
            for i in range(2):
                await ws.send_bytes(audio_bytes(frame_int16(i)))
            received = await read_until_closed(ws)
            assert [k for k, _ in received] == [0x01, 0x02, 0x05]
            assert json.loads(received[-1][1])["type"] == "error"
            assert ws.close_code == aiohttp.WSCloseCode.INTERNAL_ERROR
            engine.fail_at = None
            again = await connect_when_free(session, url)
            await again.send_bytes(audio_bytes(frame_int16(5)))
            await receive_kind(again)
            assert (await receive_kind(again))[1].decode() == " s0"
            await again.close()

    asyncio.run(scenario())


def test_cross_origin_websocket_is_refused():
    async def scenario():
        async with running(FakeEngine()) as (url, _), aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url + "/api/chat", protocols=PCM,
                                         headers={"Origin": "http://evil.example"})
            assert info.value.status == 403
            host = url.removeprefix("http://")
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM, headers={"Origin": f"http://{host}"})
            await expect_handshake(ws)
            await ws.close()

    asyncio.run(scenario())


def test_cli_defaults_to_loopback_on_port_8998():
    args = build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 8998)
    assert page_url(args.host, args.port) == "http://localhost:8998"
    assert page_url("192.168.1.5", 9000) == "http://192.168.1.5:9000"
    args = build_parser().parse_args(["-q", "4", "--host", "0.0.0.0", "--port", "9001"])
    assert (args.quantize, args.host, args.port) == (4, "0.0.0.0", 9001)


def test_page_and_handshake_carry_the_one_audio_format():
    """The page gets 24 kHz / 1920 from the server as it is served (it has no copy of its own),
    and the handshake repeats the same values."""
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            async with session.get(url + "/") as response:
                page = await response.text()
            assert '<meta name="moshi-audio" content="24000,1920">' in page
            assert '<meta name="moshi-protocol" content="moshi-mlx-pcm">' in page
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
            handshake = await expect_handshake(ws)
            assert (handshake["sample_rate"], handshake["frame_size"]) == (24000, 1920)
            await ws.close()

    asyncio.run(scenario())
    static = Path(protocol.__file__).parent / "static"
    for script in ("app.js", "worklet.js"):
        source = (static / script).read_text()
        assert "24000" not in source and "1920" not in source, script
