"""Kyutai's /api/chat protocol (Ogg/Opus through `sphn`) on our server, against a real aiohttp
client that speaks it as Kyutai's clients do: no subprotocol, b"\\x00" when ready, 0x01 + Ogg
pages both ways, 0x02 + text. The engine is test_web_server's FakeEngine (frame n answers
-0.5 x its input and the text " s<n>"), so expected values come from what the test sent."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import soundfile
from prerequisites import unavailable
from test_web_server import PCM, FakeEngine, expect_handshake, running

from moshi_mlx.errors import MoshiError
from moshi_mlx.local_web import build_parser, resolve_page
from moshi_mlx.modules.sampling import SamplingSettings
from moshi_mlx.web import kyutai
from moshi_mlx.web.server import OUR_PAGE, ChatServer

FIXTURES = Path(__file__).parent / "fixtures"
FRAME = 1920


def _need_sphn():
    module = kyutai.load_sphn()
    if module is None:
        unavailable("sphn is not installed (pip install -e '.[dev]')")
    return module


@pytest.fixture(scope="module")
def sphn():
    return _need_sphn()


def speech(seconds: float) -> np.ndarray:
    samples, rate = soundfile.read(str(FIXTURES / "speech.wav"), dtype="float32")
    assert rate == 24000
    return samples[: int(seconds * rate)]


def opus_messages(sphn, pcm: np.ndarray, chunk: int) -> list[bytes]:
    """0x01 + Ogg/Opus pages of `pcm`, written `chunk` samples at a time (Kyutai's web client
    encodes 20 ms Opus frames, its Python client 80 ms ones)."""
    writer = sphn.OpusStreamWriter(24000)
    messages = []
    for start in range(0, len(pcm) - chunk + 1, chunk):
        page = writer.append_pcm(pcm[start : start + chunk])
        if len(page):
            messages.append(b"\x01" + page)
    return messages


def best_lag_correlation(reference: np.ndarray, signal: np.ndarray, max_lag: int = 1500
                         ) -> tuple[int, float]:
    """Opus delays its output by a few ms: the correlation of `signal` with `reference` at the
    best delay in [0, max_lag)."""
    best = (0, -1.0)
    for lag in range(0, max_lag):
        n = min(len(reference), len(signal) - lag)
        if n < FRAME:
            break
        corr = float(np.corrcoef(reference[:n], signal[lag : lag + n])[0, 1])
        if corr > best[1]:
            best = (lag, corr)
    return best


async def read_until_closed(ws, timeout: float = 5.0) -> list[bytes]:
    received = []
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            received.append(msg.data)
        else:
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING), msg
            return received


async def connect_ready(session, url: str, query: str = "", deadline_s: float = 5.0):
    """A Kyutai-protocol connection once the server is free (it frees itself when the previous
    handler returns)."""
    end = time.monotonic() + deadline_s
    while True:
        ws = await session.ws_connect(url + "/api/chat" + query)
        msg = await ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.BINARY:
            assert msg.data == b"\x00"
            return ws
        assert ws.close_code == aiohttp.WSCloseCode.TRY_AGAIN_LATER, (msg, ws.close_code)
        assert time.monotonic() < end, "server stayed busy after the previous client left"
        await asyncio.sleep(0.05)


def test_opus_round_trip_reframed_to_model_frames(sphn):
    """20 ms Opus pages in -> 1920-sample model frames -> Opus out + text, in order."""
    engine = FakeEngine()
    sent = speech(0.96)  # 48 pages of 480 samples -> exactly 12 model frames

    async def scenario():
        async with running(engine, max_queued_frames=16) as (url, _), \
                aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat")
            assert ws.protocol is None  # no subprotocol: Kyutai's protocol
            ready = await ws.receive(timeout=5)
            assert ready.data == b"\x00"  # exactly Kyutai's ready message
            for message in opus_messages(sphn, sent, 480):
                await ws.send_bytes(message)
            reader = sphn.OpusStreamReader(24000)
            decoded, texts = [], []
            while len(texts) < 12:
                msg = await ws.receive(timeout=5)
                kind, payload = msg.data[0], msg.data[1:]
                assert kind in (0x01, 0x02), msg.data[:8]
                if kind == 0x01:
                    assert payload[:4] == b"OggS"
                    decoded.append(reader.append_bytes(payload))
                else:
                    texts.append(payload.decode())
            await ws.close()
            return np.concatenate(decoded), texts

    heard, texts = asyncio.run(scenario())
    assert texts == [f" s{n}" for n in range(12)]
    assert len(engine.inputs) == 12 and all(x.shape == (FRAME,) for x in engine.inputs)
    model_in = np.concatenate(engine.inputs)
    # What the model got is the speech that was sent (through a lossy codec, a bit later).
    lag, corr = best_lag_correlation(sent, model_in)
    assert corr > 0.85 and lag < 600, (lag, corr)
    # What the client decodes is the engine's answer, -0.5 x its input.
    assert len(heard) >= 10 * FRAME
    lag, corr = best_lag_correlation(-0.5 * model_in, heard)
    assert corr > 0.85 and lag < 600, (lag, corr)
    gain = np.std(heard[lag:]) / np.std(model_in[: len(heard) - lag])
    assert 0.4 < gain < 0.6, gain


def test_80ms_pages_as_the_python_client_sends(sphn):
    engine = FakeEngine()
    sent = speech(0.8)

    async def scenario():
        # Room for all ten frames: none may be dropped, however loaded the machine.
        async with running(engine, max_queued_frames=16) as (url, _), \
                aiohttp.ClientSession() as session:
            ws = await connect_ready(session, url)
            for message in opus_messages(sphn, sent, FRAME):
                await ws.send_bytes(message)
                await asyncio.sleep(0.01)
            texts = []
            while len(texts) < 10:
                msg = await ws.receive(timeout=5)
                if msg.data[0] == 0x02:
                    texts.append(msg.data[1:].decode())
            await ws.close()
            return texts

    assert asyncio.run(scenario()) == [f" s{n}" for n in range(10)]
    assert [x.shape for x in engine.inputs] == [(FRAME,)] * 10


BAD_MESSAGES = {
    "text frame": ("hello", "text frames"),
    "empty": (b"", "empty message"),
    "unknown kind": (b"\x07OggS", "kind 0x07"),
    "text kind from client": (b"\x02hello", "kind 0x02"),
    "audio that is not Ogg": (b"\x01" + bytes(300), "not an Ogg/Opus stream"),
}


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_malformed_message_closes_with_a_reason_and_server_keeps_serving(sphn, name):
    engine = FakeEngine()
    bad, reason = BAD_MESSAGES[name]

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            ws = await connect_ready(session, url)
            if isinstance(bad, str):
                await ws.send_str(bad)
            else:
                await ws.send_bytes(bad)
            # Kyutai's clients know no status messages: the reason is in the close frame.
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE, msg
            assert msg.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA
            assert msg.extra.startswith("malformed message") and reason in msg.extra, msg.extra

            again = await connect_ready(session, url)
            for message in opus_messages(sphn, speech(0.16), FRAME):  # two frames
                await again.send_bytes(message)
            texts = []
            while len(texts) < 2:
                msg = await again.receive(timeout=5)
                if msg.data[0] == 0x02:
                    texts.append(msg.data[1:].decode())
            await again.close()
            assert texts == [" s0", " s1"]

    asyncio.run(scenario())
    assert len(engine.inputs) == 2  # only the second client's audio reached the model


def test_oversized_message_is_refused_before_buffering(sphn):
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            ws = await connect_ready(session, url)
            # Larger than two of the largest Ogg pages (27 + 255 + 255 * 255 bytes each).
            await ws.send_bytes(b"\x01" + bytes(2 * (27 + 255 + 255 * 255) + 1))
            await read_until_closed(ws)
            assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
            again = await connect_ready(session, url)
            await again.close()

    asyncio.run(scenario())
    assert engine.inputs == []


def test_second_client_is_busy_whatever_the_protocols(sphn):
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            first = await connect_ready(session, url)
            # Kyutai client while a Kyutai conversation runs: closed with the reason.
            second = await session.ws_connect(url + "/api/chat")
            msg = await second.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert msg.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER
            assert msg.extra.startswith("busy: Moshi is already in a conversation")
            # Our page's protocol is told busy the same way it always was.
            ours = await session.ws_connect(url + "/api/chat", protocols=PCM)
            msg = await ours.receive(timeout=5)
            assert msg.data[0] == 0x05 and b'"busy"' in msg.data
            assert engine.resets == 1
            await first.close()
            # ... and the other way round: a PCM conversation makes Kyutai clients wait.
            end = time.monotonic() + 5
            while True:
                pcm = await session.ws_connect(url + "/api/chat", protocols=PCM)
                msg = await pcm.receive(timeout=5)
                if msg.data[0] == 0x00:
                    break
                assert time.monotonic() < end
                await asyncio.sleep(0.05)
            kyutai_client = await session.ws_connect(url + "/api/chat")
            msg = await kyutai_client.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra.startswith("busy")
            await pcm.close()

    asyncio.run(scenario())


def test_disconnect_frees_the_model_with_a_fresh_state(sphn):
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            for _ in range(2):
                ws = await connect_ready(session, url)
                for message in opus_messages(sphn, speech(0.32), FRAME):
                    await ws.send_bytes(message)
                texts = []
                while len(texts) < 2:
                    msg = await ws.receive(timeout=5)
                    if msg.data[0] == 0x02:
                        texts.append(msg.data[1:].decode())
                assert texts == [" s0", " s1"]  # the step counter restarted: engine.reset()
                await ws.close()

    asyncio.run(scenario())
    assert engine.resets == 2


def test_cross_origin_is_refused_for_kyutai_clients_too(sphn):
    async def scenario():
        async with running(FakeEngine()) as (url, _), aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(url + "/api/chat",
                                         headers={"Origin": "http://evil.example"})
            assert info.value.status == 403
            host = url.removeprefix("http://")
            ws = await session.ws_connect(url + "/api/chat", headers={"Origin": f"http://{host}"})
            assert (await ws.receive(timeout=5)).data == b"\x00"
            await ws.close()

    asyncio.run(scenario())


def test_slow_model_drops_frames_counts_and_logs_them(sphn, caplog):
    engine = FakeEngine(delay_s=0.15)

    async def scenario():
        async with running(engine, max_queued_frames=3) as (url, _), \
                aiohttp.ClientSession() as session:
            ws = await connect_ready(session, url)
            for message in opus_messages(sphn, speech(1.6), FRAME):  # 20 frames at once
                await ws.send_bytes(message)
            texts = 0
            while True:
                try:
                    msg = await ws.receive(timeout=1.0)
                except asyncio.TimeoutError:
                    break  # the queue has drained
                texts += msg.data[0] == 0x02
            await ws.close()
            # Free again once the handler has returned (and logged its summary).
            await (await connect_ready(session, url)).close()
            return texts

    with caplog.at_level(logging.INFO, logger="moshi_mlx.web"):
        texts = asyncio.run(scenario())
    processed = len(engine.inputs)
    assert texts == processed
    assert processed <= 1 + 3 + 2  # one in the model, three waiting, a little slack
    dropped = 20 - processed
    assert dropped > 0
    lines = [r.getMessage() for r in caplog.records]
    assert any("frames dropped so far" in line for line in lines), lines
    assert any(f"{processed} out, {dropped} dropped" in line for line in lines), lines


class SamplingEngine(FakeEngine):
    """FakeEngine with sampler settings, as moshi_mlx.conversation.engine.Engine has them."""

    def __init__(self):
        super().__init__()
        self.sampling = SamplingSettings(0.7, 25, 0.8, 250)
        self.seen: list[SamplingSettings] = []

    def set_sampling(self, settings: SamplingSettings) -> None:
        self.sampling = settings

    def process(self, pcm: np.ndarray) -> SimpleNamespace:
        self.seen.append(self.sampling)
        return super().process(pcm)


def test_sampling_query_parameters_apply_to_that_conversation_only(sphn):
    engine = SamplingEngine()
    # As Kyutai's web client builds its URL (values chosen unlike our defaults).
    query = ("?text_temperature=0.3&text_topk=10&audio_temperature=0.6&audio_topk=100"
             "&pad_mult=0&text_seed=42&audio_seed=7&repetition_penalty_context=64"
             "&repetition_penalty=1&worker_auth_id=x&email=a%40b.c&some_future_option=1")

    async def talk(session, url, query):
        ws = await connect_ready(session, url, query)
        for message in opus_messages(sphn, speech(0.16), FRAME):
            await ws.send_bytes(message)
        while (await ws.receive(timeout=5)).data[0] != 0x02:
            pass
        await ws.close()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            await talk(session, url, query)
            # The server is free again only once it has restored its settings.
            await talk(session, url, "")

    asyncio.run(scenario())
    assert engine.seen[0] == SamplingSettings(0.3, 10, 0.6, 100)
    assert engine.seen[-1] == SamplingSettings(0.7, 25, 0.8, 250)


@pytest.mark.parametrize("query, reason", [
    ("?text_temperature=hot", "text_temperature='hot' is not a number"),
    ("?audio_temperature=nan", "audio_temperature='nan': expected a number >= 0"),
    ("?text_temperature=-1", "text_temperature='-1': expected a number >= 0"),
    ("?text_topk=2.5", "text_topk='2.5': expected a whole number >= 0"),
    ("?audio_topk=-3", "audio_topk='-3': expected a whole number >= 0"),
])
def test_bad_sampling_parameter_closes_with_a_reason(sphn, query, reason):
    engine = SamplingEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            for protocols in ((), PCM):
                ws = await session.ws_connect(url + "/api/chat" + query, protocols=protocols)
                received = []
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        break
                    received.append(msg.data)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == aiohttp.WSCloseCode.POLICY_VIOLATION
                assert msg.extra.startswith(f"bad query parameter: {reason}"), msg.extra
                if protocols:  # our page also gets it as a status message
                    assert len(received) == 1 and received[0][0] == 0x05
                else:
                    assert received == []
            ws = await connect_ready(session, url)  # the server still serves
            await ws.close()

    asyncio.run(scenario())
    assert engine.resets == 1 and engine.sampling == SamplingSettings(0.7, 25, 0.8, 250)


def test_without_sphn_kyutai_clients_get_a_reason_and_ours_still_works(monkeypatch, caplog):
    monkeypatch.setattr(kyutai, "load_sphn", lambda: None)
    engine = FakeEngine()

    async def scenario():
        async with running(engine) as (url, _), aiohttp.ClientSession() as session:
            for _ in range(2):
                ws = await session.ws_connect(url + "/api/chat")
                msg = await ws.receive(timeout=5)
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == aiohttp.WSCloseCode.INTERNAL_ERROR
                assert msg.extra == "Opus needs sphn on the server: pip install 'moshi_mlx[kyutai]'"
            ours = await session.ws_connect(url + "/api/chat", protocols=PCM)
            await expect_handshake(ours)
            await ours.close()

    with caplog.at_level(logging.INFO, logger="moshi_mlx.web"):
        asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "sphn" in r.getMessage()]
    assert warnings == ["Kyutai's clients (Opus) are refused: sphn is not installed "
                        "(pip install 'moshi_mlx[kyutai]')"]


def test_static_folder_serves_another_client_and_none_serves_no_page(tmp_path):
    build = tmp_path / "dist"
    (build / "assets").mkdir(parents=True)
    (build / "index.html").write_text("<html>kyutai client</html>")
    (build / "assets" / "index-abc.js").write_text("console.log(1)")

    async def fetch(server: ChatServer, path: str) -> tuple[int, str]:
        from moshi_mlx.web.server import bound_port, serve

        runner = await serve(server, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{bound_port(runner)}{path}") as r:
                    return r.status, await r.text()
        finally:
            await runner.cleanup()

    cases = [
        (build, "/", 200, "<html>kyutai client</html>"),
        (build, "/assets/index-abc.js", 200, "console.log(1)"),
        (build, "/static/app.js", 404, None),  # our page is not served then
        (None, "/", 404, None),
        (OUR_PAGE, "/", 200, 'src="/static/app.js"'),
    ]
    for page, path, status, text in cases:
        server = ChatServer(FakeEngine(), page=page)
        try:
            got_status, body = asyncio.run(fetch(server, path))
        finally:
            server.close()
        assert got_status == status, (page, path)
        if text is not None:
            assert text in body, (page, path)


def test_static_option_on_the_command_line(tmp_path):
    assert resolve_page(build_parser().parse_args([]).static) == OUR_PAGE
    assert resolve_page(build_parser().parse_args(["--static", "none"]).static) is None
    (tmp_path / "index.html").write_text("<html></html>")
    assert resolve_page(build_parser().parse_args(["--static", str(tmp_path)]).static) == tmp_path
    with pytest.raises(MoshiError, match="no index.html"):
        resolve_page(str(tmp_path / "missing"))
