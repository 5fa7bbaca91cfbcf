"""What each /api/chat protocol costs the server per 80 ms frame: Kyutai's Ogg/Opus (sphn)
beside our raw PCM, with a fake engine (no model time), same speech for both.

    python benchmarks/web_protocols.py [--frames 150] [--round-trips 100]

Prints JSON (medians, milliseconds per model frame):
- wire_in_ms: one client message -> model frame(s) (PCM: int16 parse; Opus: Ogg/Opus decode
  and re-framing to FRAME_SIZE samples), wire_out_ms: Moshi's frame + text -> messages (PCM:
  int16 encode; Opus: encode to an Ogg page), wire_total_ms their sum. The protocols take
  turns frame by frame (the machine is shared), after 5 warm-up frames.
- round_trip_ms: through the real server on localhost: a client sends one frame's message and
  waits for the frame's text piece, one frame at a time (server overhead + the socket; the
  client's own Opus encoding is done before timing, its decoding skipped).
- opus_bytes_in / opus_bytes_out: median Ogg page bytes per frame (PCM: 3840).
Needs sphn (pip install 'moshi_mlx[kyutai]').
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from moshi_mlx.web import kyutai, protocol  # noqa: E402
from moshi_mlx.web.server import ChatServer, bound_port, serve  # noqa: E402

WARM_UP = 5


class EchoEngine:
    """No model time: answers -0.5 x the input and a short text piece."""

    def reset(self) -> None:
        pass

    def process(self, pcm: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(pcm=-0.5 * pcm, text=" word")


def speech_frames(count: int) -> list[np.ndarray]:
    import soundfile

    pcm, rate = soundfile.read(str(ROOT / "tests" / "fixtures" / "speech.wav"), dtype="float32")
    assert rate == SAMPLE_RATE
    frames = [pcm[i : i + FRAME_SIZE] for i in range(0, len(pcm) - FRAME_SIZE + 1, FRAME_SIZE)]
    return [frames[i % len(frames)] for i in range(count)]


def client_messages(sphn, frames: list[np.ndarray]) -> dict[str, list[bytes]]:
    """What each protocol's client sends for these frames (Opus: one page per 80 ms frame, as
    Kyutai's Python client writes it)."""
    writer = sphn.OpusStreamWriter(SAMPLE_RATE)
    return {
        "pcm": [protocol.audio_message(f) for f in frames],
        "opus": [bytes([kyutai.KIND_AUDIO]) + bytes(writer.append_pcm(f)) for f in frames],
    }


def time_wires(sphn, frames: list[np.ndarray]) -> dict[str, dict[str, float]]:
    messages = client_messages(sphn, frames)
    wires = {"pcm": protocol.PcmWire(), "opus": kyutai.OpusWire(sphn)}
    times: dict[str, dict[str, list[float]]] = {n: {"in": [], "out": []} for n in wires}
    out_bytes: dict[str, list[int]] = {n: [] for n in wires}
    engine = EchoEngine()
    for i, frame in enumerate(frames):
        for name in (("pcm", "opus") if i % 2 == 0 else ("opus", "pcm")):
            wire = wires[name]
            start = time.perf_counter()
            got = wire.frames(messages[name][i])
            middle = time.perf_counter()
            out = engine.process(frame)
            sent = wire.output_messages(out.pcm, out.text)
            end = time.perf_counter()
            assert sum(len(g) for g in got) in (0, FRAME_SIZE, 2 * FRAME_SIZE), name
            if i >= WARM_UP:
                times[name]["in"].append(1000 * (middle - start))
                times[name]["out"].append(1000 * (end - middle))
                out_bytes[name].append(len(sent[0]) - 1 if len(sent) == 2 else 0)
    result = {}
    for name in wires:
        total = [a + b for a, b in zip(times[name]["in"], times[name]["out"], strict=True)]
        result[name] = {
            "wire_in_ms": round(statistics.median(times[name]["in"]), 4),
            "wire_out_ms": round(statistics.median(times[name]["out"]), 4),
            "wire_total_ms": round(statistics.median(total), 4),
        }
    result["opus"]["opus_bytes_in"] = statistics.median(len(m) - 1 for m in messages["opus"])
    result["opus"]["opus_bytes_out"] = statistics.median(out_bytes["opus"])
    return result


async def round_trips(sphn, frames: list[np.ndarray]) -> dict[str, float]:
    import aiohttp

    messages = client_messages(sphn, frames)
    server = ChatServer(EchoEngine(), max_queued_frames=8)
    runner = await serve(server, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{bound_port(runner)}/api/chat"
    samples: dict[str, list[float]] = {"pcm": [], "opus": []}
    try:
        async with aiohttp.ClientSession() as session:
            for name in ("pcm", "opus"):
                protocols = (protocol.SUBPROTOCOL,) if name == "pcm" else ()
                ws = await session.ws_connect(url, protocols=protocols)
                await ws.receive(timeout=10)  # ready
                for i, message in enumerate(messages[name]):
                    start = time.perf_counter()
                    await ws.send_bytes(message)
                    while True:
                        msg = await ws.receive(timeout=10)
                        if msg.data[0] == 0x02:  # the frame's text piece: it was processed
                            break
                    if i >= WARM_UP:
                        samples[name].append(1000 * (time.perf_counter() - start))
                await ws.close()
                await asyncio.sleep(0.2)  # the server frees itself for the next client
    finally:
        await runner.cleanup()
        server.close()
    return {name: round(statistics.median(v), 3) for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=150, help="frames for the wire timings")
    parser.add_argument("--round-trips", type=int, default=100, help="frames through the server")
    args = parser.parse_args()
    sphn = kyutai.load_sphn()
    if sphn is None:
        sys.exit(f"error: this benchmark needs sphn ({kyutai.INSTALL_HINT})")
    wires = time_wires(sphn, speech_frames(args.frames))
    trips = asyncio.run(round_trips(sphn, speech_frames(args.round_trips)))
    for name in ("pcm", "opus"):
        wires[name]["round_trip_ms"] = trips[name]
    report = {
        "frame_ms": 1000 * FRAME_SIZE / SAMPLE_RATE,
        "frames": args.frames,
        "round_trips": args.round_trips,
        "pcm": wires["pcm"],
        "opus": wires["opus"],
        "opus_minus_pcm_total_ms": round(
            wires["opus"]["wire_total_ms"] - wires["pcm"]["wire_total_ms"], 4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
