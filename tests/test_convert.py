"""python -m weights_convert: the output folder (official tensors, config.json, manifest),
--hf-repo resolution, --force, atomic writes, and one clear error line per bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from references import safetensors_entries

import weights_convert
from moshi_mlx.errors import WeightsError
from weights_convert import convert
from weights_convert.__main__ import main

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).parent.parent
PYTORCH_FILE = FIXTURES / "lm_pytorch.safetensors"
CONFIG_FILE = FIXTURES / "lm_config.json"
TOKENIZER = "tokenizer_spm_32k_3.model"
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
MODEL_NAMES = {None: "model.safetensors", 8: "model.q8.safetensors", 4: "model.q4.safetensors"}
MANIFESTS = {None: "lm_mlx", 8: "lm_mlx.q8", 4: "lm_mlx.q4"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def official(bits: int | None) -> dict[str, tuple[str, list[int], str]]:
    tensors = json.loads((FIXTURES / f"{MANIFESTS[bits]}.manifest.json").read_text())["tensors"]
    return {k: (v["dtype"], v["shape"], v["sha256"]) for k, v in tensors.items()}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weights_convert", *args], cwd=REPO_ROOT, capture_output=True,
        text=True, env={**os.environ, **(env or {})}, timeout=120,
    )


@pytest.mark.parametrize("name, bits", [("bf16", None), ("q8", 8), ("q4", 4)])
def test_names_shapes_dtypes_match_the_official_files(official_mlx_files, name, bits):
    ours = {k: v[:2] for k, v in safetensors_entries(official_mlx_files[name]).items()}
    assert ours == {k: v[:2] for k, v in official(bits).items()}
    assert official_mlx_files[name].name == MODEL_NAMES[bits]


def test_cli_makes_a_complete_model_folder(tmp_path):
    mimi = tmp_path / "src" / "mimi.safetensors"
    mimi.parent.mkdir()
    mimi.write_bytes(os.urandom(4096))
    out = tmp_path / "out"
    result = run_cli("--input", str(PYTORCH_FILE), "--config", str(CONFIG_FILE), "-q", "4",
                     "--tokenizer", str(FIXTURES / "tokenizer.model"), "--mimi-weight", str(mimi),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    files = {"model.q4.safetensors", TOKENIZER, MIMI, "config.json", "manifest.json"}
    assert {p.name for p in out.iterdir()} == files

    assert safetensors_entries(out / "model.q4.safetensors") == official(4)
    assert (out / TOKENIZER).read_bytes() == (FIXTURES / "tokenizer.model").read_bytes()
    assert (out / MIMI).read_bytes() == mimi.read_bytes()

    config = json.loads((out / "config.json").read_text())
    lm_keys = json.loads(CONFIG_FILE.read_text())
    assert {k: config[k] for k in lm_keys} == lm_keys
    assert config["quantization"] == {"bits": 4, "group_size": 32}
    assert (config["moshi_name"], config["tokenizer_name"], config["mimi_name"]) == (
        "model.q4.safetensors", TOKENIZER, MIMI)
    assert set(config) == set(lm_keys) | {"quantization", "moshi_name", "tokenizer_name",
                                          "mimi_name"}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == weights_convert.__version__
    assert manifest["source"]["sha256"] == sha256(PYTORCH_FILE)
    assert manifest["quantization"] == {"bits": 4, "group_size": 32}
    assert set(manifest["files"]) == files - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256(out / name)
        assert entry["bytes"] == (out / name).stat().st_size


def test_our_config_json_is_read_by_the_lm_loader(official_mlx_files):
    from moshi_mlx.loading.config import read_config_json, resolve_config
    from moshi_mlx.models.lm_config import LmConfig

    expected = LmConfig.from_dict(read_config_json(CONFIG_FILE))
    for path in official_mlx_files.values():
        assert resolve_config(None, path, ("moshi",)).config == expected


def make_hub_cache(root: Path, repo: str, files: dict[str, Path]) -> Path:
    """A huggingface_hub cache holding `files` for `repo` (the layout hf_hub_download reads)."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, snapshot / name)
    return root


