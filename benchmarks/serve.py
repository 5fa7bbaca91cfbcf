"""The STT server's speed, side by side with the bare `Transcriber` in one run; prints JSON.

- steps: wall time of one batched step (`SttSlots.step`: one Mimi encode + one LM step for
  every slot) with 1, 2, 4 and 8 streams, beside the bare `Transcriber` fed one frame; on the
  fixture STT (tests/fixtures/stt, converted by weights_convert) with the real-size random Mimi,
  and on a random stt-1b-shaped q4 model (benchmarks/stt.py builds both), the latter also with
  its linears dequantized to float32 (same values). `realtime_streams`: the most streams
  whose step stays under 80 ms here.
- server: a client paced at real time sends one 80 ms frame and waits for that frame's `Step`
  message, through the running server (WebSocket, msgpack, the model thread) with one stream;
  `added_ms` = that round trip minus the bare Transcriber's frame time (fed the same frame on
  the same model thread, alternately);
  `transport_ms` = the round trip minus the server's own batched step (`slots_step_ms`): the
  WebSocket, msgpack, event loop and thread hops. Timed on the last --steps frames of the
  12.6 s speech clip (the frames before run unpaced), where Mimi's 10 s attention window is full
  on both sides.
- latency: a client streams tests/fixtures/speech.wav at real time; from the time a word's
  last audio frame was sent to its `Word` message.

Usage: python benchmarks/serve.py [--only steps|server|latency] [--models fixture,1b]
       [--steps 20] [--streams 1,2,4,8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from moshi_mlx.cli.blas import load_system_openblas  # noqa: E402

load_system_openblas()

import stt as stt_bench  # noqa: E402  (benchmarks/stt.py: model folders)

FRAME = 1920
FRAME_S = FRAME / 24000
SPEECH = ROOT / "tests" / "fixtures" / "speech.wav"


def load_parts(folder: Path):
    """(lm, tokenizer, mimi) of a weights_convert-style folder, as `serve --stt` loads it."""
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.transcription.loader import stt_parts

    return stt_parts(folder, ModelOptions())


def as_float32(parts):
    """The same model with every quantized linear dequantized to float32 (same values): on the
    CPU backend the q4 kernel costs one pass per row, a float matmul is nearly flat in rows."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from moshi_mlx.loading.quantization import dequantize_linears

    lm, tokenizer, mimi = parts
    dequantize_linears(lm)
    lm.update(tree_map(lambda a: a.astype(mx.float32) if a.dtype == mx.bfloat16 else a,
                       lm.parameters()))
    lm.load_weights([], strict=False)  # drops compiled graphs that hold the old layers
    return lm, tokenizer, mimi


def speech() -> np.ndarray:
    from moshi_mlx.audio.io import read_audio

    return read_audio(SPEECH)


def median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 2)


# --------------------------------------------------------------------------- steps


def bench_steps(parts, streams: list[int], steps: int) -> dict:
    from moshi_mlx.transcription.slots import SttSlots
    from moshi_mlx.transcription.transcriber import Transcriber

    lm, tokenizer, mimi = parts
    pcm = speech()
    out: dict = {}
    transcriber = Transcriber(lm, tokenizer, mimi)
    times = []
    for i in range(steps + 3):
        started = time.perf_counter()
        transcriber.feed(pcm[i * FRAME:(i + 1) * FRAME])
        if i >= 3:  # the first steps compile
            times.append(time.perf_counter() - started)
    out["transcriber_frame_ms"] = median_ms(times)
    for count in streams:
        slots = SttSlots(lm, tokenizer, mimi, count)
        rows = [slots.open() for _ in range(count)]
        for n, row in enumerate(rows):
            slots.push(row, pcm[n * 4800:])
        times = []
        for i in range(steps + 3):
            started = time.perf_counter()
            slots.step()
            if i >= 3:
                times.append(time.perf_counter() - started)
        out[f"step_ms_{count}"] = median_ms(times)
    base = out.get("step_ms_1")
    if base:
        out["ratio_to_1"] = {str(c): round(out[f"step_ms_{c}"] / base, 2) for c in streams}
    out["realtime_streams"] = max([c for c in streams if out[f"step_ms_{c}"] < 1e3 * FRAME_S],
                                  default=0)
    return out


# --------------------------------------------------------------------------- through the server


