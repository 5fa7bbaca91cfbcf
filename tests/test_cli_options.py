"""One CLI skeleton: every entry point's parser, the shared option groups spelled the same in
every command, the options objects built from them, --list-devices, and output folders."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest

from moshi_mlx.cli import options
from moshi_mlx.cli.options import SamplingOptions, engine_options
from moshi_mlx.cli.outputs import output_file
from moshi_mlx.errors import MoshiError
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.loading.quantization import QUANTIZATIONS
from moshi_mlx.modules.sampling import SamplingSettings

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CSM = FIXTURES / "csm"

# module -> its console script (pyproject.toml's [project.scripts], checked below)
ENTRY_POINTS = {
    "moshi_mlx.local": "moshi-local",
    "moshi_mlx.local_web": "moshi-web",
    "moshi_mlx.stt": "moshi-stt",
    "moshi_mlx.tts": "moshi-tts",
    "moshi_mlx.mimi": "moshi-mimi",
    "moshi_mlx.serve": "moshi-serve",
    "moshi_mlx.text": "moshi-text",
    "moshi_mlx.finetune": "moshi-finetune",
    "weights_convert.__main__": "moshi-convert",
}
MODEL_COMMANDS = ("moshi_mlx.local", "moshi_mlx.local_web", "moshi_mlx.stt", "moshi_mlx.tts",
                  "moshi_mlx.serve", "moshi_mlx.text")
DEVICE_COMMANDS = ("moshi_mlx.local", "moshi_mlx.stt", "moshi_mlx.tts")
SHARED = {  # dest -> the option strings every model-loading command spells it with
    "quantize": ["-q", "--quantize"],
    "dtype": ["--dtype"],
    "cpu_threads": ["--cpu-threads"],
    "seed": ["--seed"],
}


def parser_of(module: str) -> argparse.ArgumentParser:
    return import_module(module).build_parser()


def action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    found = [a for a in parser._actions if a.dest == dest]
    assert len(found) == 1, (dest, [a.option_strings for a in found])
    return found[0]


def run_main(module: str, argv: list[str]) -> int:
    try:
        return import_module(module).main(argv)
    except SystemExit as exc:
        return exc.code


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] (read by hand: tomllib is Python 3.11+)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1]
    lines = section.split("\n[", 1)[0].splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {name.strip(): target.strip().strip('"') for name, target in pairs}


def test_entry_points_are_the_console_scripts():
    scripts = console_scripts()
    assert {target.split(":")[0]: name for name, target in scripts.items()} == ENTRY_POINTS
    for module, script in ENTRY_POINTS.items():
        target = scripts[script].split(":")[1]
        assert callable(getattr(import_module(module), target))


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_usage_names_the_script_or_the_module(module, monkeypatch):
    script = ENTRY_POINTS[module]
    shown = module.removesuffix(".__main__")
    monkeypatch.setattr(sys, "argv", [f"/venv/bin/{script}"])
    assert parser_of(module).format_usage().startswith(f"usage: {script} ")
    monkeypatch.setattr(sys, "argv", [f"/src/{shown.replace('.', '/')}.py"])
    assert parser_of(module).format_usage().startswith(f"usage: python -m {shown} ")


def test_usage_of_a_console_script_and_of_python_m():
    script = Path(sys.executable).parent / "moshi-stt"
    assert script.is_file(), "moshi-stt is not installed (pip install -e .)"
    as_script = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                               timeout=120, check=True)
    assert as_script.stdout.startswith("usage: moshi-stt ")
    as_module = subprocess.run([sys.executable, "-m", "moshi_mlx.stt", "--help"],
                               capture_output=True, text=True, timeout=120, check=True)
    assert as_module.stdout.startswith("usage: python -m moshi_mlx.stt ")
    # the same command: all but the usage block (wrapped to the name's width) is the same
    assert as_script.stdout.split("\n\n", 1)[1] == as_module.stdout.split("\n\n", 1)[1]


@pytest.mark.parametrize("module", MODEL_COMMANDS)
def test_model_commands_share_the_option_spellings(module):
    parser = parser_of(module)
    text = parser.format_help()
    for dest, spellings in SHARED.items():
        assert action(parser, dest).option_strings == spellings
        assert all(s in text for s in spellings)
    assert action(parser, "quantize").type is options.quantize_bits
    assert action(parser, "seed").type is options.seed
    assert action(parser, "cpu_threads").type is options.positive_int
    assert tuple(action(parser, "dtype").choices) == options.DTYPE_CHOICES
    # every command samples: --temp and --top-k, whatever else it also accepts
    assert action(parser, "temp").option_strings[0] == "--temp"
    assert action(parser, "top_k").option_strings[0] == "--top-k"
    assert "--temp" in text and "--top-k" in text
    assert ("--list-devices" in text) == (module in DEVICE_COMMANDS)


@pytest.mark.parametrize("module", [*MODEL_COMMANDS, "weights_convert.__main__"])
def test_q_choices_are_the_loaders_quantizations(module):
    quantize = action(parser_of(module), "quantize")
    assert quantize.option_strings == ["-q", "--quantize"]
    assert tuple(quantize.choices) == tuple(QUANTIZATIONS)
    assert "{4,8}" in parser_of(module).format_help()


@pytest.mark.parametrize("module", [*MODEL_COMMANDS, "weights_convert.__main__"])
def test_a_bad_q_is_one_line_everywhere(module, capsys):
    assert run_main(module, ["-q", "3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: -q must be 4 or 8, got '3'"]


@pytest.mark.parametrize("module", MODEL_COMMANDS)
@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "seed must be between 0"),
    (["--temp", "-0.5"], "temperature must be >= 0"),
    (["--top-k", "-2"], "top-k must be >= 0"),
    (["--cpu-threads", "0"], "must be >= 1"),
])
def test_bad_shared_values_are_refused_by_every_command(module, argv, message, capsys):
    assert run_main(module, argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module, temp, top_k", [("moshi_mlx.stt", 0.0, 50),
                                                 ("moshi_mlx.tts", 0.9, 50)])
def test_one_sampler_commands_keep_their_old_spellings(module, temp, top_k):
    parser = parser_of(module)
    assert SamplingOptions.from_args(parser.parse_args(["x"])) == SamplingOptions(temp, top_k)
    for argv in (["--temp", "0.5", "--top-k", "7"], ["--temperature", "0.5", "--topk", "7"]):
        assert SamplingOptions.from_args(parser.parse_args(["x", *argv])) == \
            SamplingOptions(0.5, 7)
    args = parser.parse_args(["x", "-q", "8", "--dtype", "f32", "--cpu-threads", "2",
                              "--seed", "9"])
    assert ModelOptions.from_args(args) == ModelOptions(8, "f32", 2, 9)
    assert ModelOptions.from_args(args).load_kwargs() == {"quantize": 8, "dtype": "f32",
                                                           "cpu_threads": 2}


def test_moshi_temp_and_top_k_set_both_samplers_last_one_wins():
    parser = parser_of("moshi_mlx.local")
    assert engine_options(parser.parse_args([])).sampling == SamplingSettings()
    both = engine_options(parser.parse_args(["--temp", "0", "--top-k", "5"]))
    assert both.sampling == SamplingSettings(0.0, 5, 0.0, 5)
    mixed = parser.parse_args(["--temp", "0.3", "--text-temp", "0.6", "--audio-topk", "9",
                               "--top-k", "4"])
    assert engine_options(mixed).sampling == SamplingSettings(0.6, 4, 0.3, 4)
    full = engine_options(parser.parse_args(["-q", "4", "--dtype", "bf16", "--seed", "3",
                                             "--cpu-threads", "1", "--mimi-backend",
                                             "rustymimi"]))
    assert full.model == ModelOptions(4, "bf16", 1, 3) and full.mimi_backend == "rustymimi"


def test_engine_takes_the_options_object(random_mimi_path):
    from moshi_mlx.conversation.engine import Engine, EngineOptions

    def engine(options: EngineOptions) -> Engine:
        return Engine.from_files(FIXTURES / "lm_pytorch.safetensors", random_mimi_path,
                                 FIXTURES / "tokenizer.model",
                                 config=FIXTURES / "lm_config.json", options=options)

    def texts(e: Engine) -> list[tuple[str | None, bytes]]:
        outs = [e.process(np.zeros(1920, np.float32)) for _ in range(12)]
        return [(out.text, out.pcm.tobytes()) for out in outs]

    chosen = SamplingSettings(1.5, 100, 0.5, 20)
    seeded = engine(EngineOptions(ModelOptions(dtype="f32", seed=11), chosen, "rustymimi"))
    assert seeded.sampling == chosen
    first = texts(seeded)
    again = texts(engine(EngineOptions(ModelOptions(seed=11), chosen, "rustymimi")))
    other = texts(engine(EngineOptions(ModelOptions(seed=12), chosen, "rustymimi")))
    assert first == again and first != other  # the seed reaches the sampler


@pytest.mark.parametrize("module, argv", [
    ("moshi_mlx.local", ["--list-devices"]),
    ("moshi_mlx.stt", ["--list-devices"]),  # no input needed
    ("moshi_mlx.tts", ["--list-devices"]),  # no text needed
    ("moshi_mlx.stt", ["--mic", "--list-devices", "-q", "8"]),
])
def test_list_devices_lists_and_exits_0(module, argv, monkeypatch, capsys):
    import moshi_mlx.audio.devices

    monkeypatch.setattr(moshi_mlx.audio.devices, "list_devices", lambda: "0 fake, ALSA (2 in)")
    assert run_main(module, argv) == 0
    assert capsys.readouterr().out == "0 fake, ALSA (2 in)\n"


def test_tts_without_text_is_one_line(capsys):
    assert run_main("moshi_mlx.tts", ["-o", "out.wav"]) == 1
    assert capsys.readouterr().err.startswith("error: nothing to say")


# --------------------------------------------------------------------------- output paths


def test_a_path_ending_in_a_slash_is_a_folder_created_when_missing(tmp_path):
    assert output_file(f"{tmp_path}/new/deeper/", "a.txt") == tmp_path / "new/deeper/a.txt"
    assert (tmp_path / "new/deeper").is_dir()
    assert output_file(tmp_path / "new", "b.txt") == tmp_path / "new/b.txt"  # an existing one
    assert output_file(tmp_path / "c.txt", "ignored") == tmp_path / "c.txt"
    with pytest.raises(MoshiError, match="no such folder"):
        output_file(tmp_path / "missing/c.txt", "ignored")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MoshiError, match="is a file, not a folder"):
        output_file(f"{tmp_path}/afile/", "a.txt")


def test_stt_outputs_into_a_new_folder(tmp_path):
    from moshi_mlx.stt import _outputs, build_parser

    parser = build_parser()
    several = parser.parse_args(["a.wav", "b.flac", "--format", "srt", "-o", f"{tmp_path}/subs/"])
    assert _outputs(several, ["a.wav", "b.flac"]) == [tmp_path / "subs/a.srt",
                                                       tmp_path / "subs/b.srt"]
    one = parser.parse_args(["talk.wav", "-o", f"{tmp_path}/newdir/"])
    assert _outputs(one, ["talk.wav"]) == [tmp_path / "newdir/talk.txt"]
    as_file = parser.parse_args(["a.wav", "b.wav", "-o", str(tmp_path / "out.txt")])
    with pytest.raises(MoshiError, match="must be a folder"):
        _outputs(as_file, ["a.wav", "b.wav"])


def test_stt_writes_into_a_new_folder_and_prints_the_blas_hint(stt_dir, stt_golden, tmp_path,
                                                               monkeypatch, capsys):
    import moshi_mlx.stt as stt

    hints = []
    monkeypatch.setattr(stt, "print_blas_hint", lambda: hints.append(1))
    codes = tmp_path / "talk.npy"
    np.save(codes, stt_golden["codes_v1"][:, :30].astype(np.int32))
    assert stt.main(["--moshi-weight", str(stt_dir / "stt_pytorch.safetensors"),
                     "--config", str(stt_dir / "stt_config.json"),
                     "--tokenizer", str(stt_dir / "stt_tokenizer.model"),
                     "--codes", str(codes), "--format", "vtt", "-o", f"{tmp_path}/subs/"]) == 0
    assert (tmp_path / "subs/talk.vtt").read_text().startswith("WEBVTT")
    assert hints == [1]


def test_tts_writes_into_a_new_folder_and_prints_the_blas_hint(tmp_path, monkeypatch, capsys):
    import moshi_mlx.tts as tts

    hints = []
    monkeypatch.setattr(tts, "print_blas_hint", lambda: hints.append(1))
    assert tts.main(["Hello.", "--codes-out", f"{tmp_path}/codes/", "--weights",
                     str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json"),
                     "--temp", "0", "--max-frames", "3", "--dtype", "f32"]) == 0
    codes = np.load(tmp_path / "codes/speech.npy")
    assert codes.shape[0] == 32 and 1 <= codes.shape[1] <= 3
    assert hints == [1]


def test_mimi_decodes_into_a_new_folder(random_mimi_path, tmp_path, capsys):
    import soundfile

    from moshi_mlx.mimi import main

    codes = tmp_path / "clip.npy"
    np.save(codes, np.arange(24, dtype=np.int32).reshape(8, 3) * 80)
    assert main(["decode", str(codes), f"{tmp_path}/decoded/", "--weights",
                 str(random_mimi_path)]) == 0
    pcm, rate = soundfile.read(str(tmp_path / "decoded/clip.wav"))
    assert rate == 24000 and pcm.shape == (3 * 1920,)


def test_local_outputs_into_folders(tmp_path):
    from moshi_mlx.local import _resolve_outputs, build_parser

    args = build_parser().parse_args(["--input-file", "talks/user.wav",
                                      "--output-file", f"{tmp_path}/out/",
                                      "--transcript", f"{tmp_path}/text/",
                                      "--record", f"{tmp_path}/rec/"])
    _resolve_outputs(args)
    assert args.output_file == tmp_path / "out/user-moshi.wav"
    assert args.transcript == tmp_path / "text/user-moshi.txt"
    assert args.record.parent == tmp_path / "rec" and args.record.name.startswith("moshi-")
    assert all((tmp_path / name).is_dir() for name in ("out", "text", "rec"))
