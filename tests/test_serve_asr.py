"""Kyutai's STT protocol (/api/asr-streaming) of `python -m moshi_mlx.serve`, with our own
msgpack client against the real server on the fixture STT model and the real-size random Mimi.

Expected words come from the library `Transcriber` on the same audio (one stream, its own
code path), never from the server itself."""

from __future__ import annotations

import asyncio
import socket
import struct
from argparse import Namespace
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest

from moshi_mlx.audio.io import read_audio
from moshi_mlx.cli.model_thread import start_model_thread, stop_model_thread
from moshi_mlx.serve import Loaded, build_app
from moshi_mlx.transcription.transcriber import Transcriber
from moshi_mlx.transcription.words import Word, WordEnd
from moshi_mlx.web import http, limits

FRAME = 1920
KEY = {"kyutai-api-key": "public_token"}
SPEECH = Path(__file__).parent / "fixtures" / "speech.wav"


@pytest.fixture(scope="module")
def model_thread():
    executor = start_model_thread()
    yield executor
    stop_model_thread(executor)


@pytest.fixture(scope="module")
def parts(model_thread, stt_dir, random_mimi_path):
    """(lm, tokenizer, mimi), loaded on the model thread as the server loads them."""
    import mlx.core as mx
    import sentencepiece

    from moshi_mlx.loading.models import load_lm, load_mimi

    def load():
        lm = load_lm(stt_dir / "stt_pytorch.safetensors", config=stt_dir / "stt_config.json",
                     dtype=mx.float32)
        tokenizer = sentencepiece.SentencePieceProcessor(
            model_file=str(stt_dir / "stt_tokenizer.model"))
        return lm, tokenizer, load_mimi(random_mimi_path, num_codebooks=32)

    return model_thread.submit(load).result()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_audio(SPEECH)


