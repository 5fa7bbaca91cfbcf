"""Every folder weights_convert writes, from every layout we have fixtures for and every family,
with its tokenizer and codec, loads in every command of its family with nothing else given
(and no hub access); its config.json names only files that are in it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile

from moshi_mlx.errors import WeightsError

FIXTURES = Path(__file__).parent / "fixtures"
STT = FIXTURES / "stt"
CSM = FIXTURES / "csm"
FRAME = 1920
NAME_KEYS = ("moshi_name", "tokenizer_name", "mimi_name")


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Nothing may come from the hub: the folders hold everything."""
    import moshi_mlx.loading.hub

    def refuse(repo: str, filename: str):
        raise AssertionError(f"asked the hub for {filename} of {repo}")

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", refuse)


@pytest.fixture(scope="module")
def short_wav(tmp_path_factory) -> Path:
    pcm, rate = soundfile.read(str(FIXTURES / "speech.wav"), dtype="float32")
    path = tmp_path_factory.mktemp("audio") / "short.wav"
    soundfile.write(str(path), pcm[: 6 * FRAME], rate)
    return path


def _source(layout: str, root: Path, random_mimi: Path, transformers_moshi: Path,
            transformers_stt: Path, official_mlx: dict[str, Path]) -> tuple[dict, dict]:
    """convert() arguments for a layout, and how to run the same model from the source."""
    from csm_layouts import write_mlx_audio_csm, write_transformers_csm

    tokenizer, stt_tokenizer, csm_tokenizer = (FIXTURES / "tokenizer.model",
                                               STT / "stt_tokenizer.model",
                                               CSM / "tokenizer.json")
    if layout == "moshi-pytorch":
        return ({"input_path": FIXTURES / "lm_pytorch.safetensors",
                 "config": FIXTURES / "lm_config.json", "tokenizer": tokenizer,
                 "mimi_weight": random_mimi}, {"codec": random_mimi})
    if layout == "moshi-mlx":  # the official MLX layout (our own bf16 output, converted again)
        return ({"input_path": official_mlx["bf16"], "tokenizer": tokenizer,
                 "mimi_weight": random_mimi}, {"codec": random_mimi})
    if layout == "moshi-transformers":  # bundles its Mimi
        return {"hf_repo": str(transformers_moshi), "tokenizer": tokenizer}, {
            "codec": transformers_moshi}
    if layout == "stt-pytorch":  # its config names stt_tokenizer.model, found beside it
        return ({"input_path": STT / "stt_pytorch.safetensors",
                 "config": STT / "stt_config.json", "mimi_weight": random_mimi},
                {"argv": ["--moshi-weight", str(STT / "stt_pytorch.safetensors"),
                          "--config", str(STT / "stt_config.json"),
                          "--tokenizer", str(stt_tokenizer), "--mimi-weight", str(random_mimi)],
                 "codec": random_mimi})
    if layout == "stt-transformers":  # bundles its Mimi
        return ({"hf_repo": str(transformers_stt), "tokenizer": stt_tokenizer},
                {"argv": ["--hf-repo", str(transformers_stt), "--tokenizer", str(stt_tokenizer)],
                 "codec": transformers_stt})
    if layout == "csm-sesame":
        return {"hf_repo": str(CSM / "sesame"), "tokenizer": csm_tokenizer,
                "mimi_weight": random_mimi}, {"weights": CSM / "sesame"}
    if layout == "csm-transformers":  # tokenizer.json in the folder
        folder = write_transformers_csm(root / "csm-transformers-source")
        return {"hf_repo": str(folder), "mimi_weight": random_mimi}, {"weights": folder}
    assert layout == "csm-mlx-audio"
    folder = write_mlx_audio_csm(root / "csm-mlx-audio-source")
    return ({"hf_repo": str(folder), "tokenizer": csm_tokenizer, "mimi_weight": random_mimi},
            {"weights": folder})


LAYOUTS = ["moshi-pytorch", "moshi-mlx", "moshi-transformers", "stt-pytorch",
           "stt-transformers", "csm-sesame", "csm-transformers", "csm-mlx-audio"]


@pytest.fixture(scope="module", params=LAYOUTS)
def converted(request, tmp_path_factory, random_mimi_path, transformers_moshi, transformers_stt,
              official_mlx_files):
    """(layout, the q4 folder, the conversion result, how to run the source)."""
    from weights_convert import convert

    root = tmp_path_factory.mktemp(request.param)
    arguments, source = _source(request.param, root, random_mimi_path, transformers_moshi,
                                transformers_stt, official_mlx_files)
    result = convert(root / "q4", bits=4, **arguments)
    return request.param, root / "q4", result, source


