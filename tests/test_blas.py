"""Linux: MLX's BLAS calls go to an installed OpenBLAS once moshi_mlx is imported; the hint
appears exactly when MLX is left on the wheel's reference BLAS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moshi_mlx.cli import blas

BUNDLED = "7f00-7f01 r-xp 0 08:01 1 /venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3\n"
OPENBLAS = "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libopenblas.so.0\n"


@pytest.fixture
def linux(monkeypatch, tmp_path):
    """Linux with an OpenBLAS "installed" in tmp_path; returns its path."""
    library = tmp_path / "openblas-pthread" / "libopenblas.so.0"
    library.parent.mkdir()
    library.write_bytes(b"")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "OPENBLAS_PATTERNS", (str(tmp_path / "*" / "libopenblas.so.0"),))
    monkeypatch.delenv(blas.ENV_SWITCH, raising=False)
    return library


def test_hint_names_the_installed_openblas_when_mlx_did_not_bind_it(monkeypatch, linux):
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: BUNDLED)
    assert f"LD_PRELOAD={linux}" in blas.blas_hint()


def test_hint_suggests_installing_openblas_when_there_is_none(monkeypatch, linux):
    linux.unlink()
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: BUNDLED)
    assert "apt install libopenblas0-pthread" in blas.blas_hint()


def test_no_hint_when_openblas_is_loaded_or_the_bundled_blas_was_chosen(monkeypatch, linux):
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: BUNDLED + OPENBLAS)
    assert blas.blas_hint() is None
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: BUNDLED)
    monkeypatch.setenv(blas.ENV_SWITCH, "bundled")
    assert blas.blas_hint() is None


def test_no_hint_when_mlx_does_not_use_the_bundled_blas(monkeypatch, linux):
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: OPENBLAS)
    assert blas.blas_hint() is None
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(blas, "_mapped_libraries", lambda: BUNDLED)
    assert blas.blas_hint() is None


def _blas_bound_by_mlx(tmp_path, switch: str | None) -> tuple[str, str]:
    """In a fresh process that imports moshi_mlx and runs a float matmul, the library the
    dynamic linker bound MLX's cblas_sgemm to (from its own LD_DEBUG log), and the hint."""
    env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(tmp_path / "ld"))
    env.pop(blas.ENV_SWITCH, None)
    if switch:
        env[blas.ENV_SWITCH] = switch
    code = ("import moshi_mlx.cli.blas as b, mlx.core as mx; "
            "mx.eval(mx.ones((64, 64), stream=mx.cpu) @ mx.ones((64, 64), stream=mx.cpu)); "
            "print(b.blas_hint())")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    log = "".join(p.read_text() for p in tmp_path.glob("ld.*"))
    bindings = [line for line in log.splitlines()
                if "libmlx" in line and "`cblas_sgemm'" in line]
    assert bindings, "the dynamic linker logged no binding of MLX's cblas_sgemm"
    return bindings[0].split(" to ")[1], run.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="the Linux wheel's BLAS only")
def test_mlx_binds_to_openblas_when_installed_and_to_its_own_blas_when_switched_off(tmp_path):
    installed = blas.find_openblas()
    (tmp_path / "default").mkdir()
    (tmp_path / "bundled").mkdir()
    bound, hint = _blas_bound_by_mlx(tmp_path / "default", None)
    if installed:  # .ci/run installs Debian's libopenblas0-pthread
        assert os.path.realpath(installed) in os.path.realpath(bound.split(" [")[0])
        assert hint == "None"
    else:
        assert blas.BUNDLED_MARKER in bound and "apt install" in hint
    bound, hint = _blas_bound_by_mlx(tmp_path / "bundled", "bundled")
    assert blas.BUNDLED_MARKER in bound and hint == "None"


@pytest.mark.skipif(sys.platform != "linux", reason="the BLAS switch exists on Linux only")
def test_importing_mlx_first_warns_once_exactly_when_it_costs_speed():
    def stderr_of(code: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != blas.ENV_SWITCH}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    late = stderr_of("import mlx.core; import moshi_mlx; import moshi_mlx.cli.blas as b; "
                     "b.load_system_openblas()")
    if blas.find_openblas() is None:
        assert late == ""  # nothing faster is installed: nothing to say
    else:
        lines = late.strip().splitlines()
        assert len(lines) == 1 and "import moshi_mlx first" in lines[0], late
        assert f"LD_PRELOAD={blas.find_openblas()}" in lines[0]
    assert stderr_of("import moshi_mlx; import mlx.core") == ""
