"""The family contract and the one file resolution: every family module satisfies the
Protocol and declares its files; every command refuses a checkpoint of another family with one
line naming the command that takes it; a checkpoint without its config says so."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.families import (
    FAMILIES,
    ModelFamily,
    families_for,
    family_module,
    files_of,
)
from moshi_mlx.loading.resolve import resolve

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).parent.parent
STT = FIXTURES / "stt"
CSM = FIXTURES / "csm"
MOSHI_WEIGHTS = FIXTURES / "lm_pytorch.safetensors"


def test_every_family_satisfies_the_contract_and_declares_its_files():
    for model_type in FAMILIES:
        module = family_module(model_type)
        assert isinstance(module, ModelFamily), model_type
        spec = files_of(model_type)
        assert spec.model_type == model_type and spec.default_repo()
        for command in spec.commands:  # real entry points, each with its main()
            assert callable(importlib.import_module(command.replace("weights_convert",
                                                                    "weights_convert.__main__"))
                            .main), command
    assert families_for("moshi_mlx.local") == families_for("moshi_mlx.local_web") == ("moshi",)
    assert families_for("moshi_mlx.stt") == ("stt",)
    assert families_for("moshi_mlx.tts") == ("csm",)
    assert families_for("moshi_mlx.mimi") == ("mimi",)
    assert families_for("weights_convert") == ("moshi", "stt", "csm")
    assert files_of("moshi").default_repo("moshika", 4) == "kyutai/moshika-mlx-q4"
    assert files_of("stt").default_repo("2.6b", 4) == "kyutai/stt-2.6b-en-mlx"  # bf16 only


def test_the_default_mimi_repo_is_spelled_once():
    repo = files_of("mimi").default_repo()
    holders = [path for path in (REPO_ROOT / "moshi_mlx").rglob("*.py") if repo in
               path.read_text()]
    assert holders == [REPO_ROOT / "moshi_mlx" / "models" / "mimi.py"]
    from moshi_mlx.mimi import build_parser as mimi_parser
    from moshi_mlx.tts import build_parser as tts_parser

    assert mimi_parser().parse_args(["encode", "a.wav", "b.npy"]).weights == repo
    assert repo in tts_parser().format_help()


def test_local_refuses_the_stt_fixture_in_one_line(tmp_path):
    """The case of the issue: it used to die with a 31-line traceback (user_codes [B, 32])."""
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.local", "--moshi-weight",
         str(STT / "stt_pytorch.safetensors"), "--config", str(STT / "stt_config.json"),
         "--tokenizer", str(STT / "stt_tokenizer.model"), "--input-file",
         str(FIXTURES / "speech.wav"), "--output-file", str(tmp_path / "out.wav")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {STT / 'stt_config.json'} describes a Kyutai STT model, not a Moshi model; "
        "use python -m moshi_mlx.stt"]
    assert not (tmp_path / "out.wav").exists()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, random_mimi_path) -> dict[str, list[str]]:
    """Checkpoints of each family as a command's weight options would name them."""
    root = tmp_path_factory.mktemp("foreign")
    moshi = root / "moshi"
    moshi.mkdir()
    shutil.copy(MOSHI_WEIGHTS, moshi / "model.safetensors")
    shutil.copy(FIXTURES / "lm_config.json", moshi / "config.json")
    stt = root / "stt"
    stt.mkdir()
    shutil.copy(STT / "stt_pytorch.safetensors", stt / "model.safetensors")
    shutil.copy(STT / "stt_config.json", stt / "config.json")
    return {"moshi": [str(moshi)], "stt": [str(stt)], "csm": [str(CSM / "sesame")],
            "mimi": [str(random_mimi_path)]}


def _main(command: str):
    return importlib.import_module(command.replace("weights_convert", "weights_convert.__main__")
                                   ).main


def _argv(command: str, folder: str, tmp_path: Path) -> list[str]:
    """Each command's own spelling of "load this checkpoint", with a job that needs it."""
    wav = str(FIXTURES / "speech.wav")
    if command == "moshi_mlx.local":
        return ["--hf-repo", folder, "--input-file", wav, "--output-file",
                str(tmp_path / "out.wav")]
    if command == "moshi_mlx.stt":
        return ["--hf-repo", folder, "--tokenizer", str(STT / "stt_tokenizer.model"), wav]
    if command == "moshi_mlx.tts":
        return ["Hello.", "--weights", folder, "--tokenizer", str(CSM / "tokenizer.json"),
                "--codes-out", str(tmp_path / "codes.npy")]
    if command == "moshi_mlx.mimi":
        return ["encode", wav, str(tmp_path / "codes.npy"), "--weights", folder]
    return ["--hf-repo" if Path(folder).is_dir() else "--input", folder, "--out",
            str(tmp_path / "out")]


