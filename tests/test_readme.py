"""The README's examples run as written, so they cannot drift from the code.

Every `python -m moshi_mlx...` / `python -m weights_convert` line of its bash blocks is parsed
by that command's own parser; those that need no sound device, server or browser are run in a
child process against a Hugging Face cache that holds the test fixtures under the official
repo names (offline), and must exit 0 and write what they name. Every Python block runs too.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import soundfile
from readme_examples import Command, add_repo, blocks, commands
from serve_helpers import serve_command

from moshi_mlx.loading import hub
from moshi_mlx.loading.families import files_of
from moshi_mlx.speech.generate import Segment
from moshi_mlx.speech.voices import default_voices_folder, save_voice

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# Flags that open a sound device, serve, or only list devices: parsed, not run here (the
# device and browser tests run those paths on a virtual sound card).
LIVE_FLAGS = {"--mic", "--play", "--list-devices"}
OUTPUT_FLAGS = {"-o", "--output-file", "--transcript", "--codes-out", "--out", "--record",
                "--save-prompt-state"}
# The fixture CSM is random: it rarely draws the all-zero end frame, so runs get a short limit.
CSM_FRAME_LIMIT = ["--max-frames", "6"]
CLIP_SECONDS = 2.0


def runs_here(command: Command) -> bool:
    if command.module in ("moshi_mlx.local_web", "moshi_mlx.serve") \
            or LIVE_FLAGS & set(command.argv):
        return False
    if command.module == "moshi_mlx.local":
        return "--input-file" in command.argv
    return True


@pytest.fixture(scope="module")
def fixture_hub(tmp_path_factory, official_mlx_files, official_stt_mlx_files,
                random_mimi_path) -> Path:
    """The official repos the README names, holding the fixtures."""
    cache = tmp_path_factory.mktemp("hf_cache")
    moshi, mimi = files_of("moshi"), files_of("mimi")
    moshi_common = {hub.CONFIG_NAME: FIXTURES / "lm_config.json",
                    moshi.default_tokenizer_name(): FIXTURES / "tokenizer.model",
                    mimi.weight_names()[None]: random_mimi_path}
    for voice in moshi.repos:
        for bits, name in ((None, "bf16"), (8, "q8"), (4, "q4")):
            add_repo(cache, moshi.default_repo(voice, bits),
                     {**moshi_common, hub.MODEL_FILES[bits]: official_mlx_files[name]})
        add_repo(cache, f"kyutai/{voice}-pytorch-bf16",
                 {**moshi_common, hub.MODEL_FILES[None]: FIXTURES / "lm_pytorch.safetensors"})
    stt = FIXTURES / "stt"
    stt_common = {hub.CONFIG_NAME: stt / "stt_config.json",
                  "stt_tokenizer.model": stt / "stt_tokenizer.model",
                  "mimi.safetensors": random_mimi_path}
    for repo in ("kyutai/stt-1b-en_fr-mlx", "kyutai/stt-2.6b-en-mlx"):
        add_repo(cache, repo, {**stt_common, hub.MODEL_FILES[None]: official_stt_mlx_files["bf16"]})
    add_repo(cache, "kyutai/stt-1b-en_fr-candle",
             {**stt_common, hub.MODEL_FILES[None]: stt / "stt_pytorch.safetensors"})
    csm = FIXTURES / "csm"
    sesame = csm / "sesame"
    add_repo(cache, "sesame/csm-1b", {
        hub.CONFIG_NAME: sesame / "config.json", "flavors.json": sesame / "flavors.json",
        hub.MODEL_FILES[None]: sesame / "model.safetensors",
        hub.TOKENIZER_JSON_NAME: csm / "tokenizer.json"})
    return cache


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding the inputs the README's examples name (a 2 s clip of the test speech
    under each name, codes of 32 codebooks, a saved voice), with HOME inside it."""
    work = tmp_path_factory.mktemp("readme")
    pcm, rate = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    clip = pcm[: int(CLIP_SECONDS * rate)]
    for name in ("talk.wav", "you.wav", "a.wav", "speech.wav", "me.wav"):
        soundfile.write(work / name, clip, rate)
    soundfile.write(work / "b.flac", clip, rate)
    rng = np.random.default_rng(0)
    np.save(work / "codes.npy", rng.integers(0, 2048, (32, 20)).astype(np.int32))
    (work / "home").mkdir()
    # The voice `--voice me` speaks in, in the voices folder the examples see.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(work / "home" / ".cache"))
        voices = default_voices_folder()
    save_voice(voices, "me", Segment(0, "What I said.", codes=np.load(work / "codes.npy")))
    write_finetune_inputs(work)
    return work


