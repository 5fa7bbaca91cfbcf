"""End to end in Firefox: the real page in headless Firefox ESR (fake microphone: Firefox's
tone generator) talks to the real server running the real engine (tiny fixture LM + random
real-size Mimi), like test_web_browser.py does in Chromium.

Needs Debian's `firefox-esr` (/usr/bin/firefox-esr). Playwright cannot drive stock Firefox,
so the test speaks WebDriver BiDi to it directly (tests/bidi.py).

Firefox's Web Audio needs an audio output: with no sound server its AudioContexts may never
start (resume() does not resolve), so Firefox plays to the virtual sound card (the
`sound_card` fixture: tests/virtual_audio.py, a PulseAudio daemon with 24 kHz null sinks). Its
device rate is forced to 48 kHz (the usual rate of real devices; the virtual card's 24 kHz
would hide the resampling), so the `?resample` conversation exercises the worklet's
resampling. Without Firefox ESR or the sound card the test skips (fails under CI=true)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

from bidi import BiDi, firefox
from test_web_browser import RecordingEngine, _fixture_engine, check_two_conversations

from moshi_mlx.web.server import ChatServer, bound_port, serve

ARTIFACTS = Path(__file__).parent / ".artifacts"
DEVICE_RATE = 48000

PREFS: dict[str, bool | int | str] = {
    # A fake microphone (a tone), granted without asking; Web Audio may start at once.
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.autoplay.default": 0,
    "media.autoplay.block-webaudio": False,
    "media.cubeb.force_sample_rate": DEVICE_RATE,
    # No first-run pages, updates, telemetry or studies (nothing outside is reachable). With
    # BiDi on, Firefox also applies its own recommended automation prefs.
    "browser.shell.checkDefaultBrowser": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "browser.aboutwelcome.enabled": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "datareporting.healthreport.uploadEnabled": False,
    "toolkit.telemetry.enabled": False,
    "app.update.enabled": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}

SNAPSHOT = """{
    ...window.moshi,
    lag_text: document.getElementById("lag-text").innerText,
    status_text: document.getElementById("connection-text").innerText,
    transcript: document.getElementById("transcript").innerText,
}"""


async def _wait_for(bidi: BiDi, ctx: str, condition: str, timeout_s: float = 60.0) -> dict:
    end = time.monotonic() + timeout_s
    while True:
        state = await bidi.evaluate_json(
            ctx, f"(() => {{ const m = window.moshi; return {{...m, ok: !!({condition})}}; }})()"
        )
        if state.pop("ok"):
            return state
        assert time.monotonic() < end, f"timed out waiting for {condition}: {state}"
        await asyncio.sleep(0.25)


async def _click_connect(bidi: BiDi, ctx: str) -> None:
    await bidi.evaluate_json(ctx, "document.getElementById('connect').click()",
                             user_activation=True)


async def _converse(bidi: BiDi, ctx: str, url: str, shot: Path | None) -> dict:
    """Open the page, Connect, check the microphone's frame rate, and wait for answers."""
    await bidi.command("browsingContext.navigate", {"context": ctx, "url": url, "wait": "complete"})
    await _click_connect(bidi, ctx)
    await _wait_for(bidi, ctx, "m.state === 'connected' && m.framesSent >= 2", 30)
    # 24 kHz frames at real-time pace (12.5 per second), whatever rate the AudioContext runs
    # at: a wrong resampling ratio changes this rate.
    t0, sent0 = time.monotonic(), await bidi.evaluate_json(ctx, "window.moshi.framesSent")
    await asyncio.sleep(3.0)
    t1, sent1 = time.monotonic(), await bidi.evaluate_json(ctx, "window.moshi.framesSent")
    await _wait_for(
        bidi, ctx, "m.audioFramesReceived >= 8 && m.nonSilentAudioFrames >= 3 && m.textPieces >= 3"
    )
    # One snapshot: the page keeps receiving text, so its state and its DOM must be read in
    # the same evaluate to be comparable.
    state = await bidi.evaluate_json(ctx, SNAPSHOT)
    state["frames_per_s"] = (sent1 - sent0) / (t1 - t0)
    if shot is not None:
        ARTIFACTS.mkdir(exist_ok=True)
        await bidi.screenshot(ctx, shot)
    await _click_connect(bidi, ctx)  # Disconnect
    await _wait_for(bidi, ctx, "m.state === 'disconnected'", 10)
    return state


def test_page_talks_to_the_real_engine_in_firefox(firefox_executable, sound_card,
                                                  random_mimi_path, tmp_path):
    recorder = RecordingEngine(_fixture_engine(random_mimi_path))
    server = ChatServer()
    server.load_engine(lambda: recorder)
    env = {**os.environ, "PULSE_SERVER": sound_card}

    async def scenario():
        runner = await serve(server, "127.0.0.1", 0)
        base = f"http://localhost:{bound_port(runner)}/"
        try:
            async with firefox(tmp_path / "profile", PREFS, tmp_path / "firefox.log",
                               env=env) as (bidi, ctx):
                await bidi.command("session.subscribe", {"events": ["log.entryAdded"]})
                await bidi.command("browsingContext.setViewport", {
                    "context": ctx, "viewport": {"width": 1280, "height": 720},
                })
                native = await _converse(bidi, ctx, base, ARTIFACTS / "web_page_firefox.png")
                frames_first = len(recorder.input_rms)
                # Second conversation, same page and server, AudioContext at the device rate.
                resampled = await _converse(bidi, ctx, base + "?resample", None)
                logs = [e["params"] for e in bidi.events if e["method"] == "log.entryAdded"]
                return native, frames_first, resampled, logs
        finally:
            await runner.cleanup()

    try:
        native, frames_first, resampled, logs = asyncio.run(scenario())
    finally:
        server.close()
        if (tmp_path / "firefox.log").exists():  # for a failure on CI
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "firefox.log", ARTIFACTS / "firefox.log")

    for name, state in (("native", native), ("resampled", resampled)):  # shown with -s
        print(name, {k: state[k] for k in (
            "contextSampleRate", "resampling", "frames_per_s", "framesSent", "framesNotSent",
            "audioFramesReceived", "nonSilentAudioFrames", "peakReceived", "textPieces",
            "serverDroppedFrames", "lagMs", "underruns")})
    assert [e for e in logs if e.get("level") == "error"] == [], logs
    # What Firefox does with the sample rate: it connects the (48 kHz) microphone to a 24 kHz
    # context itself, so the page does not resample; at the device rate the worklet does.
    assert native["contextSampleRate"] == 24000 and not native["resampling"], native
    assert resampled["contextSampleRate"] == DEVICE_RATE and resampled["resampling"], resampled
    check_two_conversations(native, resampled, recorder, frames_first)