def test_the_folder_names_only_its_own_files_and_lacks_nothing(converted):
    layout, folder, result, _ = converted
    config = json.loads((folder / "config.json").read_text())
    named = {config[key] for key in NAME_KEYS if key in config}
    assert len(named) == 3, config  # weights, tokenizer and codec: all there
    assert all((folder / name).is_file() for name in named)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert result.notes == []
    if layout.endswith("transformers") and not layout.startswith("csm"):  # its bundled Mimi
        assert config["mimi_name"] == "mimi.safetensors" and "codec_config" in config


def test_each_command_of_the_family_runs_from_the_folder_alone(converted, short_wav, tmp_path):
    layout, folder, _, source = converted
    family = layout.split("-")[0]
    {"moshi": _moshi_commands, "stt": _stt_command, "csm": _tts_command}[family](
        folder, source, short_wav, tmp_path)


def _moshi_commands(folder: Path, source: dict, wav: Path, tmp_path: Path) -> None:
    from moshi_mlx import local, local_web, mimi
    from moshi_mlx.cli.options import resolve_model_files

    args = local_web.build_parser().parse_args(["--hf-repo", str(folder), "-q", "4"])
    files = resolve_model_files(args)
    assert {files.weight.parent, files.codec.parent, files.tokenizer.parent} == {folder}
    out = tmp_path / "out.wav"
    assert local.main(["--hf-repo", str(folder), "-q", "4", "--input-file", str(wav),
                       "--output-file", str(out), "--text-temp", "0", "--audio-temp", "0"]) == 0
    assert soundfile.info(str(out)).frames == 6 * FRAME
    # Its Mimi serves `python -m moshi_mlx.mimi` too, and is the source's.
    codes = tmp_path / "codes.npy"
    assert mimi.main(["encode", str(wav), str(codes), "--weights", str(folder)]) == 0
    np.testing.assert_array_equal(np.load(codes), _encoded(source["codec"], wav))
    _text_command(folder)


def _text_command(folder: Path) -> None:
    """`python -m moshi_mlx.text` from the folder alone: its tokenizer is the fixture's (the
    prompt ids of the text golden) and needs no Mimi."""
    import contextlib
    import io

    from moshi_mlx import text

    with np.load(FIXTURES / "moshi_text_golden.npz") as golden:
        prompt, prompt_ids = str(golden["0_text"]), golden["0_prompt_ids"].tolist()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert text.main([prompt, "--hf-repo", str(folder), "-q", "4", "--temp", "0",
                          "--max-tokens", "4", "--json"]) == 0
    result = json.loads(printed.getvalue())
    assert result["prompt_tokens"] == prompt_ids and len(result["tokens"]) == 4


def _encoded(codec: Path, wav: Path) -> np.ndarray:
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.loading.models import load_mimi

    pcm = read_audio(wav)
    return np.asarray(load_mimi(codec).encode(pcm[None, None]))[0].astype(np.int32)


def _stt_command(folder: Path, source: dict, wav: Path, tmp_path: Path) -> None:
    from moshi_mlx import mimi, stt

    ours, theirs = tmp_path / "ours.json", tmp_path / "theirs.json"
    assert stt.main(["--hf-repo", str(folder), "-q", "4", str(wav), "--format", "json",
                     "-o", str(ours)]) == 0
    assert stt.main([*source["argv"], "-q", "4", str(wav), "--format", "json",
                     "-o", str(theirs)]) == 0
    assert json.loads(ours.read_text()) == json.loads(theirs.read_text())
    codes = tmp_path / "codes.npy"
    assert mimi.main(["encode", str(wav), str(codes), "--weights", str(folder)]) == 0
    np.testing.assert_array_equal(np.load(codes), _encoded(source["codec"], wav))


def _tts_command(folder: Path, source: dict, wav: Path, tmp_path: Path) -> None:
    from moshi_mlx import tts
    from moshi_mlx.loading.models import load_csm
    from moshi_mlx.speech.generate import generate_speech, load_tokenizer

    out, codes = tmp_path / "out.wav", tmp_path / "codes.npy"
    assert tts.main(["Hello.", "--weights", str(folder), "-q", "4", "-o", str(out),
                     "--codes-out", str(codes), "--temperature", "0", "--max-frames", "3",
                     "--no-watermark"]) == 0
    expected = generate_speech(load_csm(source["weights"], quantize=4),
                               load_tokenizer(CSM / "tokenizer.json"), "Hello.", 0,
                               temperature=0, max_frames=3)
    np.testing.assert_array_equal(np.load(codes).T, expected)
    assert soundfile.info(str(out)).frames == len(expected) * FRAME
    assert load_csm(folder).cfg == load_csm(source["weights"]).cfg


# ---------------------------------------------------------------- what a source lacks


