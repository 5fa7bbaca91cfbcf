"""End to end: Kyutai's own terminal client (`python -m moshi.client` from PyPI `moshi`,
unmodified) talks to our server running the fixture model (tiny LM + random real-size Mimi),
on the virtual sound card: speech played into its microphone reaches the model, Moshi's audio
comes back through Opus to its speaker (recorded from the speaker's monitor), and the text
pieces reach its terminal.

The client runs in a venv of its own under tests/.cache/ (made here on first use): `moshi`
with --no-deps, plus the packages its client module imports (sphn, numpy, aiohttp,
sounddevice), in the versions `moshi` declares. The rest of moshi's dependencies (torch, ...)
serve its model code only: the client is started with the `moshi` package's __init__ (which
imports that model code) skipped, its client modules themselves are run as published.

Without the sound card, the venv or pip this test skips with a one-line reason; under CI=true
it fails instead.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from interrupt import default_sigint
from prerequisites import unavailable

from moshi_mlx.conversation.engine import Engine, EngineOptions
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.web import kyutai
from moshi_mlx.web.server import ChatServer, bound_port, serve

FIXTURES = Path(__file__).parent / "fixtures"
CACHE = Path(__file__).parent / ".cache"
FRAME = 1920

MOSHI_VERSION = "0.2.13"
# What `moshi.client` and `moshi.client_utils` import, in the ranges moshi 0.2.13 declares.
CLIENT_REQUIREMENTS = ["sphn>=0.2.0,<0.3.0", "numpy>=1.26,<2.3", "aiohttp>=3.10.5,<3.12",
                       "sounddevice==0.5"]
# Runs the published moshi/client.py as `python -m moshi.client` would, except that the package
# __init__ (torch model code, not used by the client) is not executed.
RUN_OFFICIAL_CLIENT = """
import importlib.util, runpy, sys, types
spec = importlib.util.find_spec("moshi")
package = types.ModuleType("moshi")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["moshi"] = package
runpy.run_module("moshi.client", run_name="__main__", alter_sys=True)
"""


def venv_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the client's venv must see only its own packages
    (pip too, or it would take a package on our path as already installed)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# --- the virtual sound card ------------------------------------------------------------------
# The devices of tests/virtual_audio.py: a microphone fed by `paplay`, a speaker recorded by
# `parec`.

class SoundCard:
    """The default input/output devices PortAudio opens, plus a way in and a way out."""

    def play_into_microphone(self, wav: Path) -> subprocess.Popen:
        return subprocess.Popen(["paplay", "--device=virtual_mic_feed", str(wav)])

    def record_speaker(self, raw_path: Path) -> subprocess.Popen:
        """float32 mono 24 kHz samples of what the speaker plays, into raw_path."""
        with open(raw_path, "wb") as out:
            return subprocess.Popen(
                ["parec", "--device=virtual_speaker.monitor", "--format=float32le",
                 "--rate=24000", "--channels=1", "--raw", "--latency-msec=20"],
                stdout=out,
            )


@pytest.fixture(scope="module")
def virtual_sound_card(sound_card):
    """The in-repo sound card (conftest `sound_card`: started, PULSE_SERVER set for us and the
    client's process), with its way in and way out."""
    return SoundCard()


# --- Kyutai's client in its own venv --------------------------------------------------------


@pytest.fixture(scope="session")
def official_client_python() -> Path:
    venv = CACHE / f"moshi-client-{MOSHI_VERSION}"
    python = venv / "bin" / "python"
    done = venv / "installed.txt"
    if not done.is_file():
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--no-deps", f"moshi=={MOSHI_VERSION}"],
            [str(python), "-m", "pip", "install", "-q", *CLIENT_REQUIREMENTS],
            [str(python), "-c", "import aiohttp, numpy, sounddevice, sphn"],
        ]
        for step in steps:
            try:
                proc = subprocess.run(step, capture_output=True, text=True, timeout=600,
                                      env=venv_env())
            except subprocess.TimeoutExpired:
                unavailable(f"no venv for moshi.client: `{' '.join(step[-3:])}` timed out")
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["?"])[-1]
                unavailable(f"no venv for moshi.client: `{' '.join(step[-3:])}` failed: {last}")
        done.write_text(f"moshi=={MOSHI_VERSION} --no-deps\n" + "\n".join(CLIENT_REQUIREMENTS))
    return python


# --- the server side ------------------------------------------------------------------------


