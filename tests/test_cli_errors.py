"""Bad input found in review: each gives one clear line and a non-zero exit, early."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx import local, local_web
from moshi_mlx import mimi as mimi_cli
from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.hub import resolve_file
from weights_convert.__main__ import main as convert_main

FIXTURES = Path(__file__).parent / "fixtures"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_invalid_repo_id_is_a_weights_error() -> None:
    with pytest.raises(WeightsError, match="not a valid repo id"):
        resolve_file("my models/q4", "model.q4.safetensors")


def test_mimi_decode_refuses_npz_and_empty_codes(tmp_path, capsys) -> None:
    archive = tmp_path / "codes.npz"
    np.savez(archive, codes=np.zeros((8, 4), dtype=np.int32))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 5), dtype=np.int32))
    for codes, message in ((archive, "not an .npz archive"), (empty, "expected integer codes")):
        with pytest.raises(SystemExit) as exc:
            mimi_cli.main(["decode", str(codes), str(tmp_path / "out.wav"),
                           "--weights", str(tmp_path / "unused.safetensors")])
        assert exc.value.code == 1
        line = one_error_line(capsys)
        assert line.startswith("error:") and message in line


def test_convert_out_under_a_file_is_one_line(tmp_path, capsys) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        convert_main(["--input", str(FIXTURES / "lm_pytorch.safetensors"),
                      "--config", str(FIXTURES / "lm_config.json"),
                      "--out", str(blocker / "sub")])
    assert exc.value.code == 1
    assert one_error_line(capsys).startswith(f"error: cannot create {blocker / 'sub'}")


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed must be between 0"),
    (["--port", "70000"], "port must be between 0 and 65535"),
])
def test_out_of_range_numbers_are_refused_by_the_parser(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        local_web.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_busy_port_fails_before_the_model_loads(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # No weights are given: reaching the model load would fail differently (offline hub).
        with pytest.raises(SystemExit) as exc:
            local_web.main(["--port", str(port), "--moshi-weight", "/nonexistent"])
    assert exc.value.code == 1
    assert one_error_line(capsys).startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_unwritable_output_fails_before_the_model_loads(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        local.main(["--moshi-weight", "/nonexistent", "--input-file",
                    str(FIXTURES / "speech.wav"), "--output-file",
                    str(tmp_path / "missing" / "out.wav")])
    assert exc.value.code == 1
    assert one_error_line(capsys).startswith("error: cannot write")


@pytest.mark.parametrize(("script", "args", "needle"), [
    ("moshi-mimi", ["decode", "missing.npy", "out.wav"], "missing.npy: no such codes file"),
    ("moshi-convert", ["--input", "missing.safetensors", "--out", "out"], "no such file"),
    ("moshi-local", ["--input-file", "missing.wav", "--output-file", "out.wav"], "missing.wav"),
    ("moshi-web", ["--port", "99999"], "99999"),
    ("moshi-stt", ["missing.wav"], "missing.wav"),
    ("moshi-tts", ["hello", "--speaker", "x"], "speaker"),
])
def test_console_scripts_are_the_same_commands(tmp_path, script, args, needle) -> None:
    """Each console script is installed beside the interpreter and behaves as `python -m`."""
    import subprocess
    import sys

    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{script} is not installed (pip install -e .)"
    proc = subprocess.run([str(path), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]  # argparse errors come after the usage
    assert needle in last and "Traceback" not in proc.stderr, proc.stderr
