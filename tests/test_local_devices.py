"""The real-time loop on real sounddevice streams: PulseAudio's virtual microphone and speaker
(the `sound_card` fixture: tests/virtual_audio.py, started when it can be, else these tests
skip). A WAV is played into the microphone with `paplay`, and what reaches the speaker is
recorded from its monitor with `parec`, independently of our code."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
from interrupt import default_sigint

from moshi_mlx.audio.display import TextDisplay
from moshi_mlx.audio.duplex import DuplexLoop
from moshi_mlx.audio.recorder import WavWriter
from moshi_mlx.conversation.engine import Engine, EngineOptions
from moshi_mlx.local import main
from moshi_mlx.modules.sampling import SamplingSettings

FIXTURES = Path(__file__).parent / "fixtures"
SPEECH = FIXTURES / "speech.wav"
FRAME = 1920


def _engine(mimi_path: Path, backend: str) -> Engine:
    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", mimi_path, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json",
        options=EngineOptions(sampling=SamplingSettings(text_temp=0.0, audio_temp=0.0),
                              mimi_backend=backend),
    )


@pytest.fixture(scope="module")
def engine(random_mimi_path):
    # rustymimi keeps the real-size Mimi cheaper on these CPUs (more frames per second of
    # test); the default MLX Mimi runs the main test too. Greedy: deterministic audio.
    return _engine(random_mimi_path, "rustymimi")


class _Monitor:
    """Records the virtual speaker (float32) in a background process, into a file (a pipe
    would fill up and stall parec)."""

    def __init__(self, path: Path, rate: int = 24000):
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["parec", "--device=virtual_speaker.monitor", "--format=float32le", f"--rate={rate}",
             "--channels=1", "--raw", "--latency-msec=20"],
            stdout=self._file,
        )

    def stop(self) -> np.ndarray:
        time.sleep(0.4)
        self.proc.terminate()
        self.proc.wait(5)
        self._file.close()
        data = self.path.read_bytes()
        return np.frombuffer(data[: len(data) // 4 * 4], dtype=np.float32)


def _feed(path: Path) -> subprocess.Popen:
    return subprocess.Popen(["paplay", "--device=virtual_mic_feed", str(path)])


def _xcorr(long: np.ndarray, short: np.ndarray) -> np.ndarray:
    """Cross-correlation c[k] = sum_i long[k + i] * short[i], for every offset k."""
    n = len(long) + len(short)
    size = 1 << int(np.ceil(np.log2(n)))
    spec = np.fft.rfft(long, size) * np.conj(np.fft.rfft(short, size))
    return np.fft.irfft(spec, size)[: len(long) - len(short) + 1]


def _find(long: np.ndarray, short: np.ndarray) -> tuple[int, float]:
    """Best offset of `short` inside `long` (normalised cross-correlation) and the max abs
    difference there."""
    long64, short64 = long.astype(np.float64), short.astype(np.float64)
    energy = np.concatenate([[0.0], np.cumsum(long64**2)])
    window = energy[len(short) :] - energy[: len(long) - len(short) + 1]
    k = int(np.argmax(_xcorr(long64, short64) / np.sqrt(np.maximum(window, 1e-12))))
    return k, float(np.abs(long[k : k + len(short)] - short).max())


def _lowpass(x: np.ndarray, rate: int, cutoff: float) -> np.ndarray:
    spec = np.fft.rfft(x.astype(np.float64))
    spec[np.fft.rfftfreq(len(x), 1 / rate) > cutoff] = 0
    return np.fft.irfft(spec, len(x))


def _share_heard(speech: np.ndarray, captured: list[np.ndarray], count: int = 8) -> float:
    """Share of the first `count` non-silent captured frames that match a piece of the speech
    (correlation > 0.95 at the best offset; resampled audio is not bit-exact)."""
    spoken = [f for f in captured if np.abs(f).max() > 0.05][:count]
    assert len(spoken) >= 3, len(spoken)
    good = 0
    for frame in spoken:
        k, _ = _find(speech, frame)
        good += np.corrcoef(speech[k : k + FRAME], frame)[0, 1] > 0.95
    return good / len(spoken)


def _quiet_display() -> tuple[TextDisplay, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return TextDisplay(out=out, err=err, tty=False, lag_interval=0.0), out, err


def _check_accounting(loop: DuplexLoop) -> None:
    """Every captured sample is processed, skipped (counted) or still pending at stop."""
    stats = loop.stats
    accounted = (FRAME * (stats.frames + stats.skipped_input_frames + loop.pending_frames)
                 + loop.pending_samples + loop.unread_samples)
    assert loop.input_samples == accounted, (loop.input_samples, accounted, stats.to_dict())
    compute_over_budget = sum(t > 0.08 for t in stats.frame)
    assert compute_over_budget <= stats.late_frames <= stats.frames, stats.to_dict()


@pytest.mark.parametrize("backend", ["rustymimi", "mlx"])
def test_mic_to_model_to_speaker(sound_card, engine, random_mimi_path, tmp_path, backend):
    engine = engine if backend == "rustymimi" else _engine(random_mimi_path, backend)
    engine.reset()
    speech, _ = soundfile.read(str(SPEECH), dtype="float32")
    display, text_out, _ = _quiet_display()
    record = WavWriter(tmp_path / "talk.wav", channels=2)
    loop = DuplexLoop(engine, display=display, record=record, keep_audio=True)
    monitor = _Monitor(tmp_path / "speaker.raw")
    feed = _feed(SPEECH)
    try:
        stats = loop.run(duration=6.0)
    finally:
        feed.terminate()
        speaker = monitor.stop()
    assert loop.rates == (24000, 24000)
    assert stats.frames >= 5, stats.summary_line()

    # microphone -> engine: the frames the model got are bit-exact pieces of the fed speech.
    # The microphone hears digital silence before and after the feed, and paplay may start
    # after the stream opened, so the first spoken frame can begin with zeros: pad with them.
    spoken = [f for f in loop.captured if np.abs(f).max() > 0.01]
    assert len(spoken) >= 3, (len(spoken), stats.summary_line())
    silence = np.zeros(FRAME, dtype=np.float32)
    heard = np.concatenate([silence, speech, silence])
    errors = [_find(heard, frame)[1] for frame in spoken]
    assert all(err < 1e-6 for err in errors), errors

    # engine -> speaker: what the output callback played is exactly Moshi's audio, in order
    produced = np.concatenate(loop.produced)
    played = np.concatenate(loop.played_real)
    assert np.abs(produced).max() > 0.05, "silent output"  # the random model makes sound
    assert len(played) >= len(produced) - loop.max_output_frames * FRAME, stats.to_dict()
    assert stats.dropped_output_frames == 0, stats.to_dict()
    np.testing.assert_array_equal(played, produced[: len(played)], err_msg=str(stats.to_dict()))

    # ... and the speaker (its monitor, recorded by parec) received exactly that stream, in
    # order. Compared piece by piece (0.16 s): on a loaded 2-core machine an occasional ALSA
    # xrun inserts a gap, which must not hide that everything else arrived bit-exact.
    stream = np.concatenate(loop.played)[: -4 * FRAME]  # the last blocks may not be rendered
    piece = 2 * FRAME
    offsets, exact, total = [], 0, 0
    for start in range(0, len(stream) - piece, piece):
        chunk = stream[start : start + piece]
        if np.abs(chunk).max() < 0.05:
            continue
        total += 1
        offset, err = _find(speaker, chunk)
        if err < 1e-4:
            exact += 1
            offsets.append(offset)
    assert total >= 4 and exact >= 0.75 * total, (exact, total)
    assert offsets == sorted(offsets), offsets

    # the recording: Moshi left, the microphone right, one frame per processed frame
    rec, rate = soundfile.read(str(tmp_path / "talk.wav"), dtype="float32")
    assert rate == 24000 and rec.shape == (stats.frames * FRAME, 2), (rec.shape, stats.frames)
    assert np.abs(rec[:, 0] - np.concatenate(loop.produced)).max() <= 1.5 / 32768
    assert np.abs(rec[:, 1] - np.concatenate(loop.captured)).max() <= 1.5 / 32768

    _check_accounting(loop)
    # latency is bounded: device buffers + the kept backlog + one frame's compute (+ slack)
    bound = stats.device_latency + (loop.max_backlog + 2) * 0.08 + max(stats.frame) + 0.2
    assert stats.latency and max(stats.latency) < bound, (bound, stats.to_dict())
    assert text_out.getvalue().strip(), "no text printed"  # Moshi's text, printed live


def test_slow_step_keeps_latency_bounded_and_counts_late_frames(sound_card, engine):
    engine.reset()
    step = engine.lm_gen.step
    delay = 0.3  # each step takes > 3.75 frames of real time

    def slow_step(user_codes):
        time.sleep(delay)
        return step(user_codes)

    engine.lm_gen.step = slow_step
    display, _, err = _quiet_display()
    loop = DuplexLoop(engine, display=display, keep_audio=True, max_backlog=2)
    feed = _feed(SPEECH)
    try:
        stats = loop.run(duration=5.0)
    finally:
        feed.terminate()
        engine.lm_gen.step = step

    input_frames = loop.input_samples // FRAME
    assert 3 <= stats.frames <= 5.0 / delay
    assert stats.late_frames == stats.frames  # every frame missed its 80 ms slot
    assert stats.skipped_input_frames >= input_frames - stats.frames - loop.max_backlog - 2
    assert stats.skipped_input_frames > stats.frames  # input was dropped, not queued
    _check_accounting(loop)
    # the queues never grew past their bounds
    assert loop.in_queue.peak_samples <= loop.in_queue.max_samples + FRAME
    assert loop.out_fifo.peak_samples <= loop.out_fifo.capacity
    # latency does not grow with time: the last frames are no later than the first ones
    assert len(stats.latency) >= 3
    worst_frame = max(stats.frame)
    assert max(stats.latency) < stats.device_latency + 2 * worst_frame + 3 * 0.08 + 0.2
    assert stats.latency[-1] < stats.latency[0] + worst_frame
    # the user was told, and the speaker got silence instead of a backlog
    assert "[lagging:" in err.getvalue()
    assert stats.underrun_frames > 0
    np.testing.assert_array_equal(
        np.concatenate(loop.played_real), np.concatenate(loop.produced)[
            : sum(len(p) for p in loop.played_real)])


def test_device_at_another_rate_is_resampled(sound_card, engine, tmp_path):
    engine.reset()
    speech, _ = soundfile.read(str(SPEECH), dtype="float32")
    display, _, _ = _quiet_display()
    loop = DuplexLoop(engine, display=display, device_rate=48000, keep_audio=True)
    monitor = _Monitor(tmp_path / "speaker.raw", rate=48000)
    feed = _feed(SPEECH)
    try:
        stats = loop.run(duration=5.0)
    finally:
        feed.terminate()
        speaker = monitor.stop()
    assert loop.rates == (48000, 48000)
    assert stats.frames >= 5
    assert all(f.shape == (FRAME,) for f in loop.captured)
    # the model still hears the speech (48 kHz capture -> soxr -> 24 kHz frames)
    # (most frames: one spanning a gap, where the input queue dropped a block while the model
    # lagged, is not one piece of the speech)
    assert _share_heard(speech, loop.captured) >= 0.75
    # the speaker gets Moshi's audio at 48 kHz: 2x the samples (less the streaming
    # resampler's filter delay, a few ms), same sound
    produced = np.concatenate(loop.produced)
    assert 2 * FRAME * stats.frames - 4800 <= len(produced) <= 2 * FRAME * stats.frames
    # (compared below 8 kHz: Pulse converts 48 kHz -> its 24 kHz sink -> 48 kHz monitor, and
    # each resampler's filter eats the top of the band, where random weights put much energy)
    # Piece by piece (0.4 s), so that a rare xrun gap on this busy machine cannot hide the rest.
    played = _lowpass(np.concatenate(loop.played)[: -8 * FRAME], 48000, 8000)
    speaker = _lowpass(speaker, 48000, 8000)
    piece = 10 * FRAME
    corrs = []
    for start in range(0, len(played) - piece, piece):
        chunk = played[start : start + piece]
        if np.abs(chunk).max() < 0.05:
            continue
        k, _ = _find(speaker, chunk)
        corrs.append(np.corrcoef(speaker[k : k + piece], chunk)[0, 1])
    assert len(corrs) >= 3 and np.median(corrs) > 0.99, corrs


def _model_argv(mimi: Path) -> list[str]:
    return [
        "--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
        "--config", str(FIXTURES / "lm_config.json"),
        "--tokenizer", str(FIXTURES / "tokenizer.model"),
        "--mimi-weight", str(mimi), "--mimi-backend", "rustymimi",
    ]


def test_cli_devices(sound_card, random_mimi_path, tmp_path, capsys):
    assert main(["--list-devices"]) == 0
    listing = capsys.readouterr().out
    assert "pulse" in listing and "default" in listing

    with pytest.raises(SystemExit) as exc:
        main([*_model_argv(random_mimi_path), "--input-device", "97"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: input device 97")


def test_ctrl_c_closes_cleanly_and_leaves_a_valid_recording(sound_card, random_mimi_path,
                                                            tmp_path):
    record = tmp_path / "talk.wav"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moshi_mlx.local", *_model_argv(random_mimi_path),
         "--record", str(record)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )
    feed = _feed(SPEECH)
    try:
        line = proc.stderr.readline()  # "listening: ..." once the streams run
        while line.startswith("hint:"):  # the Linux OpenBLAS hint may come first
            line = proc.stderr.readline()
        assert line.startswith("listening"), line
        # Interrupt once a few frames are on disk (the recorder flushes every frame), not after
        # a fixed time: a slow CI machine may take seconds to get its first frames through.
        wanted = 44 + 4 * FRAME * 2 * 2  # WAV header + 4 stereo 16-bit frames
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and proc.poll() is None:
            if record.exists() and record.stat().st_size >= wanted:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        feed.terminate()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    summary = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    frames = int(summary.split("frames ")[1].split(",")[0])
    assert frames >= 3 and "late frames" in summary and "mic-to-speaker latency" in summary
    info = soundfile.info(str(record))
    assert info.channels == 2 and info.frames == frames * FRAME


def test_open_failure_at_24k_falls_back_to_the_device_rate(sound_card, engine, monkeypatch):
    """PortAudio refusing 24 kHz / 1920-sample streams (as on some Macs): the loop reopens at
    the device's default rate and block size and resamples, and still hears the speech."""
    import sounddevice as sd

    engine.reset()
    attempts: list[tuple[str, int, int]] = []

    def refusing(cls):
        def open_(*args, samplerate=None, blocksize=None, **kwargs):
            attempts.append((cls.__name__, samplerate, blocksize))
            if samplerate == 24000:
                raise sd.PortAudioError("Invalid sample rate [PaErrorCode -9997]")
            return cls(*args, samplerate=samplerate, blocksize=blocksize, **kwargs)

        return open_

    monkeypatch.setattr(sd, "InputStream", refusing(sd.InputStream))
    monkeypatch.setattr(sd, "OutputStream", refusing(sd.OutputStream))
    native = int(sd.query_devices(None, "input")["default_samplerate"])
    assert native != 24000
    speech, _ = soundfile.read(str(SPEECH), dtype="float32")
    display, _, _ = _quiet_display()
    loop = DuplexLoop(engine, display=display, keep_audio=True)
    feed = _feed(SPEECH)
    try:
        stats = loop.run(duration=4.0)
    finally:
        feed.terminate()
    assert ("InputStream", 24000, FRAME) in attempts
    assert ("InputStream", native, 0) in attempts
    assert loop.rates == (native, int(sd.query_devices(None, "output")["default_samplerate"]))
    assert stats.frames >= 3
    assert _share_heard(speech, loop.captured) >= 0.75


