"""python -m moshi_mlx.run_inference: Kyutai's documented STT command (its arguments, as
moshi_mlx 0.3.x spells them) prints the transcript our STT gives, and refuses in one line what
cannot apply to transcription."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile
from cli_run import run_main

from moshi_mlx import run_inference, stt

FRAME = 1920


def words(text: str) -> list[str]:
    return text.split()


@pytest.fixture(scope="module")
def kyutai_files(stt_dir: Path, random_mimi_path: Path) -> list[str]:
    """The fixture STT model in Kyutai's spellings."""
    return ["--moshi-weights", str(stt_dir / "stt_pytorch.safetensors"),
            "--lm-config", str(stt_dir / "stt_config.json"),
            "--tokenizer", str(stt_dir / "stt_tokenizer.model"),
            "--mimi-weights", str(random_mimi_path)]


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory, fixtures_dir: Path) -> Path:
    pcm, rate = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    soundfile.write(str(path), pcm[: 40 * FRAME], rate)
    return path


def test_prints_the_transcript_stt_gives(fixtures_dir, kyutai_files, stt_command_args, capsys):
    speech = str(fixtures_dir / "speech.wav")
    code, out, err = run_main(run_inference.main, [*kyutai_files, speech, "--temp", "0"], capsys)
    assert code == 0, err
    expected_code, expected, expected_err = run_main(
        stt.main, [*stt_command_args, speech, "--format", "text", "--temp", "0"], capsys)
    assert expected_code == 0, expected_err
    assert words(expected)  # the fixture model says something on this input
    assert words(out) == words(expected)
    assert out.endswith("\n") and out.count("\n") == 1  # the text, then one newline
    assert "real-time factor" in err  # the statistics go to stderr, not into the transcript


def test_hf_repo_takes_a_weights_convert_folder(tmp_path, stt_dir, random_mimi_path, short_wav,
                                                capsys, monkeypatch):
    import moshi_mlx.loading.hub
    from weights_convert import convert

    def refuse(repo: str, filename: str):
        raise AssertionError(f"asked the hub for {filename} of {repo}")

    folder = tmp_path / "stt-folder"
    convert(folder, input_path=stt_dir / "stt_pytorch.safetensors",
            config=stt_dir / "stt_config.json", mimi_weight=random_mimi_path)
    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", refuse)  # the folder suffices
    code, out, err = run_main(run_inference.main, ["--hf-repo", str(folder), str(short_wav),
                                              "--temp", "0", "--verbose"], capsys)
    assert code == 0, err
    assert f"weights {folder}" in err  # --verbose names the folder's files
    expected_code, expected, _ = run_main(stt.main, ["--hf-repo", str(folder), str(short_wav),
                                                "--temp", "0"], capsys)
    assert expected_code == 0
    assert words(out) and words(out) == words(expected)


def test_hf_file_spelling_fetches_from_the_repo(tmp_path, monkeypatch):
    import moshi_mlx.loading.hub

    fetched = tmp_path / "fetched.safetensors"
    asked = []

    def download(repo: str, filename: str) -> Path:
        asked.append((repo, filename))
        return fetched

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", download)
    assert run_inference.hub_path("hf://kyutai/stt-2.6b-en-mlx/sub/model.safetensors") == \
        str(fetched)
    assert asked == [("kyutai/stt-2.6b-en-mlx", "sub/model.safetensors")]
    assert run_inference.hub_path("local/file.safetensors") == "local/file.safetensors"
    assert run_inference.hub_path(None) is None


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("extra, pattern", [
    (["out.wav"], "generates no audio"),
    (["--cfg-coef", "3"], "no classifier-free guidance"),
    (["--moshi-weights", "hf://kyutai/only-a-repo"], "write hf://OWNER/REPO/PATH"),
])
def test_what_only_applies_to_moshi_is_one_line(extra, pattern, short_wav, kyutai_files,
                                                capsys):
    code, out, err = run_main(run_inference.main, [*kyutai_files, str(short_wav), *extra], capsys)
    assert_one_line_error(code, err, pattern)
    assert out == ""


def test_a_missing_input_file_is_one_line(tmp_path, kyutai_files, capsys):
    missing = tmp_path / "nowhere.mp3"
    code, _, err = run_main(run_inference.main, [*kyutai_files, str(missing), "--temp", "0"],
                            capsys)
    assert_one_line_error(code, err, f"{missing}: no such audio file")


def test_a_moshi_checkpoint_is_one_line(fixtures_dir, stt_dir, short_wav, capsys):
    moshi = ["--moshi-weights", str(fixtures_dir / "lm_pytorch.safetensors"),
             "--tokenizer", str(stt_dir / "stt_tokenizer.model"), str(short_wav)]
    code, _, err = run_main(run_inference.main,
                       [*moshi, "--lm-config", str(fixtures_dir / "lm_config.json")], capsys)
    assert_one_line_error(code, err, "describes a Moshi model")
    code, _, err = run_main(run_inference.main,
                       [*moshi, "--lm-config", str(stt_dir / "stt_config.json")], capsys)
    assert_one_line_error(code, err, "is a Moshi checkpoint")


def test_help_lists_kyutais_arguments_with_their_defaults():
    parser = run_inference.build_parser()
    text = parser.format_help()
    for spelling in ("infile", "outfile", "--hf-repo", "--moshi-weights", "--mimi-weights",
                     "--tokenizer", "--lm-config", "--temp", "--cfg-coef", "--verbose"):
        assert spelling in text, spelling
    defaults = parser.parse_args(["talk.wav"])
    assert (defaults.infile, defaults.outfile) == ("talk.wav", "")
    assert (defaults.temp, defaults.cfg_coef, defaults.verbose) == (0.8, 1.0, False)
    assert text.startswith("usage: python -m moshi_mlx.run_inference")


def test_the_stt_family_accepts_the_command_and_stt_still_names_it():
    from moshi_mlx.loading.families import families_for, files_of

    assert families_for("moshi_mlx.run_inference") == ("stt",)
    assert files_of("stt").commands[0] == "moshi_mlx.stt"
