"""The one thread that owns MLX state: the model is loaded, stepped and released on it."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor


def start_model_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshi-model")


def stop_model_thread(executor: ThreadPoolExecutor) -> None:
    """Release the thread's MLX streams on that thread, then stop it.

    MLX 0.32 needs each thread's streams destroyed by that thread; otherwise the process can
    abort at exit ("terminate called without an active exception").
    """
    if "mlx.core" in sys.modules:
        executor.submit(sys.modules["mlx.core"].clear_streams).result()
    executor.shutdown(wait=True)