class RecordingEngine:
    """The real engine, plus a record of what went in and came out."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.resets = 0
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.texts: list[str] = []

    def reset(self) -> None:
        self.resets += 1
        self.engine.reset()

    def process(self, pcm: np.ndarray):
        out = self.engine.process(pcm)
        self.inputs.append(pcm.copy())
        self.outputs.append(out.pcm.copy())
        if out.text:
            self.texts.append(out.text)
        return out


def _fixture_engine(mimi_path: Path) -> Engine:
    # rustymimi keeps the real-size Mimi within real time on small CPUs; MLX Mimi otherwise.
    try:
        import rustymimi  # noqa: F401

        backend = "rustymimi"
    except ImportError:
        backend = "mlx"
    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", mimi_path, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json",
        options=EngineOptions(ModelOptions(seed=1234), mimi_backend=backend),
    )


def best_match(long: np.ndarray, short: np.ndarray) -> float:
    """Highest normalised correlation of `short` with any same-length window of `long`."""
    long64, short64 = long.astype(np.float64), short.astype(np.float64)
    size = 1 << int(np.ceil(np.log2(len(long64) + len(short64))))
    corr = np.fft.irfft(np.fft.rfft(long64, size) * np.conj(np.fft.rfft(short64, size)), size)
    corr = corr[: len(long64) - len(short64) + 1]
    energy = np.concatenate([[0.0], np.cumsum(long64**2)])
    window = energy[len(short64):] - energy[: len(long64) - len(short64) + 1]
    normalised = corr / np.sqrt(np.maximum(window, 1e-12) * np.sum(short64**2))
    return float(normalised.max())


def test_official_client_talks_to_our_server(virtual_sound_card, official_client_python,
                                             random_mimi_path, tmp_path):
    if kyutai.load_sphn() is None:
        unavailable("sphn is not installed (pip install -e '.[dev]')")
    recorder = RecordingEngine(_fixture_engine(random_mimi_path))
    server = ChatServer()
    server.load_engine(lambda: recorder)
    speech_path = FIXTURES / "speech.wav"
    speech, rate = soundfile.read(str(speech_path), dtype="float32")
    assert rate == 24000
    client_out, client_err = tmp_path / "client.out", tmp_path / "client.err"
    speaker_raw = tmp_path / "speaker.raw"

    async def scenario() -> tuple[int, str]:
        runner = await serve(server, "127.0.0.1", 0)
        speaker = virtual_sound_card.record_speaker(speaker_raw)
        feed = None
        try:
            with open(client_out, "wb") as out, open(client_err, "wb") as err:
                client = await asyncio.create_subprocess_exec(
                    str(official_client_python), "-c", RUN_OFFICIAL_CLIENT,
                    "--host", "127.0.0.1", "--port", str(bound_port(runner)),
                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=venv_env(),
                    preexec_fn=default_sigint,
                )
            try:
                end = time.monotonic() + 60
                while recorder.resets == 0:  # the client connected and has its streams open
                    assert client.returncode is None, client_err.read_text()
                    assert time.monotonic() < end, client_err.read_text()
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                feed = virtual_sound_card.play_into_microphone(speech_path)
                # Until Moshi has answered a while (and said a few words) or 60 s have passed.
                while len(recorder.inputs) < 60 or len(recorder.texts) < 3:
                    assert client.returncode is None, client_err.read_text()
                    if time.monotonic() > end:
                        break
                    await asyncio.sleep(0.25)
                await asyncio.sleep(1.0)  # the last answers reach the speaker
                printed = client_out.read_text()  # its terminal: the text pieces
                client.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
                return await asyncio.wait_for(client.wait(), 30), printed
            finally:
                if client.returncode is None:
                    client.kill()
                    await client.wait()
        finally:
            if feed is not None:
                feed.terminate()
            time.sleep(0.3)
            speaker.terminate()
            speaker.wait(5)
            await runner.cleanup()

    try:
        returncode, printed = asyncio.run(scenario())
    finally:
        server.close()

    err = client_err.read_text(errors="replace")
    assert returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "connected!" in err, err[-2000:]
    assert recorder.resets == 1

    # Microphone -> Opus -> our server -> model: frames arrived, and they are the speech.
    assert len(recorder.inputs) >= 30, (len(recorder.inputs), err[-2000:])
    spoken = [f for f in recorder.inputs if np.abs(f).max() > 0.05]
    assert len(spoken) >= 10, len(spoken)
    matches = [best_match(speech, frame) for frame in spoken[:12]]
    # (Opus keeps speech at ~0.95 correlation; unrelated audio stays far below 0.6)
    assert sum(m > 0.6 for m in matches) >= 0.75 * len(matches), matches

    # Model -> Opus -> the client's speaker: Moshi's (random-weight, loud) audio was played.
    data = speaker_raw.read_bytes()
    played = np.frombuffer(data[: len(data) // 4 * 4], dtype=np.float32)
    produced = np.concatenate(recorder.outputs)
    assert np.abs(produced).max() > 0.05  # the fixture model makes sound
    assert len(played) > 24000 and np.abs(played).max() > 0.05, "the speaker stayed silent"
    loud = [produced[i : i + 2 * FRAME] for i in range(0, len(produced) - 2 * FRAME, 2 * FRAME)
            if np.abs(produced[i : i + 2 * FRAME]).max() > 0.05]
    # Each 160 ms of what the model produced is found in the speaker's recording. Opus (tuned
    # for speech) keeps ~0.4-0.55 correlation of this noise-like random-weight audio; audio
    # the speaker did not play reaches ~0.1 (measured with time-reversed chunks).
    heard = [best_match(played, chunk) for chunk in loud[:10]]
    assert len(heard) >= 5 and sum(h > 0.3 for h in heard) >= 0.75 * len(heard), heard

    # Text pieces: the client printed exactly what the model said, in order (the last pieces
    # may still have been on their way at Ctrl-C; after it the client prints its own errors).
    said = "".join(recorder.texts)
    assert len(recorder.texts) >= 3 and printed.strip(), (recorder.texts, printed)
    assert said.startswith(printed), (printed, said)
