"""End to end: the real page in headless Chromium (fake microphone playing speech.wav) talks
to the real server running the real engine (tiny fixture LM + random real-size Mimi).

Needs the `playwright` Python package and a Chromium: Debian's `chromium` (/usr/bin/chromium,
driven over CDP, no browser download) or else playwright's own (`playwright install chromium`).
Without them the test skips (fails under CI=true): the `chromium_executable` fixture."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import soundfile
from interrupt import default_sigint

from moshi_mlx.conversation.engine import Engine, EngineOptions
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.web.server import ChatServer, bound_port, serve

FIXTURES = Path(__file__).parent / "fixtures"
ARTIFACTS = Path(__file__).parent / ".artifacts"


def _fixture_engine(mimi_path: Path) -> Engine:
    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", mimi_path, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json", options=EngineOptions(ModelOptions(seed=1234)),
    )


class RecordingEngine:
    """The real engine, plus a record of what went in and came out (read after the run)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.resets = 0
        self.input_rms: list[float] = []
        self.output_peak: list[float] = []
        self.texts: list[str] = []

    def reset(self) -> None:
        self.resets += 1
        self.texts.append("\n")  # conversation boundary in the text record
        self.engine.reset()

    def process(self, pcm: np.ndarray):
        out = self.engine.process(pcm)
        self.input_rms.append(float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))))
        self.output_peak.append(float(np.abs(out.pcm).max()))
        if out.text:
            self.texts.append(out.text)
        return out


def _chromium_args() -> list[str]:
    return [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={FIXTURES / 'speech.wav'}",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]


async def _wait_for(page, condition: str, timeout_s: float = 60.0) -> dict:
    end = time.monotonic() + timeout_s
    while True:
        state = await page.evaluate("({...window.moshi})")
        if await page.evaluate(f"(() => {{ const m = window.moshi; return {condition}; }})()"):
            return state
        assert time.monotonic() < end, f"timed out waiting for {condition}: {state}"
        await asyncio.sleep(0.25)


async def _converse(page, url: str, shot: Path) -> dict:
    """Open the page, Connect, check the microphone's frame rate, and wait for answers."""
    await page.goto(url)
    await page.click("#connect")
    await _wait_for(page, "m.state === 'connected' && m.framesSent >= 2", 30)
    # The page must produce 24 kHz frames at real-time pace (12.5 per second), whatever
    # rate the AudioContext runs at: a wrong resampling ratio changes this rate.
    t0, sent0 = time.monotonic(), await page.evaluate("window.moshi.framesSent")
    await asyncio.sleep(3.0)
    t1, sent1 = time.monotonic(), await page.evaluate("window.moshi.framesSent")
    frames_per_s = (sent1 - sent0) / (t1 - t0)
    await _wait_for(
        page, "m.audioFramesReceived >= 8 && m.nonSilentAudioFrames >= 3 && m.textPieces >= 3"
    )
    # One snapshot: the page keeps receiving text, so its state and its DOM must be read
    # in the same evaluate to be comparable.
    state = await page.evaluate(
        """() => ({
            ...window.moshi,
            lag_text: document.getElementById("lag-text").innerText,
            status_text: document.getElementById("connection-text").innerText,
            transcript: document.getElementById("transcript").innerText,
        })"""
    )
    state["frames_per_s"] = frames_per_s
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(shot))
    await page.click("#connect")  # Disconnect
    await _wait_for(page, "m.state === 'disconnected'", 10)
    return state


