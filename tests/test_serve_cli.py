"""`python -m moshi_mlx.serve`: what it refuses before loading anything, and a whole run of the
command (a child process on the fixture STT folder, stopped with Ctrl-C)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cli_run import run_main
from serve_helpers import serve_command

from moshi_mlx.serve import main

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_to_serve_is_one_line(capsys):
    code, _, err = run_main(main, [], capsys)
    assert code == 1
    assert err == "error: nothing to serve: give --stt, --tts and/or --moshi\n"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "mymac.local"])
def test_another_address_needs_a_key_of_ones_own(capsys, host):
    code, _, err = run_main(main, ["--stt", "--host", host], capsys)
    assert code == 1
    assert err.startswith(f"error: --host {host} opens the server to other machines")
    assert err.count("\n") == 1


def test_a_taken_port_is_refused_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_main(main, ["--stt", "/nonexistent", "--port", str(port)], capsys)
    assert code == 1
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_a_missing_model_folder_is_one_line(capsys):
    code, _, err = run_main(main, ["--stt", "/nonexistent/stt-folder", "--port", "0"], capsys)
    assert code == 1
    assert err == ("error: /nonexistent/stt-folder: no such file or folder, and not a Hugging "
                   "Face repo id\n")


def test_the_command_serves_until_ctrl_c(tmp_path, stt_dir, random_mimi_path):
    folder = tmp_path / "stt"
    converted = subprocess.run(
        [sys.executable, "-m", "weights_convert", "--input",
         str(stt_dir / "stt_pytorch.safetensors"), "--config", str(stt_dir / "stt_config.json"),
         "--tokenizer", str(stt_dir / "stt_tokenizer.model"), "--mimi-weight",
         str(random_mimi_path), "--out", str(folder)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert converted.returncode == 0, converted.stderr
    with serve_command(["--stt", str(folder), "--api-key", "k1", "--api-key", "k2"],
                       {**os.environ, "PYTHONPATH": str(ROOT)}) as server:
        assert server.line.startswith("serving stt at http://localhost:"), server.line
        request = urllib.request.Request(server.url + "/v1/models",
                                         headers={"Authorization": "Bearer k2"})
        with urllib.request.urlopen(request, timeout=30) as response:
            listed = json.load(response)
        assert [m["id"] for m in listed["data"]] == [str(folder)]
        request = urllib.request.Request(server.url + "/v1/models",
                                         headers={"Authorization": "Bearer public_token"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 401  # given keys replace the default one