def test_hf_repo_from_the_hub_cache(tmp_path):
    cache = make_hub_cache(tmp_path / "hub", "kyutai/moshika-pytorch-bf16", {
        "model.safetensors": PYTORCH_FILE,
        "config.json": CONFIG_FILE,
        TOKENIZER: FIXTURES / "tokenizer.model",
    })
    out = tmp_path / "out"
    result = run_cli("--hf-repo", "kyutai/moshika-pytorch-bf16", "-q", "8", "--out", str(out),
                     env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    # the repo has no Mimi file here: the folder goes without it
    assert {p.name for p in out.iterdir()} == {"model.q8.safetensors", TOKENIZER, "config.json",
                                               "manifest.json"}
    assert safetensors_entries(out / "model.q8.safetensors") == official(8)
    assert (out / TOKENIZER).read_bytes() == (FIXTURES / "tokenizer.model").read_bytes()
    assert "mimi_name" not in json.loads((out / "config.json").read_text())


def test_hf_repo_can_be_a_local_folder_and_bf16(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shutil.copyfile(PYTORCH_FILE, source / "model.safetensors")
    shutil.copyfile(CONFIG_FILE, source / "config.json")
    out = tmp_path / "out"
    convert(out, hf_repo=str(source))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json",
                                               "manifest.json"}
    assert safetensors_entries(out / "model.safetensors") == official(None)
    assert json.loads((out / "config.json").read_text())["quantization"] is None


def test_mlx_layout_bf16_input_quantizes_too(tmp_path, official_mlx_files):
    convert(tmp_path / "q4", input_path=official_mlx_files["bf16"], config=CONFIG_FILE, bits=4)
    assert safetensors_entries(tmp_path / "q4" / "model.q4.safetensors") == official(4)


def test_fine_tuned_checkpoint_with_its_own_config(tmp_path):
    """Another architecture (here: one temporal layer) converts through its config.json."""
    source = tmp_path / "finetuned"
    source.mkdir()
    tensors = {k: v for k, v in mx.load(str(PYTORCH_FILE)).items()
               if not k.startswith("transformer.layers.1.")}
    mx.save_safetensors(str(source / "consolidated.safetensors"), tensors)
    config = {**json.loads(CONFIG_FILE.read_text()), "num_layers": 1}
    (source / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    convert(out, input_path=source / "consolidated.safetensors", bits=4)
    expected = {k: v for k, v in official(4).items() if not k.startswith("transformer.layers.1.")}
    assert safetensors_entries(out / "model.q4.safetensors") == expected
    assert json.loads((out / "config.json").read_text())["num_layers"] == 1


def test_existing_folder_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    convert(out, input_path=PYTORCH_FILE, config=CONFIG_FILE, bits=8)
    (out / "notes.txt").write_text("mine")
    before = sha256(out / "model.q8.safetensors")
    args = ["--input", str(PYTORCH_FILE), "--config", str(CONFIG_FILE), "-q", "4",
            "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--force" in err
    assert sha256(out / "model.q8.safetensors") == before

    assert main([*args, "--force"]) == 0
    # the previous model file is gone (the folder describes one model), other files stay
    assert {p.name for p in out.iterdir()} == {"model.q4.safetensors", "config.json",
                                               "manifest.json", "notes.txt"}
    assert json.loads((out / "manifest.json").read_text())["quantization"]["bits"] == 4


def final_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")}


def test_failure_halfway_leaves_no_final_file(tmp_path, monkeypatch):
    from moshi_mlx.loading import safetensors as safetensors_stream

    original_write = safetensors_stream.SafetensorsStreamWriter.write
    calls = {"n": 0}

    def failing_write(self, name, array):
        calls["n"] += 1
        if calls["n"] == 60:
            raise OSError(28, "No space left on device")
        original_write(self, name, array)

    monkeypatch.setattr(safetensors_stream.SafetensorsStreamWriter, "write", failing_write)
    out = tmp_path / "out"
    with pytest.raises(WeightsError, match="No space"):
        convert(out, input_path=PYTORCH_FILE, config=CONFIG_FILE, bits=4)
    assert calls["n"] == 60
    assert list(out.iterdir()) == []  # nothing final, temporary removed


KILL_HALFWAY = """
import os, signal, sys
from moshi_mlx.loading import safetensors as safetensors_stream
original = safetensors_stream.SafetensorsStreamWriter.write
count = [0]
def write(self, name, array):
    count[0] += 1
    if count[0] == 60:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, array)
safetensors_stream.SafetensorsStreamWriter.write = write
from weights_convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    out = tmp_path / "out"
    args = ["--input", str(PYTORCH_FILE), "--config", str(CONFIG_FILE), "-q", "4",
            "--tokenizer", str(FIXTURES / "tokenizer.model"), "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILL_HALFWAY, *args], cwd=REPO_ROOT,
                            capture_output=True, timeout=120)
    assert killed.returncode == -9
    assert final_names(out) == set()
    leftovers = [p.name for p in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.q4.safetensors.partial-")

    assert run_cli(*args).returncode == 1  # not empty
    assert run_cli(*args, "--force").returncode == 0
    assert {p.name for p in out.iterdir()} == {"model.q4.safetensors", TOKENIZER, "config.json",
                                               "manifest.json"}


def write_bad(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """Arguments for one bad input, and the phrase its error line must contain."""
    path = tmp_path / "model.safetensors"
    config = CONFIG_FILE
    tensors = dict(mx.load(str(PYTORCH_FILE)))
    if kind == "missing_file":
        return ["--input", str(path)], "no such file"
    if kind == "garbage":
        path.write_bytes(b"\x00" * 3 + os.urandom(100))
        return ["--input", str(path)], "not a safetensors file"
    if kind == "truncated":
        path.write_bytes(PYTORCH_FILE.read_bytes()[:-4096])
        return ["--input", str(path), "--config", str(config)], "truncated"
    if kind == "not_moshi":
        tensors = {"encoder.conv.weight": mx.zeros((8, 8), dtype=mx.bfloat16)}
        phrase = "not a Moshi LM checkpoint"
    elif kind == "missing_tensor":
        del tensors["depformer.layers.1.self_attn.out_proj.weight"]
        # named in our layout: a missing tensor has no name in the file
        phrase = ("missing tensor depformer.slices.0.transformer.layers.1.self_attn.out_proj"
                  ".weight")
    elif kind == "wrong_dtype":
        tensors["emb.3.weight"] = tensors["emb.3.weight"].astype(mx.float16)
        phrase = "emb.3.weight has dtype F16, expected BF16"
    elif kind == "unknown_config_key":
        config = tmp_path / "config.json"
        config.write_text(json.dumps({**json.loads(CONFIG_FILE.read_text()), "mystery": 1}))
        phrase = "unknown LM config key(s): mystery"
    elif kind == "config_mismatch":
        config = tmp_path / "config.json"
        config.write_text(json.dumps({**json.loads(CONFIG_FILE.read_text()), "dim": 512,
                                      "num_heads": 8}))
        phrase = "emb.0.weight has shape (2049, 256), expected (2049, 512)"
    else:
        raise AssertionError(kind)
    mx.save_safetensors(str(path), tensors)
    return ["--input", str(path), "--config", str(config)], phrase


BAD_INPUTS = ["missing_file", "garbage", "truncated", "not_moshi", "missing_tensor",
              "wrong_dtype", "unknown_config_key", "config_mismatch"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_gives_one_error_line(tmp_path, capsys, kind):
    args, phrase = write_bad(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "-q", "4", "--out", str(out)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert phrase in err, err
    assert not out.exists()  # checked before anything is written


def test_already_quantized_input_is_refused(tmp_path, official_mlx_files, capsys):
    with pytest.raises(SystemExit):
        main(["--input", str(official_mlx_files["q4"]), "--config", str(CONFIG_FILE), "-q", "8",
              "--out", str(tmp_path / "out")])
    assert "already 4-bit quantized" in capsys.readouterr().err


def test_cli_exit_status_and_no_traceback(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not weights at all, just text")
    result = run_cli("--input", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_output_folder_holding_the_input_is_refused(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    shutil.copyfile(PYTORCH_FILE, folder / "model.safetensors")
    shutil.copyfile(CONFIG_FILE, folder / "config.json")
    with pytest.raises(WeightsError, match="holds the input model.safetensors"):
        convert(folder, hf_repo=str(folder), bits=4, force=True)
    assert sha256(folder / "model.safetensors") == sha256(PYTORCH_FILE)  # untouched


def test_not_enough_disk_space_is_reported_before_writing(tmp_path, monkeypatch):
    from weights_convert import converter

    usage = shutil.disk_usage(tmp_path)
    # q4 of the fixture is 8.4 MB: leave 5 MB free
    monkeypatch.setattr(converter.shutil, "disk_usage",
                        lambda path: usage._replace(free=5_000_000))
    with pytest.raises(WeightsError, match=r"disk space .* needs 8 MB, 5 MB are free"):
        convert(tmp_path / "out", input_path=PYTORCH_FILE, config=CONFIG_FILE, bits=4)
    assert list((tmp_path / "out").iterdir()) == []
