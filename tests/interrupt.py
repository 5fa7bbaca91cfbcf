"""Child processes that a test stops with Ctrl-C (SIGINT) get SIGINT back at its default.

A shell without job control starts background jobs (`python -m pytest &` in a script) with
SIGINT ignored; children inherit that, and a Python started so never installs its
KeyboardInterrupt handler, so the test's Ctrl-C would do nothing. Pass
`preexec_fn=default_sigint` to `subprocess.Popen` / `asyncio.create_subprocess_exec`."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