def write_finetune_inputs(work: Path) -> None:
    """The fine-tuning examples' data (a conversation of me.wav and of codes.npy) and an
    adapter of the fixture CSM, so each example runs alone."""
    import mlx.core as mx

    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.training.csm_lora import csm_lora_paths
    from moshi_mlx.training.lora import LoraSettings, apply_lora, save_adapter

    turns = [{"speaker": 0, "text": "What I said.", "audio": "me.wav"},
             {"speaker": 1, "text": "And the answer.", "codes": "codes.npy"}]
    (work / "convs.jsonl").write_text(json.dumps(turns) + "\n")
    model = load_csm(FIXTURES / "csm" / "sesame", dtype=mx.float32)
    paths = apply_lora(model, csm_lora_paths(model))
    save_adapter(model, work / "adapters", LoraSettings(paths=tuple(paths), family="csm"))
    write_moshi_finetune_inputs(work)


def write_moshi_finetune_inputs(work: Path) -> None:
    """Moshi's examples: talks.jsonl (a stereo clip with its alignments), an adapter of the
    fixture Moshi (moshi-adapters/) and the same LoRA as moshi-finetune saves it
    (consolidated/lora.safetensors + config.json)."""
    import re

    import mlx.core as mx

    from moshi_mlx.loading.models import load_lm
    from moshi_mlx.training.lora import LoraSettings, apply_lora, save_adapter
    from moshi_mlx.training.moshi_lora import FAMILY, moshi_lora_paths

    pcm, rate = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    clip = pcm[: int(CLIP_SECONDS * rate)]
    soundfile.write(work / "talk_stereo.wav", np.stack([clip, clip[::-1]], axis=1), rate)
    words = [["hello", [0.2, 0.5], "SPEAKER_MAIN"], ["there", [0.6, 0.9], "SPEAKER_OTHER"]]
    (work / "talk_stereo.json").write_text(json.dumps({"alignments": words}))
    (work / "talks.jsonl").write_text(json.dumps({"path": "talk_stereo.wav",
                                                  "duration": CLIP_SECONDS}) + "\n")
    lm = load_lm(FIXTURES / "lm_pytorch.safetensors", config=FIXTURES / "lm_config.json",
                 dtype=mx.float32)
    paths = apply_lora(lm, moshi_lora_paths(lm))
    save_adapter(lm, work / "moshi-adapters", LoraSettings(paths=tuple(paths), family=FAMILY))
    kyutai = {}
    for path, leaves in mx.load(str(work / "moshi-adapters" / "adapters.safetensors")).items():
        module, leaf = path.rsplit(".", 1)
        module = re.sub(r"depformer\.slices\.(\d+)\.linear_in", r"depformer_in.\1", module)
        module = re.sub(r"depformer\.slices\.(\d+)\.linear_out", r"linears.\1", module)
        module = re.sub(r"depformer\.slices\.(\d+)\.transformer\.layers\.(\d+)\.self_attn\."
                        r"(in|out)_proj", r"depformer.layers.\2.self_attn.\3_projs.\1", module)
        module = re.sub(r"depformer\.slices\.(\d+)\.transformer\.layers\.(\d+)\.gating",
                        r"depformer.layers.\2.gating.\1", module)
        kyutai[f"{module}.lora_{'A' if leaf == 'lora_a' else 'B'}.weight"] = leaves.T
    (work / "consolidated").mkdir()
    mx.save_safetensors(str(work / "consolidated" / "lora.safetensors"), kyutai)
    (work / "consolidated" / "config.json").write_text(
        json.dumps({"lora": True, "lora_rank": 8, "lora_scaling": 20.0}))


