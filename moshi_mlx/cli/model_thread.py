"""The one thread that owns MLX state: the model is loaded, stepped and released on it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def start_model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-model")


def load_on_model_thread(executor: ThreadPoolExecutor, factory: Callable[[], T]) -> T:
    """Run `factory` (a model load, maybe a multi-GB download) on the model thread.

    Ctrl-C while it runs ends the process at once with status 130: the load cannot be
    cancelled from outside, and nothing has been written yet that would need flushing.
    """
    future = executor.submit(factory)
    try:
        return future.result()
    except KeyboardInterrupt:
        print("interrupted while loading the model", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


def stop_model_thread(executor: ThreadPoolExecutor) -> None:
    """Release the thread's MLX streams on that thread, then stop it.

    MLX 0.32 needs each thread's streams destroyed by that thread; otherwise the process can
    abort at exit ("terminate called without an active exception").
    """
    if "mlx.core" in sys.modules:
        executor.submit(sys.modules["mlx.core"].clear_streams).result()
    executor.shutdown(wait=True)
