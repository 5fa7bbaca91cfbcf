"""The Linux OpenBLAS hint appears exactly when MLX runs on the wheel's bundled BLAS."""

from __future__ import annotations

import sys

import mlx.core as mx
import pytest

from moshi_mlx import blas_hint

BUNDLED = "7f00-7f01 r-xp 0 08:01 1 /venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3\n"


@pytest.fixture
def linux_with_openblas(monkeypatch, tmp_path):
    library = tmp_path / "openblas-pthread" / "libopenblas.so.0"
    library.parent.mkdir()
    library.write_bytes(b"")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas_hint, "OPENBLAS_PATTERNS", (str(tmp_path / "*" / "libopenblas.so.0"),))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    return library


def test_hint_names_the_installed_openblas(monkeypatch, linux_with_openblas) -> None:
    monkeypatch.setattr(blas_hint, "_mapped_libraries", lambda: BUNDLED)
    assert blas_hint.openblas_preload_hint() == f"LD_PRELOAD={linux_with_openblas}"


def test_no_hint_when_already_preloaded(monkeypatch, linux_with_openblas) -> None:
    monkeypatch.setattr(blas_hint, "_mapped_libraries", lambda: BUNDLED)
    monkeypatch.setenv("LD_PRELOAD", str(linux_with_openblas))
    assert blas_hint.openblas_preload_hint() is None


def test_no_hint_when_mlx_does_not_use_the_bundled_blas(monkeypatch, linux_with_openblas) -> None:
    monkeypatch.setattr(blas_hint, "_mapped_libraries", lambda: "/usr/lib/libopenblas.so.0\n")
    assert blas_hint.openblas_preload_hint() is None


def test_this_process_maps_what_the_hint_looks_for() -> None:
    """Guards the marker string against a renamed wheel: on Linux CPU MLX it must be mapped."""
    mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
    maps = blas_hint._mapped_libraries()
    if sys.platform == "linux" and "mlx_cpu.libs" in maps:
        assert "mlx_cpu.libs/libblas" in maps
    else:
        assert "mlx_cpu.libs/libblas" not in maps
