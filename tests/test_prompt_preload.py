"""Issue 19's last gaps on the front ends: a PersonaPlex saved voice as `--voice-prompt`
(FILE.pt, or a member of voices.tgz read from the archive), and the prompt's checks that need
the model (a text longer than the context leaves, a saved voice of another width, a prompt
state of another model) made from the resolved files, one line each, before the weights load.
"""

from __future__ import annotations

import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import personaplex_random
import pytest
import soundfile
from cli_run import run_main

from moshi_mlx import local, local_web, serve
from moshi_mlx.cli.prompt_args import prompt_plan
from moshi_mlx.conversation.prompts import SILENCE_FRAMES, MoshiPrompt
from moshi_mlx.models.lm_config import LmConfig

FIXTURES = Path(__file__).parent / "fixtures"
VOICE_PT = FIXTURES / "personaplex_voice.pt"
SPEECH = FIXTURES / "speech.wav"


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(FIXTURES / "personaplex_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[str, Path]:
    """NVIDIA's layout of voices.tgz (voices/NAME.pt), gzip and plain tar, with the golden's
    voice as TINY and a copy as OTHER; and a .pt that is not a voice."""
    folder = tmp_path_factory.mktemp("voices")
    archives = {"tgz": folder / "voices.tgz", "tar": folder / "voices.tar"}
    for mode, path in (("w:gz", archives["tgz"]), ("w", archives["tar"])):
        with tarfile.open(path, mode) as tar:
            tar.add(VOICE_PT, arcname="voices/TINY.pt")
            tar.add(VOICE_PT, arcname="voices/OTHER.pt")
    (folder / "notes.pt").write_text("not a torch file")
    return {**archives, "notes": folder / "notes.pt"}


def parse(argv: list[str]):
    return local.build_parser().parse_args(argv)


# ------------------------------------------------------------------ reading saved voices


@pytest.mark.parametrize("spelling", ["{pt}", "{tgz}:TINY", "{tgz}:TINY.pt",
                                      "{tgz}:voices/TINY.pt", "{tgz}/TINY.pt", "{tar}:TINY"])
def test_a_saved_voice_is_read_from_its_file_or_from_the_archive(spelling, voices, golden):
    given = spelling.format(pt=VOICE_PT, tgz=voices["tgz"], tar=voices["tar"])
    plan = prompt_plan(parse(["--voice-prompt", given, "--text-prompt", "Be brief."]))
    voice = plan.prompt.saved_voice
    assert plan.prompt.voice_pcm is None and plan.prompt.text == "Be brief."
    # What torch.load read in NVIDIA's venv (the golden tool).
    np.testing.assert_array_equal(voice.embeddings, golden["voice_embeddings"][:, 0, 0])
    np.testing.assert_array_equal(voice.cache, golden["voice_cache"][0])
    assert voice.frames == golden["voice_codes"].shape[1]
    assert voice.name == ("personaplex_voice.pt" if spelling == "{pt}" else "TINY.pt")


def test_the_archive_is_not_unpacked(voices):
    before = sorted(p.name for p in voices["tgz"].parent.iterdir())
    prompt_plan(parse(["--voice-prompt", f"{voices['tgz']}:OTHER"]))
    assert sorted(p.name for p in voices["tgz"].parent.iterdir()) == before


BAD_VOICES = [  # (the --voice-prompt value, the message)
    ("{tgz}:NOPE", "--voice-prompt {tgz}: it holds no voice 'NOPE' (voices.tgz:NAME; voices: "
                   "OTHER, TINY)"),
    ("{tgz}", "--voice-prompt {tgz}: name a voice in it (voices.tgz:NAME; voices: OTHER, TINY)"),
    ("{notes}", "--voice-prompt notes.pt is not a readable PyTorch .pt tensor file"),
    ("{missing}", "--voice-prompt {missing}: no such saved voice (.pt) file"),
    ("{notes_tgz}:TINY", "--voice-prompt {notes_tgz} is not a readable tar archive"),
]


@pytest.mark.parametrize("main", [local.main, local_web.main, serve.main])
@pytest.mark.parametrize("given, message", BAD_VOICES, ids=[g for g, _ in BAD_VOICES])
def test_a_bad_saved_voice_is_one_line_before_anything_loads(main, given, message, voices,
                                                             tmp_path, capsys, monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the model files were reached")

    monkeypatch.setattr("moshi_mlx.cli.options.resolve_model_files", loaded)
    monkeypatch.setattr("moshi_mlx.serve.resolve_models", loaded)
    (tmp_path / "notes.tgz").write_text("not an archive")
    names = {"tgz": voices["tgz"], "notes": voices["notes"], "missing": tmp_path / "gone.pt",
             "notes_tgz": tmp_path / "notes.tgz"}
    base = ["--moshi"] if main is serve.main else []
    code, out, err = run_main(main, [*base, "--voice-prompt", given.format(**names)], capsys)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [err.strip()], err
    assert err.strip().startswith("error: " + message.format(**names)), err


# ------------------------------------------------------- checks against the model's files


def model_argv(mimi: Path) -> list[str]:
    """The fixture Moshi (dim 256, context 3000, no system tags), float32."""
    return ["--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
            "--config", str(FIXTURES / "lm_config.json"),
            "--tokenizer", str(FIXTURES / "tokenizer.model"), "--mimi-weight", str(mimi),
            "--dtype", "f32"]


def state_file(path: Path, **model) -> Path:
    """A prompt state file's header (what the pre-load check reads), saved by a model whose
    identity is the fixture's float32 one with `model`'s entries replaced."""
    config = LmConfig.from_dict(json.loads((FIXTURES / "lm_config.json").read_text()))
    identity = {"config": config.to_dict(), "dtype": "mlx.core.float32", "quantization": None,
                "weights": "0123456789abcdef", **model}
    metadata = {"format": "moshi_mlx.prompt_state", "version": "1",
                "model": json.dumps(identity), "state": "{}", "prompt": "{}"}
    header = json.dumps({"__metadata__": metadata,
                         "key": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    return path


def other_config() -> dict:
    config = LmConfig.from_dict(json.loads((FIXTURES / "lm_config.json").read_text()))
    return config.with_overrides(context=100).to_dict()


def token_count(text: str) -> int:
    """The fixture tokenizer's ids for `text`, through SentencePiece itself."""
    import sentencepiece

    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(FIXTURES / "tokenizer.model"))
    return len(tokenizer.encode(text))


LONG_TEXT = " ".join(["the"] * 2989)  # one token more than the fixture's context leaves
PRELOAD_REFUSALS = [  # (argv after the model's, the one line)
    (["--text-prompt", LONG_TEXT],
     f"the text prompt is {token_count(LONG_TEXT)} tokens; the model's context (3000 frames) "
     f"leaves {3000 - 2 * SILENCE_FRAMES}"),
    (["--text-prompt", LONG_TEXT, "--voice-prompt", str(SPEECH)],
     "beside "),
    (["--voice-prompt", str(VOICE_PT)],
     "--voice-prompt personaplex_voice.pt was saved for a model of dim 64; this model's dim is "
     "256"),
    (["--prompt-state", "{bf16}"], "--prompt-state bf16.safetensors was saved with another "
                                   "compute dtype (mlx.core.bfloat16 there, mlx.core.float32 "
                                   "here)"),
    (["--prompt-state", "{q4}"], "--prompt-state q4.safetensors was saved with another "
                                 "quantization ({'bits': 4, 'group_size': 32} there, None "
                                 "here)"),
    (["--prompt-state", "{short}"], "--prompt-state short.safetensors was saved with a model of "
                                    "another shape (config context differ)"),
]


@pytest.fixture
def states(tmp_path) -> dict[str, Path]:
    return {"bf16": state_file(tmp_path / "bf16.safetensors", dtype="mlx.core.bfloat16"),
            "q4": state_file(tmp_path / "q4.safetensors",
                             quantization={"bits": 4, "group_size": 32}),
            "short": state_file(tmp_path / "short.safetensors", config=other_config())}


@pytest.fixture
def no_weights_load(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("moshi_mlx.conversation.engine.Engine.from_files", loaded)


def serve_with_local_files(monkeypatch, mimi: Path) -> None:
    """`serve --moshi` given the fixture's files (a folder would name the same ones)."""
    from moshi_mlx.cli.options import resolve_model_files

    files = resolve_model_files(parse(model_argv(mimi)))
    monkeypatch.setattr("moshi_mlx.serve.resolve_models", lambda args: {"moshi": files})


@pytest.mark.parametrize("front_end", ["local-file", "local_web", "serve"])
@pytest.mark.parametrize("argv, message", PRELOAD_REFUSALS,
                         ids=[m[:40] for _, m in PRELOAD_REFUSALS])
def test_prompt_checks_that_need_the_model_come_before_its_weights_load(
        front_end, argv, message, states, random_mimi_path, tmp_path, capsys, monkeypatch,
        no_weights_load):
    given = [word.format(**states) for word in argv]
    if front_end == "local-file":
        full = [*model_argv(random_mimi_path), *given, "--input-file", str(SPEECH),
                "--output-file", str(tmp_path / "o.wav")]
        main = local.main
    elif front_end == "local_web":
        full, main = [*model_argv(random_mimi_path), *given, "--port", "0"], local_web.main
    else:
        serve_with_local_files(monkeypatch, random_mimi_path)
        full, main = ["--moshi", "--port", "0", "--dtype", "f32", *given], serve.main
    code, out, err = run_main(main, full, capsys)
    lines = [line for line in err.strip().splitlines() if not line.startswith("loading")]
    assert code == 1 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err


def test_the_voice_counts_against_the_context_before_the_load(random_mimi_path, capsys,
                                                              no_weights_load, tmp_path):
    # 3000 - 12 tokens fit alone, not beside the 25 frames of a 2 s voice.
    text = " ".join(["the"] * (3000 - 2 * SILENCE_FRAMES))
    assert token_count(text) == 3000 - 2 * SILENCE_FRAMES
    voice = tmp_path / "voice.wav"
    pcm, rate = soundfile.read(SPEECH, dtype="float32")
    soundfile.write(voice, pcm[:2 * rate], rate)
    argv = [*model_argv(random_mimi_path), "--text-prompt", text, "--input-file", str(SPEECH),
            "--output-file", str(tmp_path / "o.wav")]
    with pytest.raises(AssertionError, match="the weights were loaded"):
        local.main(argv)  # alone it fits: the load is reached
    code, _, err = run_main(local.main, [*argv, "--voice-prompt", str(voice)], capsys)
    assert code == 1
    assert err.strip().endswith("leaves 2963 beside 25 frames of voice"), err


@pytest.mark.parametrize("bits", [None, 4])
def test_the_planned_identity_is_the_loaded_models(bits, random_mimi_path, tmp_path):
    # What the pre-load check compares is what the engine saves and accepts after the load:
    # a state this model saved passes it.
    from moshi_mlx.cli.options import build_engine
    from moshi_mlx.cli.prompt_args import PromptPlan, check_before_load
    from moshi_mlx.conversation.prompt_state import model_identity, planned_identity
    from moshi_mlx.loading.checkpoint import loaded_quantization
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.loading.quantization import resolve_dtype

    args = parse([*model_argv(random_mimi_path), *([] if bits is None else ["-q", str(bits)])])
    seen = []
    engine = build_engine(args, before_load=seen.append)
    (files,) = seen
    options = ModelOptions.from_args(args)
    planned = planned_identity(files.checkpoint.config, resolve_dtype(options.dtype),
                               loaded_quantization(files.checkpoint, options.quantize))
    loaded = model_identity(engine.lm_gen.lm)
    assert planned == {k: v for k, v in loaded.items() if k != "weights"}
    assert (planned["quantization"] is None) == (bits is None)
    engine.set_prompt(MoshiPrompt(text="Talk about boats."))
    engine.save_prompt_state(tmp_path / "boats.safetensors")
    check_before_load(PromptPlan(state=tmp_path / "boats.safetensors"), files, options)


# ------------------------------------------------------------------ end to end, PersonaPlex


def test_e2e_local_with_a_voice_from_the_archive_is_the_librarys_conversation(
        voices, golden, random_mimi_path, tmp_path, capsys):
    # The tiny PersonaPlex model: `local --voice-prompt voices.tgz:TINY --text-prompt ...`
    # gives the conversation of Engine.set_prompt with that saved voice (which equals NVIDIA's:
    # test_personaplex), and a saved state of it resumes it.
    from moshi_mlx.audio.fileloop import run_file
    from moshi_mlx.conversation.engine import Engine, EngineOptions
    from moshi_mlx.conversation.prompts import SavedVoice
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.loading.torch_pickle import read_personaplex_voice
    from moshi_mlx.modules.sampling import SamplingSettings

    weights, config = tmp_path / "personaplex.safetensors", tmp_path / "config.json"
    assert personaplex_random.write(weights) == str(golden["weights_sha256"])
    config.write_text(json.dumps({**personaplex_random.CONFIG, "system_prompt_tags": True}))
    user = tmp_path / "user.wav"
    pcm, rate = soundfile.read(SPEECH, dtype="float32")
    soundfile.write(user, pcm[rate: 2 * rate], rate, subtype="FLOAT")
    argv = ["--moshi-weight", str(weights), "--config", str(config), "--tokenizer",
            str(FIXTURES / "tokenizer.model"), "--mimi-weight", str(random_mimi_path),
            "--dtype", "f32", "--text-temp", "0", "--audio-temp", "0", "--seed", "7",
            "--input-file", str(user)]
    text = str(golden["prompt_text"])
    state = tmp_path / "tiny.safetensors"
    code, _, err = run_main(local.main, [
        *argv, "--voice-prompt", f"{voices['tgz']}:TINY", "--text-prompt", text,
        "--save-prompt-state", str(state), "--output-file", str(tmp_path / "cli.wav")], capsys)
    assert code == 0, err
    assert "prompt phases ran (saved voice TINY.pt, 5 frames, text" in err
    code, _, err = run_main(local.main, [*argv, "--prompt-state", str(state), "--output-file",
                                         str(tmp_path / "resumed.wav")], capsys)
    assert code == 0, err

    engine = Engine.from_files(weights, random_mimi_path, FIXTURES / "tokenizer.model",
                               config=config, options=EngineOptions(
                                   ModelOptions(dtype="f32", seed=7),
                                   SamplingSettings(0.0, 25, 0.0, 250)))
    engine.set_prompt(MoshiPrompt(text=text,
                                  saved_voice=SavedVoice(*read_personaplex_voice(VOICE_PT))))
    engine.reset()
    run_file(engine, user, tmp_path / "library.wav")
    wanted = soundfile.read(tmp_path / "library.wav")[0]
    np.testing.assert_array_equal(soundfile.read(tmp_path / "cli.wav")[0], wanted)
    np.testing.assert_array_equal(soundfile.read(tmp_path / "resumed.wav")[0], wanted)
