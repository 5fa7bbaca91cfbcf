"""Live text output: Moshi's words as they come, and a visible lag warning.

In a terminal the text is word-wrapped and the lag warning is highlighted; when stdout is piped
the text is written plain (no escape codes), and warnings go to stderr.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class TextDisplay:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None,
                 tty: bool | None = None, lag_interval: float = 2.0):
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.tty = self.out.isatty() if tty is None else tty
        self.lag_interval = lag_interval
        self._column = 0
        self._last_lag = -1e9

    def text(self, piece: str | None) -> None:
        if not piece:
            return
        if self.tty:
            width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
            if piece.startswith(" ") and self._column + len(piece) > width:
                self.out.write("\n")
                self._column = 0
                piece = piece.lstrip(" ")
        self.out.write(piece)
        self.out.flush()
        self._column += len(piece)

    def lagging(self, message: str, force: bool = False) -> None:
        """Tell the user the model is behind real time (at most once per `lag_interval`)."""
        now = time.monotonic()
        if not force and now - self._last_lag < self.lag_interval:
            return
        self._last_lag = now
        err_tty = self.err.isatty() if hasattr(self.err, "isatty") else False
        if self._column and err_tty and self.tty:
            # same terminal: keep the warning off the text line
            self.out.write("\n")
            self.out.flush()
            self._column = 0
        line = f"[lagging: {message}]"
        if err_tty:
            line = f"\x1b[33m{line}\x1b[0m"
        self.err.write(line + "\n")
        self.err.flush()

    def finish(self) -> None:
        if self._column:
            self.out.write("\n")
            self.out.flush()
            self._column = 0
