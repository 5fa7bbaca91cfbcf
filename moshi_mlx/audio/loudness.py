"""Integrated loudness (ITU-R BS.1770-4) of a mono recording, and gain to a target loudness.

The measure of pyloudnorm's default `Meter` (the one PersonaPlex normalizes its voice prompts
with): K-weighting (a +4 dB high shelf at 1500 Hz, Q 1/sqrt(2), then a 38 Hz high-pass, Q 0.5,
both RBJ-cookbook biquads at the signal's rate), mean squares over 400 ms blocks every 100 ms,
an absolute gate at -70 LUFS and a relative gate 10 LU below the loudness of the blocks that
pass it. Numbers agree with pyloudnorm to ~1e-4 LU (tests/test_prompt_phases.py).
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_S = 0.4
BLOCK_STEP = 0.25  # of a block: 75% overlap
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
_IMPULSE_TAIL = 1e-18  # the filters' impulse responses are cut below this


def _biquad(kind: str, gain_db: float, q: float, freq: float, rate: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of an RBJ-cookbook high shelf or high-pass, normalized so a[0] = 1."""
    amp = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * freq / rate
    cos_w0, alpha = math.cos(w0), math.sin(w0) / (2.0 * q)
    if kind == "high_shelf":
        root = 2.0 * math.sqrt(amp) * alpha
        b = [amp * ((amp + 1) + (amp - 1) * cos_w0 + root),
             -2.0 * amp * ((amp - 1) + (amp + 1) * cos_w0),
             amp * ((amp + 1) + (amp - 1) * cos_w0 - root)]
        a = [(amp + 1) - (amp - 1) * cos_w0 + root,
             2.0 * ((amp - 1) - (amp + 1) * cos_w0),
             (amp + 1) - (amp - 1) * cos_w0 - root]
    else:  # high_pass
        b = [(1 + cos_w0) / 2, -(1 + cos_w0), (1 + cos_w0) / 2]
        a = [1 + alpha, -2.0 * cos_w0, 1 - alpha]
    return np.array(b) / a[0], np.array(a) / a[0]


def _impulse_response(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The biquad's impulse response (float64), until it has decayed below `_IMPULSE_TAIL`."""
    out: list[float] = []
    x1 = x2 = y1 = y2 = 0.0
    n = 0
    while True:
        x0 = 1.0 if n == 0 else 0.0
        y0 = b[0] * x0 + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        out.append(y0)
        x2, x1, y2, y1 = x1, x0, y1, y0
        n += 1
        if n > 3 and abs(y0) + abs(y1) < _IMPULSE_TAIL:
            return np.array(out)


def _filter(signal: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The biquad applied from rest (what a direct-form recursion gives), as an FFT
    convolution with its decayed impulse response: numpy has no recursive filter, and a
    Python loop over the samples would take seconds for a long recording."""
    impulse = _impulse_response(b, a)
    size = signal.size + impulse.size - 1
    fft_size = 1 << (size - 1).bit_length()
    spectrum = np.fft.rfft(signal.astype(np.float64), fft_size) * np.fft.rfft(impulse, fft_size)
    return np.fft.irfft(spectrum, fft_size)[: signal.size]


def k_weighted(pcm: np.ndarray, rate: int) -> np.ndarray:
    """The K-weighted signal, rounded to the input's dtype after each stage (as pyloudnorm
    stores each stage's output in a copy of its input)."""
    out = pcm
    for stage in (("high_shelf", 4.0, 1.0 / math.sqrt(2.0), 1500.0),
                  ("high_pass", 0.0, 0.5, 38.0)):
        out = _filter(out, *_biquad(*stage, rate)).astype(pcm.dtype)
    return out


def integrated_loudness(pcm: np.ndarray, rate: int) -> float:
    """Integrated loudness in LUFS of a mono float recording; -inf when every block is gated
    out (silence). Raises ValueError when shorter than one 400 ms block."""
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"expected mono samples, got shape {pcm.shape}")
    if not np.issubdtype(pcm.dtype, np.floating):
        pcm = pcm.astype(np.float32)
    block = BLOCK_S * rate
    if pcm.size < block:
        raise ValueError(f"audio shorter than one {BLOCK_S * 1000:.0f} ms loudness block")
    weighted = k_weighted(pcm, rate)
    seconds = pcm.size / rate
    blocks = int(np.round((seconds - BLOCK_S) / (BLOCK_S * BLOCK_STEP))) + 1
    power = np.empty(blocks)
    for j in range(blocks):
        lower = int(BLOCK_S * (j * BLOCK_STEP) * rate)
        upper = int(BLOCK_S * (j * BLOCK_STEP + 1) * rate)
        power[j] = (1.0 / block) * np.sum(np.square(weighted[lower:upper]))
    with np.errstate(divide="ignore"):
        block_loudness = -0.691 + 10.0 * np.log10(power)
        above_absolute = block_loudness >= ABSOLUTE_GATE_LUFS
        if not above_absolute.any():
            return -math.inf
        relative_gate = (-0.691 + 10.0 * np.log10(power[above_absolute].mean())
                         + RELATIVE_GATE_LU)
        kept = (block_loudness > relative_gate) & (block_loudness > ABSOLUTE_GATE_LUFS)
        if not kept.any():
            return -math.inf
        return float(-0.691 + 10.0 * np.log10(power[kept].mean()))


def normalize_loudness(pcm: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """`pcm` scaled to `target_lufs` integrated loudness (one gain, no limiter: peaks may
    exceed 1). Raises ValueError for silence or audio shorter than one block."""
    loudness = integrated_loudness(pcm, rate)
    if not math.isfinite(loudness):
        raise ValueError("audio is silent (no block above the -70 LUFS gate)")
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (np.asarray(pcm) * gain).astype(np.asarray(pcm).dtype)