def test_an_stt_folder_without_tokenizer_and_mimi_names_neither(tmp_path, capsys):
    """Its config names stt_tokenizer.model and mimi.safetensors, which the source lacks: the
    folder's config.json does not name them, the notes (on stderr) give the options that add
    them, and a command that needs one says which option supplies it."""
    from moshi_mlx import stt
    from weights_convert.__main__ import main

    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(STT / "stt_pytorch.safetensors", source / "model.safetensors")
    shutil.copy(STT / "stt_config.json", source / "config.json")
    folder = tmp_path / "folder"
    assert main(["--hf-repo", str(source), "--out", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert "note:" not in out
    assert err.splitlines() == [
        "note: no text tokenizer (stt_tokenizer.model) with the source: the folder has none "
        "(--tokenizer adds it)",
        "note: no Mimi weights (mimi.safetensors) with the source: the folder has none "
        "(--mimi-weight adds it)"]
    config = json.loads((folder / "config.json").read_text())
    assert "tokenizer_name" not in config and "mimi_name" not in config
    assert config["moshi_name"] == "model.safetensors"

    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((32, 4), dtype=np.int32))
    for argv, option in ((["--codes", str(codes)], "--tokenizer"),
                         (["--tokenizer", str(STT / "stt_tokenizer.model"),
                           str(FIXTURES / "speech.wav")], "--mimi-weight")):
        with pytest.raises(SystemExit):
            stt.main(["--hf-repo", str(folder), *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and \
            lines[0].endswith(f"pass {option}"), lines


def test_a_transformers_stt_file_keeps_its_codec_and_names_no_moshi_file(transformers_stt,
                                                                            tmp_path):
    from weights_convert import convert

    result = convert(tmp_path / "folder", hf_repo=str(transformers_stt))
    assert result.notes == ["no text tokenizer (a SentencePiece .model) with the source: the "
                            "folder has none (--tokenizer adds it)"]
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["mimi_name"] == "mimi.safetensors" and "tokenizer_name" not in config
    source_config = json.loads((transformers_stt / "config.json").read_text())
    assert config["codec_config"] == source_config["codec_config"]


def test_a_csm_folder_written_by_an_earlier_converter_loads(tmp_path):
    """Our own CSM config form says model_type csm, as transformers' does: it is read as ours."""
    from moshi_mlx.loading.models import load_csm, read_csm_config
    from moshi_mlx.models.csm import CsmConfig

    ours = read_csm_config(CSM / "sesame" / "config.json")
    assert CsmConfig.from_dict({**ours.to_dict(), "model_type": "csm"}) == ours
    folder = tmp_path / "csm"
    folder.mkdir()
    shutil.copy(CSM / "sesame" / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**ours.to_dict(), "model_type": "csm"}))
    assert load_csm(folder, dtype=mx.float32).cfg == ours
    with pytest.raises(WeightsError, match="missing depth_decoder_config"):
        CsmConfig.from_dict({"model_type": "csm"})


def test_a_csm_checkpoint_bundling_its_mimi_speaks_through_it(transformers_stt, tmp_path):
    """transformers' CSM file bundles Mimi under codec_model. (described by codec_config), as
    the STT one does: tts decodes with it when no Mimi is given, and the converter keeps it."""
    from csm_layouts import write_transformers_csm

    from moshi_mlx import tts
    from moshi_mlx.loading.models import load_mimi
    from weights_convert import convert

    source = write_transformers_csm(tmp_path / "source")
    tensors = dict(mx.load(str(source / "model.safetensors")))
    tensors.update((name, value) for name, value in
                   mx.load(str(transformers_stt / "model.safetensors")).items()
                   if name.startswith("codec_model."))
    mx.save_safetensors(str(source / "model.safetensors"), tensors)
    config = json.loads((source / "config.json").read_text())
    config["codec_config"] = json.loads((transformers_stt / "config.json").read_text())[
        "codec_config"]
    (source / "config.json").write_text(json.dumps(config))
    convert(tmp_path / "folder", hf_repo=str(source))
    assert json.loads((tmp_path / "folder" / "config.json").read_text())["mimi_name"] == \
        "mimi.safetensors"

    mimi = load_mimi(transformers_stt, num_codebooks=32)
    for weights in (source, tmp_path / "folder"):
        out, codes = tmp_path / f"{weights.name}.wav", tmp_path / f"{weights.name}.npy"
        assert tts.main(["Hello.", "--weights", str(weights), "-o", str(out), "--codes-out",
                         str(codes), "--temperature", "0", "--max-frames", "2",
                         "--no-watermark"]) == 0
        pcm, _ = soundfile.read(str(out), dtype="float32")
        assert pcm.shape == (2 * FRAME,) and np.abs(pcm).max() > 0
        expected = np.asarray(mimi.decode(mx.array(np.load(codes))[None]))[0, 0]
        np.testing.assert_allclose(pcm, expected, atol=1e-5)