def written_paths(command: Command, cwd: Path) -> list[Path]:
    argv = command.argv
    paths = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in OUTPUT_FLAGS]
    if command.module == "moshi_mlx.mimi":
        paths.append(argv[2])  # mimi encode IN OUT / decode IN OUT
    home = cwd / "home"
    return [Path(p.replace("~", str(home), 1)) if p.startswith("~") else cwd / p for p in paths]


COMMANDS = commands()


def test_the_readme_has_examples_of_every_command():
    assert {c.module for c in COMMANDS} >= {"moshi_mlx.local", "moshi_mlx.local_web",
                                            "moshi_mlx.stt", "moshi_mlx.tts", "moshi_mlx.mimi",
                                            "weights_convert"}
    assert any(runs_here(c) for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.line for c in COMMANDS])
def test_every_command_line_parses(command: Command):
    module = importlib.import_module(
        "weights_convert.__main__" if command.module == "weights_convert" else command.module)
    module.build_parser().parse_args(command.argv)  # SystemExit(2) on an unknown option


RUN = [c for c in COMMANDS if runs_here(c)]


@pytest.mark.parametrize("command", RUN, ids=[c.line for c in RUN])
def test_command_runs_as_written(command: Command, fixture_hub: Path, workdir: Path):
    argv = list(command.argv)
    if command.module == "moshi_mlx.tts" and "--max-frames" not in argv:
        argv += CSM_FRAME_LIMIT
    home = workdir / "home"
    argv = [str(home) + a[1:] if a.startswith("~") else a for a in argv]
    env = {**os.environ, "HF_HUB_CACHE": str(fixture_hub), "HF_HUB_OFFLINE": "1",
           "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", command.module, *argv], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command.line}\n{result.stderr[-3000:]}"
    for path in written_paths(command, workdir):
        assert path.exists() and (path.is_dir() or path.stat().st_size > 0), \
            f"{command.line}: {path} was not written"


SERVE = [c for c in COMMANDS if c.module == "moshi_mlx.serve"]
SERVER_ADDRESS = "127.0.0.1:8080"  # what the README's client examples connect to


def hub_env(fixture_hub: Path, workdir: Path) -> dict:
    return {**os.environ, "HF_HUB_CACHE": str(fixture_hub), "HF_HUB_OFFLINE": "1",
            "HOME": str(workdir / "home"), "XDG_CACHE_HOME": str(workdir / "home" / ".cache"),
            "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("command", SERVE, ids=[c.line for c in SERVE])
def test_server_command_serves_what_it_names(command: Command, fixture_hub: Path,
                                             workdir: Path):
    with serve_command(command.argv, hub_env(fixture_hub, workdir), workdir) as server:
        request = urllib.request.Request(f"{server.url}/v1/models",
                                         headers={"Authorization": "Bearer public_token"})
        with urllib.request.urlopen(request, timeout=60) as response:
            listed = {m["owned_by"] for m in json.load(response)["data"]}
    named = {"--stt": "kyutai", "--moshi": "kyutai", "--tts": "sesame"}
    assert listed == {named[flag] for flag in named if flag in command.argv}


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index: int, fixture_hub: Path, workdir: Path):
    code = blocks("python")[index]
    env = hub_env(fixture_hub, workdir)
    with ExitStack() as stack:
        if SERVER_ADDRESS in code:  # a client example: against the README's first server
            server = stack.enter_context(serve_command(SERVE[0].argv, env, workdir))
            code = code.replace(SERVER_ADDRESS, server.url.removeprefix("http://"))
        result = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env,
                                capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"README Python block {index}:\n{code}\n{result.stderr[-3000:]}"