def test_page_talks_to_the_real_engine_in_chromium(chromium_executable, random_mimi_path,
                                                   tmp_path):
    from playwright.async_api import async_playwright

    recorder = RecordingEngine(_fixture_engine(random_mimi_path))
    server = ChatServer()
    server.load_engine(lambda: recorder)

    async def scenario():
        runner = await serve(server, "127.0.0.1", 0)
        base = f"http://localhost:{bound_port(runner)}/"
        try:
            async with async_playwright() as pw:
                # A fresh profile (--user-data-dir) per run, as playwright wants it passed.
                browser = await pw.chromium.launch_persistent_context(
                    tmp_path / "profile", executable_path=chromium_executable, headless=True,
                    args=_chromium_args(),
                )
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                native = await _converse(page, base, ARTIFACTS / "web_page.png")
                frames_first = len(recorder.input_rms)
                # Second conversation, same server, AudioContext at the device rate.
                resampled = await _converse(
                    page, base + "?resample", ARTIFACTS / "web_page_resampled.png"
                )
                await browser.close()
                return native, frames_first, resampled, errors
        finally:
            await runner.cleanup()

    try:
        native, frames_first, resampled, errors = asyncio.run(scenario())
    finally:
        server.close()

    assert errors == []
    assert native["contextSampleRate"] == 24000 and not native["resampling"]
    assert resampled["contextSampleRate"] != 24000 and resampled["resampling"]
    check_two_conversations(native, resampled, recorder, frames_first)


def check_two_conversations(native: dict, resampled: dict, recorder: RecordingEngine,
                            frames_first: int) -> None:
    """What any browser must show after a native-rate and a resampled conversation (page
    states read in one snapshot each; `frames_first`: frames the model got in the first)."""
    for state in (native, resampled):
        assert state["handshake"] == {"protocol": 1, "sample_rate": 24000, "frame_size": 1920}
        assert 9.0 <= state["frames_per_s"] <= 16.0, state["frames_per_s"]
        assert state["status_text"] == "connected"
        assert state["lag_text"].endswith(" ms")
        assert state["peakReceived"] > 0.01  # Mimi-decoded audio, not the initial zeros
        assert state["transcript"].strip() == state["text"].strip()
    assert recorder.resets == 2  # each Connect started a fresh conversation

    # Audio from the fake microphone reached the model in both conversations.
    for rms in (recorder.input_rms[:frames_first], recorder.input_rms[frames_first:]):
        assert sum(r > 0.01 for r in rms) >= 3, rms
    assert sum(p > 0.01 for p in recorder.output_peak) >= 6

    # The page shows exactly the text pieces the engine produced, in order.
    conversations = "".join(recorder.texts).split("\n")[1:]
    assert native["text"] and conversations[0].startswith(native["text"])
    assert resampled["text"] and conversations[1].startswith(resampled["text"])


def test_command_line_serves_and_prints_its_address(random_mimi_path):
    """`python -m moshi_mlx.local_web` with the fixture model: prints the URL, then converses."""
    command = [
        sys.executable, "-m", "moshi_mlx.local_web",
        "--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
        "--mimi-weight", str(random_mimi_path),
        "--tokenizer", str(FIXTURES / "tokenizer.model"),
        "--config", str(FIXTURES / "lm_config.json"),
        "--dtype", "f32", "--port", "0",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=Path(__file__).parent.parent,
                            preexec_fn=default_sigint)
    try:
        line = proc.stdout.readline()  # blocks until the model is loaded and the port bound
        assert "open http://localhost:" in line, line
        url = line.split("open ", 1)[1].split()[0]
        speech, rate = soundfile.read(str(FIXTURES / "speech.wav"), dtype="int16")
        assert rate == 24000

        async def talk() -> tuple[bytes, list[int]]:
            async with aiohttp.ClientSession() as session:
                async with session.get(url + "/") as response:
                    page = await response.read()
                ws = await session.ws_connect(url + "/api/chat", protocols=("moshi-mlx-pcm",))
                kinds = [(await ws.receive(timeout=30)).data[0]]
                for i in range(3):
                    frame = speech[i * 1920:(i + 1) * 1920].astype("<i2").tobytes()
                    await ws.send_bytes(b"\x01" + frame)
                while kinds.count(0x01) < 3:
                    kinds.append((await ws.receive(timeout=30)).data[0])
                await ws.close()
                return page, kinds

        page, kinds = asyncio.run(talk())
        assert b'src="/static/app.js"' in page
        assert kinds[0] == 0x00 and kinds.count(0x01) == 3
        assert 0x02 in kinds  # the fixture LM sampled at least one text piece
    finally:
        os.kill(proc.pid, signal.SIGINT)
        try:
            assert proc.wait(timeout=20) == 0  # Ctrl-C is a clean exit
        finally:
            if proc.poll() is None:
                proc.kill()