class Server:
    """`serve`'s app with one family, on a loopback port, in this process."""

    def __init__(self, parts, capacity: int) -> None:
        self.parts, self.capacity = parts, capacity

    async def __aenter__(self) -> str:
        from moshi_mlx.cli.model_thread import start_model_thread
        from moshi_mlx.serve import STT_SERVICE, Loaded, build_app
        from moshi_mlx.transcription.slots import SttSlots
        from moshi_mlx.web import http

        self.executor = start_model_thread()
        lm, tokenizer, mimi = self.parts
        slots = self.executor.submit(SttSlots, lm, tokenizer, mimi, self.capacity).result()
        app = build_app(Loaded(stt=slots, sources={"stt": "bench"}),
                        Namespace(api_key=None, host="127.0.0.1", voices=None), self.executor)
        self.service = app[STT_SERVICE]
        self.runner = await http.start_site(app, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{http.bound_port(self.runner)}/api/asr-streaming"

    async def __aexit__(self, *exc) -> None:
        from moshi_mlx.cli.model_thread import stop_model_thread

        await self.runner.cleanup()
        stop_model_thread(self.executor)


def packed(message: dict) -> bytes:
    import msgpack

    return msgpack.packb(message, use_bin_type=True, use_single_float=True)


def audio(pcm: np.ndarray) -> bytes:
    return packed({"type": "Audio", "pcm": [float(x) for x in pcm]})


def timed(fn, *args) -> float:
    """Seconds `fn(*args)` takes (run on the server's model thread, as its steps are)."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


async def bench_server(parts, frames: int) -> dict:
    """Round trip of one frame to its Step message, alternating with the bare Transcriber."""
    import aiohttp
    import msgpack

    from moshi_mlx.transcription.transcriber import Transcriber

    lm, tokenizer, mimi = parts
    pcm = speech()
    transcriber = Transcriber(lm, tokenizer, mimi)
    server = Server(parts, 1)
    async with server as url, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, headers={"kyutai-api-key": "public_token"})
        await ws.receive()  # Ready
        round_trips, bare, slot_steps = [], [], []
        start = len(pcm) // FRAME - frames  # the last frames: Mimi's window (10 s) is full
        for i in range(start - 3, start + frames):
            frame = pcm[i * FRAME:(i + 1) * FRAME]
            message = audio(frame)  # the client's packing is not the server's time
            started = time.perf_counter()
            await ws.send_bytes(message)
            while msgpack.unpackb((await ws.receive()).data)["type"] != "Step":
                pass
            round_trip = time.perf_counter() - started
            alone = server.executor.submit(timed, transcriber.feed, frame).result()
            if i >= start:
                round_trips.append(round_trip)
                bare.append(alone)
                slot_steps.append(server.service.last_step_ms / 1e3)
            if i >= start:
                await asyncio.sleep(max(0.0, FRAME_S - round_trip - alone))
        await ws.close()
    transport = [r - s for r, s in zip(round_trips, slot_steps, strict=True)]
    return {"server_round_trip_ms": median_ms(round_trips),
            "transcriber_frame_ms": median_ms(bare),
            "slots_step_ms": median_ms(slot_steps),
            "added_ms": round(median_ms(round_trips) - median_ms(bare), 2),
            "transport_ms": median_ms(transport)}


async def bench_latency(parts) -> dict:
    """Real-time client: a word's latency is its Word message's arrival minus the send time of
    the word's last audio frame. That frame: the one holding the word's end, the EndWord's
    stop_time when it comes right after the word, else the time of the step that closed the
    word (step / 12.5 - silence prefix - text delay; the step is the one after the last Step
    message, as a step sends its words before its Step), as `Transcript` word ends are."""
    import aiohttp
    import msgpack

    lm = parts[0]
    config = lm.cfg.stt_config
    lag = config.audio_silence_prefix_seconds + config.audio_delay_seconds
    pcm = speech()
    frames = len(pcm) // FRAME
    messages = [audio(pcm[f * FRAME:(f + 1) * FRAME]) for f in range(frames)]
    sent_at: list[float] = []
    received: list[tuple[float, dict]] = []
    async with Server(parts, 1) as url, aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url, headers={"kyutai-api-key": "public_token"})
        await ws.receive()

        async def send() -> None:
            t0 = time.perf_counter()
            silence = audio(np.zeros(FRAME))
            for f in range(frames + 12):
                await asyncio.sleep(max(0.0, t0 + (f + 1) * FRAME_S - time.perf_counter()))
                await ws.send_bytes(messages[f] if f < frames else silence)
                sent_at.append(time.perf_counter())
            await ws.send_bytes(packed({"type": "Marker", "id": 0}))
            for _ in range(20):
                await ws.send_bytes(silence)

        sender = asyncio.create_task(send())
        while True:
            message = msgpack.unpackb((await ws.receive()).data)
            received.append((time.perf_counter(), message))
            if message["type"] == "Marker":
                break
        await sender
        await ws.close()
    latencies, last_step = [], 0
    for i, (arrival, message) in enumerate(received):
        if message["type"] == "Step":
            last_step = message["step_idx"]
        if message["type"] != "Word":
            continue
        following = received[i + 1][1] if i + 1 < len(received) else {}
        end = (following["stop_time"] if following.get("type") == "EndWord"
               else max(0.0, (last_step + 1) * FRAME_S - lag))
        frame = min(len(sent_at) - 1, max(0, math.ceil(end / FRAME_S) - 1))
        latencies.append(arrival - sent_at[frame])
    return {"words": len(latencies),
            "word_latency_ms_median": median_ms(latencies) if latencies else None,
            "word_latency_ms_max": round(1e3 * max(latencies), 1) if latencies else None,
            "model_text_delay_ms": 1e3 * config.audio_delay_seconds}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["steps", "server", "latency"], action="append")
    parser.add_argument("--models", default="fixture,1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--streams", default="1,2,4,8")
    args = parser.parse_args()
    only = set(args.only or ["steps", "server", "latency"])
    streams = [int(s) for s in args.streams.split(",")]
    report: dict = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fixture = stt_bench.make_fixture_folder(work)
        folders = {"fixture": fixture}
        if "1b" in args.models.split(","):
            folders["stt_1b_q4"] = stt_bench.make_1b_folder(work, fixture)
        for name, folder in folders.items():
            parts = load_parts(folder)
            result: dict = {}
            if "steps" in only:
                result["steps"] = stt_bench.guarded(bench_steps, parts, streams, args.steps)
            if "server" in only and name == "fixture":
                result["server"] = stt_bench.guarded(
                    lambda p: asyncio.run(bench_server(p, args.steps)), parts)
            if "latency" in only and name == "fixture":
                result["latency"] = stt_bench.guarded(
                    lambda p: asyncio.run(bench_latency(p)), parts)
            report[name] = result
            if name == "stt_1b_q4" and "steps" in only:
                report["stt_1b_q4_as_float32"] = {"steps": stt_bench.guarded(
                    bench_steps, as_float32(parts), streams, args.steps)}
            del parts
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
