"""`serve --moshi`: /api/chat is mounted on the one server, beside the other families' routes,
and runs its conversations on the server's shared model thread."""

from __future__ import annotations

import asyncio
import threading
from argparse import Namespace

import aiohttp
import numpy as np
from test_web_server import PCM, FakeEngine, audio_bytes, expect_handshake, frame_int16

from moshi_mlx.cli.model_thread import start_model_thread, stop_model_thread
from moshi_mlx.serve import Loaded, build_app
from moshi_mlx.web import http, protocol


def test_chat_is_served_on_the_shared_model_thread():
    engine = FakeEngine()
    executor = start_model_thread()
    model_thread = executor.submit(threading.get_ident).result()

    async def scenario():
        app = build_app(Loaded(moshi=engine, sources={"moshi": "fake"}),
                        Namespace(api_key=None, host="127.0.0.1", voices=None), executor)
        runner = await http.start_site(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{http.bound_port(runner)}"
        try:
            async with aiohttp.ClientSession() as session:
                ws = await session.ws_connect(url + "/api/chat", protocols=PCM)
                await expect_handshake(ws)
                sent = frame_int16(3)
                await ws.send_bytes(audio_bytes(sent))
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.data[0] == 0x01:
                        break
                await ws.close()
                async with session.get(url + "/v1/models") as refused:
                    return protocol.decode_pcm(msg.data[1:]), sent, refused.status
        finally:
            await runner.cleanup()

    try:
        answer, sent, status = asyncio.run(scenario())
    finally:
        stop_model_thread(executor)
    # The fake engine answers -0.5 x its input; int16 PCM on the wire both ways.
    np.testing.assert_allclose(answer, -0.5 * sent / 32768, atol=1 / 32768)
    assert engine.threads == {model_thread}
    assert status == 401  # the other routes of the same server still want their key