def clips(speech: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` different clips of 1.5 .. 2.5 s of the fixture speech."""
    rng = np.random.default_rng(count)
    out = []
    for i in range(count):
        start = int(rng.integers(0, len(speech) - 24000 * 3))
        out.append(speech[start: start + 36000 + 4000 * i + 333 * i])
    return out


@asynccontextmanager
async def serving(parts, model_thread, capacity: int = 4, api_key: list[str] | None = None):
    from moshi_mlx.transcription.slots import SttSlots

    lm, tokenizer, mimi = parts
    slots = model_thread.submit(lambda: SttSlots(lm, tokenizer, mimi, capacity)).result()
    loaded = Loaded(stt=slots, sources={"stt": "fixture-stt"})
    args = Namespace(api_key=api_key, host="127.0.0.1", voices=None)
    app = build_app(loaded, args, model_thread)
    runner = await http.start_site(app, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{http.bound_port(runner)}"
    finally:
        await runner.cleanup()


def reference_stream(parts, model_thread, pcm: np.ndarray, steps: int) -> list[dict]:
    """Word / EndWord messages of a lone `Transcriber` stream fed `pcm` then silence, for its
    first `steps` steps (what a client that sent that much audio has been answered)."""
    lm, tokenizer, mimi = parts

    def run():
        transcriber = Transcriber(lm, tokenizer, mimi)
        padded = np.zeros(steps * FRAME, dtype=np.float32)
        padded[: len(pcm)] = pcm
        return transcriber.feed(padded)

    return [as_message(e) for e in model_thread.submit(run).result()
            if isinstance(e, (Word, WordEnd))]


def reference_file(parts, model_thread, pcm: np.ndarray) -> list[dict]:
    """Word / EndWord messages of `Transcriber.transcribe_pcm` (the stt command's run)."""
    lm, tokenizer, mimi = parts
    events: list = []

    def run():
        Transcriber(lm, tokenizer, mimi).transcribe_pcm([pcm], on_events=events.extend)

    model_thread.submit(run).result()
    return [as_message(e) for e in events if isinstance(e, (Word, WordEnd))]


def as_message(event) -> dict:
    if isinstance(event, Word):
        return {"type": "Word", "text": event.text, "start_time": pytest.approx(event.start)}
    return {"type": "EndWord", "stop_time": pytest.approx(event.end)}


def packed(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


def audio(pcm) -> bytes:
    return packed({"type": "Audio", "pcm": [float(x) for x in pcm]})


async def receive(ws, timeout: float = 60.0) -> dict | None:
    msg = await ws.receive(timeout=timeout)
    if msg.type != aiohttp.WSMsgType.BINARY:
        return None
    return msgpack.unpackb(msg.data, raw=False)


async def run_client(session, host: str, pcm: np.ndarray, chunk: int, marker_id: int,
                     pause_s: float = 0.0) -> tuple[list[dict], list[dict], int]:
    """Kyutai's file client habit: audio (in `chunk`-sample messages), a Marker, then silence
    until the Marker comes back. Returns (Word/EndWord messages, Step messages, silence
    frames sent after the audio)."""
    ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY)
    assert await receive(ws) == {"type": "Ready"}
    for start in range(0, len(pcm), chunk):
        await ws.send_bytes(audio(pcm[start: start + chunk]))
        if pause_s and start == 0:
            await asyncio.sleep(pause_s)
    await ws.send_bytes(packed({"type": "Marker", "id": marker_id}))
    words, steps, silence = [], [], 0

    async def send_silence():
        nonlocal silence
        while True:
            await ws.send_bytes(audio(np.zeros(FRAME)))
            silence += 1
            await asyncio.sleep(0.02)

    sender = asyncio.create_task(send_silence())
    try:
        while True:
            message = await receive(ws)
            assert message is not None, "closed before the Marker came back"
            if message["type"] == "Marker":
                assert message["id"] == marker_id
                break
            if message["type"] == "Step":
                steps.append(message)
            else:
                words.append(message)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    await ws.close()
    return words, steps, silence


def expected_steps(pcm: np.ndarray, flush_frames: int = 8) -> int:
    """The step at which the Marker after `pcm` comes back: every frame holding pcm, plus the
    model's delay (ceil(0.5 s * 12.5) + 1 frames for the fixture's stt_config)."""
    return -(-len(pcm) // FRAME) + flush_frames


# --------------------------------------------------------------------------- the protocol


def test_words_steps_and_marker_of_one_stream(parts, model_thread, speech):
    pcm = clips(speech, 1)[0]

    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            return await run_client(session, host, pcm, chunk=1000, marker_id=42)

    words, steps, _ = asyncio.run(scenario())
    target = expected_steps(pcm)
    assert words == reference_stream(parts, model_thread, pcm, target)
    assert any(w["type"] == "Word" for w in words)
    # One Step per 80 ms step, in order, up to the Marker; four pause probabilities each.
    assert [s["step_idx"] for s in steps] == list(range(1, target + 1))
    assert all(len(s["prs"]) == 4 and all(0.0 <= p <= 1.0 for p in s["prs"]) for s in steps)
    assert all(isinstance(s["buffered_pcm"], int) and s["buffered_pcm"] >= 0 for s in steps)


@pytest.mark.parametrize("count", [4, 8])
def test_concurrent_streams_each_get_their_own_words(parts, model_thread, speech, count):
    pcms = clips(speech, count)

    async def scenario():
        async with serving(parts, model_thread, capacity=8) as host, \
                aiohttp.ClientSession() as session:
            # Different message sizes, and staggered starts: streams join a running batch.
            async def one(i):
                await asyncio.sleep(0.15 * i)
                return await run_client(session, host, pcms[i], chunk=700 + 611 * i,
                                        marker_id=i, pause_s=0.3 if i == 1 else 0.0)

            return await asyncio.gather(*(one(i) for i in range(count)))

    results = asyncio.run(scenario())
    for pcm, (words, _, _) in zip(pcms, results, strict=True):
        assert words == reference_stream(parts, model_thread, pcm, expected_steps(pcm))


def test_post_of_a_file_answers_its_words(parts, model_thread, speech, tmp_path):
    import soundfile

    pcm = clips(speech, 1)[0]
    path = tmp_path / "clip.wav"
    soundfile.write(path, pcm, 24000, subtype="FLOAT")

    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            async with session.post(f"http://{host}/api/asr-streaming?auth_id=public_token",
                                    data=path.read_bytes()) as response:
                assert response.status == 200
                return await response.json()

    assert asyncio.run(scenario()) == reference_file(parts, model_thread, pcm)


def test_init_starts_the_stream_again(parts, model_thread, speech):
    pcm = clips(speech, 1)[0]

    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY)
            assert await receive(ws) == {"type": "Ready"}
            await ws.send_bytes(audio(np.full(FRAME * 5, 0.3)))  # a stream to forget
            await ws.send_bytes(packed({"type": "Init"}))
            while (message := await receive(ws)) != {"type": "Ready"}:
                assert message is not None
            await ws.close()
            return await run_client(session, host, pcm, chunk=4000, marker_id=1)

    words, _, _ = asyncio.run(scenario())
    assert words == reference_stream(parts, model_thread, pcm, expected_steps(pcm))


# --------------------------------------------------------------------------- bad input


def test_keys_are_required(parts, model_thread):
    async def scenario():
        async with serving(parts, model_thread, api_key=["s3cret"]) as host, \
                aiohttp.ClientSession() as session:
            statuses = []
            for headers, query in (({}, ""), (KEY, ""), ({"kyutai-api-key": "nope"}, ""),
                                   ({}, "?auth_id=public_token")):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(f"ws://{host}/api/asr-streaming{query}",
                                             headers=headers)
                statuses.append(refused.value.status)
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming?auth_id=s3cret")
            assert await receive(ws) == {"type": "Ready"}
            await ws.close()
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming",
                                          headers={"kyutai-api-key": "s3cret"})
            assert await receive(ws) == {"type": "Ready"}
            await ws.close()
            return statuses

    assert asyncio.run(scenario()) == [401, 401, 401, 401]


@pytest.mark.parametrize("message, reason", [
    (b"\xc1\x00garbage", "not msgpack"),
    (packed({"type": "Video"}), "unknown message type 'Video'"),
    (packed([1, 2, 3]), "msgpack map"),
    (packed({"type": "Audio", "pcm": ["a", "b"]}), "other than numbers"),
    (packed({"type": "Audio", "pcm": b"\x00\x00\x80\x3f"}), "list of float samples"),
    (packed({"type": "Audio", "pcm": [float("nan")]}), "NaN"),
    (packed({"type": "Marker", "id": "x"}), "integer id"),
])
def test_malformed_messages_get_an_error_then_close(parts, model_thread, speech, message,
                                                    reason):
    pcm = clips(speech, 1)[0]

    async def scenario():
        async with serving(parts, model_thread, capacity=2) as host, \
                aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY)
            assert await receive(ws) == {"type": "Ready"}
            await ws.send_bytes(message)
            while (answer := await receive(ws)) is not None and answer["type"] == "Step":
                pass
            closed = await ws.receive(timeout=10)
            # The bad client costs the others nothing: a new stream is served in full.
            words = (await run_client(session, host, pcm, chunk=3000, marker_id=3))[0]
            return answer, closed.type, words

    answer, closed, words = asyncio.run(scenario())
    assert answer["type"] == "Error" and reason in answer["message"]
    assert closed in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert words == reference_stream(parts, model_thread, pcm, expected_steps(pcm))


def test_more_streams_than_slots_get_no_free_channels(parts, model_thread):
    async def scenario():
        async with serving(parts, model_thread, capacity=2) as host, \
                aiohttp.ClientSession() as session:
            url = f"ws://{host}/api/asr-streaming"
            first = await session.ws_connect(url, headers=KEY)
            second = await session.ws_connect(url, headers=KEY)
            assert await receive(first) == await receive(second) == {"type": "Ready"}
            third = await session.ws_connect(url, headers=KEY)
            refused = await receive(third)
            await first.close()  # a slot comes free at once
            await asyncio.sleep(0.2)
            fourth = await session.ws_connect(url, headers=KEY)
            return refused, await receive(fourth)

    refused, served = asyncio.run(scenario())
    assert refused == {"type": "Error", "message": "no free channels"}
    assert served == {"type": "Ready"}


def test_a_vanished_client_frees_its_slot_at_once(parts, model_thread):
    async def scenario():
        async with serving(parts, model_thread, capacity=1) as host, \
                aiohttp.ClientSession() as session:
            address, port = host.split(":")
            raw = socket.create_connection((address, int(port)))
            raw.sendall(b"GET /api/asr-streaming HTTP/1.1\r\nHost: " + host.encode()
                        + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\nkyutai-api-key: public_token\r\n\r\n")
            await asyncio.sleep(0.3)  # upgraded, slot taken
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # TCP reset, no close frame
            await asyncio.sleep(0.3)
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY)
            return await receive(ws)

    assert asyncio.run(scenario()) == {"type": "Ready"}


def test_message_size_limit_is_exact(parts, model_thread, monkeypatch):
    # The rule is the same at any limit; a smaller one keeps the refused message inside the
    # socket buffers, so the client reads the close frame instead of a reset.
    limit = 100_000
    monkeypatch.setattr(limits, "MAX_ASR_MESSAGE_BYTES", limit)

    def message_of(size: int) -> bytes:
        # A Marker map padded with an ignored field to exactly `size` bytes.
        base = packed({"type": "Marker", "id": 1, "pad": b""})
        pad = size - len(base)
        for extra in range(0, 8):  # the bin header grows with the payload
            data = packed({"type": "Marker", "id": 1, "pad": b"x" * (pad - extra)})
            if len(data) == size:
                return data
        raise AssertionError(size)

    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            codes = []
            for size in (limit, limit + 1):
                ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY,
                                              max_msg_size=0)
                assert await receive(ws) == {"type": "Ready"}
                await ws.send_bytes(message_of(size))
                await ws.send_bytes(packed({"type": "Marker", "id": 2}))
                await ws.send_bytes(audio(np.zeros(FRAME * 10)))
                while True:
                    msg = await ws.receive(timeout=30)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        codes.append(ws.close_code)
                        break
                    if msgpack.unpackb(msg.data)["type"] == "Marker":
                        codes.append("served")
                        await ws.close()
                        break
            return codes

    assert asyncio.run(scenario()) == ["served", 1009]


def test_post_of_something_else_than_audio_is_400(parts, model_thread):
    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            async with session.post(f"http://{host}/api/asr-streaming", headers=KEY,
                                    data=b"this is not audio") as response:
                return response.status, await response.text()

    status, text = asyncio.run(scenario())
    assert status == 400 and "audio" in text


def test_a_silent_client_is_closed_after_the_idle_limit(parts, model_thread, monkeypatch):
    monkeypatch.setattr(limits, "ASR_IDLE_SECONDS", 0.5)

    async def scenario():
        async with serving(parts, model_thread) as host, aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"ws://{host}/api/asr-streaming", headers=KEY)
            assert await receive(ws) == {"type": "Ready"}
            return await receive(ws, timeout=10)

    assert asyncio.run(scenario()) == {"type": "Error", "message": "no audio for 0.5 s"}