def test_busy_device_is_one_clear_error(sound_card, engine, monkeypatch):
    import sounddevice as sd

    from moshi_mlx.errors import AudioError

    def busy(*args, **kwargs):
        raise sd.PortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")

    monkeypatch.setattr(sd, "InputStream", busy)
    loop = DuplexLoop(engine, display=_quiet_display()[0])
    with pytest.raises(AudioError, match="busy or unavailable") as exc:
        loop.run(duration=1.0)
    assert "\n" not in str(exc.value)


class _EchoEngine:
    """Stands in for a model that keeps up easily: Moshi's audio = the user's frame."""

    sample_rate, frame_size = 24000, FRAME

    def process(self, pcm: np.ndarray):
        from moshi_mlx.conversation.engine import FrameOutput

        return FrameOutput(pcm.copy(), None, {"encode": 0.0, "step": 0.0, "decode": 0.0})


def test_fast_model_has_no_late_frames_and_echoes_the_mic(sound_card, tmp_path):
    """No false alarms: when compute keeps up, no frame is late or skipped, and the speaker
    plays the microphone's audio back bit-exact."""
    speech, _ = soundfile.read(str(SPEECH), dtype="float32")
    display, _, err = _quiet_display()
    loop = DuplexLoop(_EchoEngine(), display=display, keep_audio=True)
    monitor = _Monitor(tmp_path / "speaker.raw")
    feed = _feed(SPEECH)
    try:
        stats = loop.run(duration=4.0)
    finally:
        feed.terminate()
        speaker = monitor.stop()
    assert stats.frames >= 40  # ~50 frames in 4 s
    assert stats.skipped_input_frames == 0
    assert stats.late_frames <= max(1, stats.frames // 20), stats.summary_line()
    _check_accounting(loop)
    # the speaker played the speech back (pieces of it found bit-exact in the recording)
    spoken = [f for f in loop.captured if np.abs(f).max() > 0.05][:10]
    assert len(spoken) >= 5
    found = sum(_find(speaker, f)[1] < 1e-4 for f in spoken)
    assert found >= 0.8 * len(spoken)
    # loop latency without lag: below device buffers + two frames
    assert np.median(stats.latency) < stats.device_latency + 2 * 0.08
