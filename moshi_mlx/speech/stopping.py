"""When a CSM generation stops, and why.

CSM's only own stop is Sesame's all-zero frame; users report it running on in long silent
tails or never stopping (SesameAILabs/csm #122, transformers #39787). A `StopPolicy` is fed
each generated frame (codes [K]) and, when a Mimi decodes the frames as they come, each
frame's 1920-sample PCM, and names the first reason that applies:

- `eos`: the all-zero frame (Sesame's rule; the frame is not emitted).
- `repeat`: the same frame, or a cycle of 2 or 3 frames, repeated until it spans
  `REPEAT_SPAN_FRAMES` (0.64 s): 8 equal frames, 4 copies of a pair, 3 of a triple. With 32
  codebooks of 2048 codes, two sampled frames of real speech are practically never equal
  (fine codebooks change every 80 ms even in pauses), so an exact repeat is a loop; 0.64 s
  lets a brief greedy plateau pass and stops a loop before it is a long drone.
- `silence`: after speech has started (a frame at or above the level), the audio stayed
  below `SILENCE_LEVEL_DB` for `max_silence` seconds. The quiet tail is trimmed, except its
  first `KEPT_PAUSE_FRAMES` (0.24 s, so the clip does not end on a cut).
  Level: -40 dBFS RMS over the 80 ms frame. Speech decoded by Mimi sits around -30..-15
  dBFS; its pauses are Mimi's noise floor, well under -45 dBFS; -40 dBFS is between the two
  (a judgment: no real CSM weights were measured here). Quiet audio before speech starts
  never counts. `max_silence` 2 s: CSM's pauses between sentences and clauses are typically
  under 1 s, so 2 s is twice the longest ordinary pause and still stops a silent runaway
  within 2 s of audio.
- `budget`: `frame_budget(text)` frames, from the text length, unless max_frames is given:
  2 s plus 0.24 s per character (about 4 characters a second, three times slower than
  ordinary speech at ~14), capped at Sesame's 90 s.
- `max`: the explicit max_frames.
- `context`: the frames left before the 2048-position context is full.

`rules="eos"` keeps only Sesame's rule and the explicit limits (max_frames, else Sesame's 90 s,
then the context), for comparisons with the reference implementations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moshi_mlx.audio.rates import FRAME_RATE
from moshi_mlx.errors import MoshiError

RULES = ("all", "eos")
REASONS = ("eos", "silence", "repeat", "budget", "max", "context")
SESAME_MAX_FRAMES = 1125  # Sesame's default max_audio_length_ms 90 000 / 80 ms
SILENCE_LEVEL_DB = -40.0
DEFAULT_MAX_SILENCE = 2.0  # seconds
KEPT_PAUSE_FRAMES = 3  # 0.24 s of a trimmed silence is kept
REPEAT_CYCLES = (1, 2, 3)  # cycle lengths checked, in frames
REPEAT_SPAN_FRAMES = 8  # a cycle repeating over this many frames (at least 3 copies) stops
BUDGET_BASE_FRAMES = 25  # 2 s
BUDGET_FRAMES_PER_CHAR = 3  # 0.24 s per character


def frame_budget(text: str) -> int:
    """Frames allowed for `text` when no max_frames is given (see the module docstring)."""
    chars = len(" ".join(text.split()))
    return min(SESAME_MAX_FRAMES, BUDGET_BASE_FRAMES + BUDGET_FRAMES_PER_CHAR * chars)


def repeat_copies(cycle: int) -> int:
    """How many consecutive copies of a `cycle`-frame cycle make a `repeat` stop."""
    return max(3, math.ceil(REPEAT_SPAN_FRAMES / cycle))


@dataclass(frozen=True)
class StopRules:
    """Which rules apply: "all" or "eos" (Sesame's rule and the explicit limits only), the
    silence length in seconds and its level in dBFS."""

    rules: str = "all"
    max_silence: float = DEFAULT_MAX_SILENCE
    silence_level_db: float = SILENCE_LEVEL_DB

    def __post_init__(self) -> None:
        if self.rules not in RULES:
            raise MoshiError(f"stop rules must be one of {', '.join(RULES)}, got {self.rules!r}")
        if not self.max_silence > 0:
            raise MoshiError(f"max_silence must be > 0 seconds, got {self.max_silence}")

    @classmethod
    def of(cls, stop: str | StopRules) -> StopRules:
        return stop if isinstance(stop, StopRules) else cls(stop)

    def limit(self, text: str, room: int, max_frames: int | None) -> tuple[int, str]:
        """(frames allowed, the reason reaching them gives), `room` being the frames left
        before the context is full."""
        if max_frames is not None:
            return max_frames, "max"
        cap, reason = (frame_budget(text), "budget") if self.rules == "all" \
            else (SESAME_MAX_FRAMES, "max")
        return (cap, reason) if cap < room else (room, "context")

    def policy(self, limit: int, limit_reason: str) -> StopPolicy:
        return StopPolicy(self, limit, limit_reason)


class StopPolicy:
    """The stop state of one generation. `on_frame(codes)` for each frame, `on_audio(pcm)` for
    its decoded audio when there is some; each returns the reason to stop or None. After a
    `silence` stop, `trim_frames` frames at the end are to be dropped; `may_trim` is how many
    of the latest frames a silence stop could still drop (hold them back from a file)."""

    def __init__(self, rules: StopRules, limit: int, limit_reason: str) -> None:
        self.rules, self.limit, self.limit_reason = rules, limit, limit_reason
        self.frames = 0
        self.trim_frames = 0
        self._recent: list[np.ndarray] = []
        self._speech_started = False
        self._quiet_run = 0
        self._silence_frames = max(1, math.ceil(rules.max_silence * FRAME_RATE))
        self._level = 10 ** (rules.silence_level_db / 20)

    @property
    def all_rules(self) -> bool:
        return self.rules.rules == "all"

    def on_frame(self, codes: np.ndarray) -> str | None:
        codes = np.asarray(codes)
        if not codes.any():
            return "eos"
        self.frames += 1
        if self.all_rules:
            keep = max(c * repeat_copies(c) for c in REPEAT_CYCLES)
            self._recent = [*self._recent[-(keep - 1):], codes.copy()]
            if _repeats(self._recent):
                return "repeat"
        if self.frames >= self.limit:
            return self.limit_reason
        return None

    def on_audio(self, pcm: np.ndarray) -> str | None:
        if not self.all_rules:
            return None
        pcm = np.asarray(pcm, dtype=np.float32)
        rms = float(np.sqrt(np.mean(np.square(pcm)))) if pcm.size else 0.0
        if rms >= self._level:
            self._speech_started, self._quiet_run = True, 0
            return None
        if not self._speech_started:
            return None
        self._quiet_run += 1
        if self._quiet_run >= self._silence_frames:
            self.trim_frames = self.may_trim
            return "silence"
        return None

    @property
    def may_trim(self) -> int:
        return max(0, self._quiet_run - KEPT_PAUSE_FRAMES)


def _repeats(recent: Sequence[np.ndarray]) -> bool:
    for cycle in REPEAT_CYCLES:
        span = cycle * repeat_copies(cycle)
        if len(recent) < span:
            continue
        tail = np.stack(recent[-span:])
        if all(np.array_equal(tail[i], tail[i - cycle]) for i in range(cycle, span)):
            return True
    return False