CASES = [(command, other) for command, own in (("moshi_mlx.local", "moshi"),
                                               ("moshi_mlx.stt", "stt"),
                                               ("moshi_mlx.tts", "csm"),
                                               ("moshi_mlx.mimi", "mimi"),
                                               ("weights_convert", None))
         for other in ("moshi", "stt", "csm", "mimi")
         if other != own and not (command == "weights_convert" and other != "mimi")]


@pytest.mark.parametrize(("command", "other"), CASES)
def test_a_checkpoint_of_another_family_is_refused_naming_its_command(
        command, other, foreign, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main(command)(_argv(command, foreign[other][0], tmp_path))
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert f"a {files_of(other).name} " in lines[0]
    assert lines[0].endswith(f"; use python -m {files_of(other).command}"), lines[0]
    assert not list(tmp_path.iterdir())  # refused before anything was loaded or written


def test_stt_weights_without_a_config_are_refused_by_their_tensor_names():
    with pytest.raises(WeightsError, match=r"stt_pytorch.safetensors is a Kyutai STT "
                                           r"checkpoint, not a Moshi checkpoint; use python "
                                           r"-m moshi_mlx.stt"):
        resolve("moshi_mlx.local", weights=STT / "stt_pytorch.safetensors",
                tokenizer=FIXTURES / "tokenizer.model", codec=MOSHI_WEIGHTS)


def test_weights_and_config_of_different_families_are_one_line():
    with pytest.raises(WeightsError, match="lm_pytorch.safetensors is a Moshi checkpoint, but "
                                           ".*stt_config.json describes a Kyutai STT model"):
        resolve("weights_convert", weights=MOSHI_WEIGHTS, config=STT / "stt_config.json",
                required=False)


def test_a_checkpoint_without_its_config_names_the_missing_config(tmp_path):
    shutil.copy(MOSHI_WEIGHTS, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError) as error:
        resolve("moshi_mlx.local", tmp_path)
    message = str(error.value)
    assert "missing tensor transformer.layers.2.norm1.weight" in message
    assert "no config.json was found" in message and "default Moshi LM config" in message
    assert "pass --config" in message
    # with the config, the same folder resolves (the model is the fixture's 2-layer one)
    shutil.copy(FIXTURES / "lm_config.json", tmp_path / "config.json")
    with pytest.raises(WeightsError, match="tokenizer_spm_32k_3.model .* pass --tokenizer"):
        resolve("moshi_mlx.local", tmp_path)


def test_stt_and_csm_need_their_config(tmp_path):
    shutil.copy(STT / "stt_pytorch.safetensors", tmp_path / "stt.safetensors")
    with pytest.raises(WeightsError, match="a Kyutai STT model needs its config.json: .* pass "
                                           "--config"):
        resolve("moshi_mlx.stt", weights=tmp_path / "stt.safetensors")


def test_stt_files_come_from_the_names_its_config_gives(tmp_path):
    folder = tmp_path / "stt"
    folder.mkdir()
    shutil.copy(STT / "stt_pytorch.safetensors", folder / "weights.safetensors")
    config = json.loads((STT / "stt_config.json").read_text())
    config.update(moshi_name="weights.safetensors", tokenizer_name="text.model",
                  mimi_name="codec.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(STT / "stt_tokenizer.model", folder / "text.model")
    (folder / "codec.safetensors").write_bytes(b"")
    files = resolve("moshi_mlx.stt", weights=folder / "weights.safetensors")
    assert (files.model_type, files.config, files.tokenizer, files.codec) == (
        "stt", folder / "config.json", folder / "text.model", folder / "codec.safetensors")
    assert files.checkpoint.config.n_q == 32 and np.isclose(
        files.checkpoint.config.stt_config.audio_delay_seconds, 0.5)


def test_csm_without_a_mimi_of_its_own_speaks_through_the_released_one(monkeypatch, tmp_path):
    import moshi_mlx.loading.hub

    fetched = []

    def fake_download(repo: str, filename: str) -> Path:
        fetched.append((repo, filename))
        (tmp_path / filename).write_bytes(b"")
        return tmp_path / filename

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", fake_download)
    files = resolve("moshi_mlx.tts", weights=CSM / "sesame", tokenizer=CSM / "tokenizer.json")
    assert fetched == [(files_of("mimi").default_repo(), files_of("mimi").weights[None])]
    assert files.codec == tmp_path / files_of("mimi").weights[None]
    assert files.weight == CSM / "sesame" / "model.safetensors"
    assert files.config == CSM / "sesame" / "config.json"
