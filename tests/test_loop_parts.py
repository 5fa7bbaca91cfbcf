"""The pieces of the real-time loop that need no model: bounded buffers, live text display,
transcript, one-line errors."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from moshi_mlx.audio.display import TextDisplay
from moshi_mlx.audio.duplex import Framer
from moshi_mlx.audio.recorder import TranscriptWriter
from moshi_mlx.audio.resample import StreamResampler
from moshi_mlx.audio.ring import BlockQueue, SampleFifo
from moshi_mlx.errors import MoshiError


def test_sample_fifo_is_a_bounded_fifo_with_silence_on_underrun():
    rng = np.random.default_rng(0)
    fifo = SampleFifo(capacity=1000)
    reference: list[float] = []  # plain-list model of the same FIFO
    dropped = underrun = 0
    for _ in range(300):
        if rng.random() < 0.5:
            block = rng.standard_normal(int(rng.integers(1, 400))).astype(np.float32)
            fifo.write(block)
            reference.extend(block.tolist())
            over = len(reference) - 1000
            if over > 0:
                dropped += over
                del reference[:over]
        else:
            n = int(rng.integers(1, 400))
            got, real, _ = fifo.read_counted(n)
            want = reference[:n]
            del reference[:n]
            assert real == len(want)
            np.testing.assert_array_equal(got[:real], np.array(want, np.float32))
            assert np.all(got[real:] == 0)
            underrun += n - real
        assert len(fifo) == len(reference) <= 1000
    assert fifo.dropped_samples == dropped and fifo.underrun_samples == underrun
    assert fifo.peak_samples <= 1000


def test_sample_fifo_markers_fire_when_their_first_sample_plays():
    fifo = SampleFifo(capacity=10_000)
    fifo.write(np.ones(100), marker="a")
    fifo.write(np.ones(100), marker="b")
    assert fifo.read(50)[1] == ["a"]
    assert fifo.read(50)[1] == []
    assert fifo.read(1)[1] == ["b"]


def test_block_queue_drops_oldest_beyond_capacity_and_counts():
    q = BlockQueue(max_samples=3 * 1920)
    for i in range(10):
        q.put(np.full(1920, i, np.float32), float(i))
    assert q.dropped_blocks == 7 and q.dropped_samples == 7 * 1920
    blocks = q.get_all(timeout=0)
    assert [t for _, t in blocks] == [7.0, 8.0, 9.0]
    assert q.get_all(timeout=0.01) == [] and len(q) == 0
    assert q.peak_samples <= 4 * 1920


def test_block_queue_put_never_waits_on_a_slow_consumer():
    q = BlockQueue(max_samples=2 * 1920)
    got: list = []
    done = threading.Event()

    def consumer():
        while not done.is_set():
            got.extend(q.get_all(timeout=0.05))
            done.wait(0.2)  # a slow consumer

    worker = threading.Thread(target=consumer)
    worker.start()
    import time

    start = time.perf_counter()
    for i in range(2000):
        q.put(np.zeros(1920, np.float32), float(i))
    elapsed = time.perf_counter() - start
    done.set()
    worker.join()
    assert elapsed < 1.0  # 2000 puts, each microseconds, never blocked by the consumer
    assert q.dropped_blocks + len(got) + len(q.get_all(timeout=0)) == 2000


def test_framer_cuts_arbitrary_blocks_into_exact_frames():
    rng = np.random.default_rng(1)
    signal = rng.standard_normal(20_000).astype(np.float32)
    framer, frames, pos = Framer(1920), [], 0
    while pos < len(signal):
        n = int(rng.integers(1, 3000))
        frames += framer.push(signal[pos : pos + n], float(pos))
        pos += n
    assert len(frames) == len(signal) // 1920
    np.testing.assert_array_equal(np.concatenate([f for f, _ in frames]),
                                  signal[: len(frames) * 1920])
    assert framer.pending == len(signal) % 1920


def test_stream_resampler_matches_a_whole_signal_resampling():
    import soxr

    t = np.arange(48000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stream = StreamResampler(48000, 24000)
    parts = [stream(tone[i : i + 3840]) for i in range(0, len(tone), 3840)]
    out = np.concatenate(parts)
    whole = soxr.resample(tone, 48000, 24000)
    # the stream holds back its filter delay (a few ms) until more input comes; the rest is
    # sample-aligned with the whole-signal result
    assert len(whole) - 1200 <= len(out) <= len(whole)
    n = len(out)
    assert np.corrcoef(out[1000:n], whole[1000:n])[0, 1] > 0.9999
    identity = StreamResampler(24000, 24000)
    np.testing.assert_array_equal(identity(tone[:100]), tone[:100])


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_display_plain_when_piped_and_highlighted_in_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    plain = TextDisplay(out=out, err=err, lag_interval=0.0)
    for piece in [" Hello", ",", " how", " are", " you", None, "?"]:
        plain.text(piece)
    plain.lagging("3 late frames")
    plain.finish()
    assert out.getvalue() == " Hello, how are you?\n"
    assert err.getvalue() == "[lagging: 3 late frames]\n"

    term = _Tty()
    shown = TextDisplay(out=term, err=term, lag_interval=0.0)
    for _ in range(40):
        shown.text(" word")
    shown.lagging("1 late frames")
    lines = term.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)  # wrapped to the terminal width
    assert "\x1b[33m[lagging: 1 late frames]\x1b[0m" in lines


def test_lag_warnings_are_rate_limited():
    err = io.StringIO()
    display = TextDisplay(out=io.StringIO(), err=err, lag_interval=60.0)
    for i in range(10):
        display.lagging(f"{i} late frames")
    assert err.getvalue().count("[lagging:") == 1


def test_transcript_groups_pieces_into_timed_words(tmp_path):
    path = tmp_path / "t.txt"
    writer = TranscriptWriter(path, frame_seconds=0.08)
    for frame, piece in [(3, " Hel"), (4, "lo"), (5, None), (9, " world"), (10, "!"),
                         (12, " "), (20, " bye")]:
        writer.add(frame, piece)
    writer.close()
    assert path.read_text() == "0.24\tHello\n0.72\tworld!\n1.60\tbye\n"


def test_out_of_memory_at_load_is_one_clear_line(monkeypatch, tmp_path):
    from moshi_mlx.conversation import engine as engine_mod

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("moshi_mlx.load_lm", no_memory, raising=False)
    monkeypatch.setattr("moshi_mlx.loading.models.load_lm", no_memory)
    files = []
    for name in ("model.safetensors", "mimi.safetensors", "tok.model"):
        (tmp_path / name).write_bytes(b"")
        files.append(tmp_path / name)
    with pytest.raises(MoshiError, match="out of memory") as exc:
        engine_mod.Engine.from_files(*files)
    assert "\n" not in str(exc.value)
