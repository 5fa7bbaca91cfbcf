"""Per-frame timings, lag counters and the one-line summary printed at exit."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

# Per-frame figures are kept for the most recent frames only (about 3.5 hours at 12.5 Hz), so
# a long conversation does not grow memory; counters cover the whole run.
WINDOW = 160_000


def _window() -> deque[float]:
    return deque(maxlen=WINDOW)


def _ms(values: deque[float] | list[float], q: float | None = None) -> float:
    if not values:
        return float("nan")
    arr = np.asarray(values) * 1000.0
    return float(np.mean(arr) if q is None else np.percentile(arr, q))


@dataclass
class LoopStats:
    frame_seconds: float = 0.08
    encode: deque[float] = field(default_factory=_window)
    step: deque[float] = field(default_factory=_window)
    decode: deque[float] = field(default_factory=_window)
    frame: deque[float] = field(default_factory=_window)  # encode + step + decode (+ overhead)
    latency: deque[float] = field(default_factory=_window)  # mic -> speaker, seconds, per frame
    callback: deque[float] = field(default_factory=_window)  # time spent inside audio callbacks
    frame_count: int = 0
    late_frames: int = 0
    skipped_input_frames: int = 0
    dropped_output_frames: int = 0
    underrun_frames: int = 0
    device_latency: float = 0.0  # input + output latency reported by the streams
    latency_estimated: bool = False  # file mode: own 80 ms + compute, not measured on devices

    @property
    def frames(self) -> int:
        return self.frame_count

    def add_frame(self, timings: dict[str, float], total: float, late: bool) -> None:
        self.encode.append(timings.get("encode", 0.0))
        self.step.append(timings.get("step", 0.0))
        self.decode.append(timings.get("decode", 0.0))
        self.frame.append(total)
        self.frame_count += 1
        self.late_frames += int(late)

    def summary_line(self) -> str:
        parts = [
            f"frames {self.frames}",
            f"step mean {_ms(self.frame):.1f} ms p95 {_ms(self.frame, 95):.1f} ms",
            f"(encode {_ms(self.encode):.1f} / lm {_ms(self.step):.1f} / "
            f"decode {_ms(self.decode):.1f})",
            f"late frames {self.late_frames}",
        ]
        if self.skipped_input_frames:
            parts.append(f"skipped input {self.skipped_input_frames}")
        if self.latency:
            what = "mic-to-speaker latency" + (" (estimated)" if self.latency_estimated else "")
            parts.append(
                f"{what} mean {_ms(self.latency):.0f} ms p95 {_ms(self.latency, 95):.0f} ms"
            )
        else:
            parts.append("mic-to-speaker latency n/a")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {
            "frames": self.frames,
            "encode_ms_mean": _ms(self.encode),
            "step_ms_mean": _ms(self.step),
            "decode_ms_mean": _ms(self.decode),
            "frame_ms_mean": _ms(self.frame),
            "frame_ms_p95": _ms(self.frame, 95),
            "callback_ms_mean": _ms(self.callback),
            "callback_ms_max": max(self.callback) * 1000 if self.callback else float("nan"),
            "late_frames": self.late_frames,
            "skipped_input_frames": self.skipped_input_frames,
            "dropped_output_frames": self.dropped_output_frames,
            "underrun_frames": self.underrun_frames,
            "latency_ms_mean": _ms(self.latency),
            "latency_ms_p95": _ms(self.latency, 95),
            "latency_ms_max": max(self.latency) * 1000 if self.latency else float("nan"),
        }
