"""One rule for tests whose prerequisites (root or system packages, a sound daemon, a browser)
may be missing on a developer's machine: skip with a one-line reason that says what is
missing. Under CI=true the same tests must run, so a missing prerequisite fails instead."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip the test for `reason` (one line), or fail it under CI=true."""
    if on_ci():
        pytest.fail(f"{reason} [CI=true: prerequisites must be present, not skipped]",
                    pytrace=False)
    pytest.skip(reason)
