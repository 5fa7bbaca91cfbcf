"""PersonaPlex (Moshi with dep_q 16) against NVIDIA's own generator: the golden
tests/fixtures/personaplex_golden.npz (tools/derive_personaplex_golden.py) on the tiny random
model of tests/personaplex_random.py, float32, greedy, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import personaplex_random
import pytest

from moshi_mlx import WeightsError, load_lm
from moshi_mlx.conversation.lm_gen import LmGen
from moshi_mlx.models.lm_config import LmConfig

INITIAL = 2048


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict:
    with np.load(fixtures_dir / "personaplex_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def personaplex_file(tmp_path_factory, golden) -> Path:
    path = tmp_path_factory.mktemp("personaplex") / "model.safetensors"
    assert personaplex_random.write(path) == str(golden["weights_sha256"])
    return path


def personaplex_config() -> dict:
    """The tiny model's config.json as our converter writes it for PersonaPlex."""
    return {**personaplex_random.CONFIG, "system_prompt_tags": True}


def run_greedy(lm, user_codes: np.ndarray) -> dict[str, list]:
    return run_greedy_from(LmGen(lm, text_temp=0.0, audio_temp=0.0), user_codes)


def run_greedy_from(gen: LmGen, user_codes: np.ndarray) -> dict[str, list]:
    texts, raws, frames = [], [], []
    for codes in user_codes:
        text, frame = gen.step(mx.array(codes[None]))
        texts.append(int(text[0]))
        raws.append(np.array(gen.state.last_audio_tokens[0]))
        frames.append(None if frame is None else np.array(frame[0]))
    return {"text": texts, "raw": raws, "frames": frames}


def expected_user_frame(golden: dict, step: int, prefix: str = "") -> np.ndarray:
    """NVIDIA's user-slice tokens as our step `step` returns them: the prediction of the user
    frame given at step - D, codebook j from their call step - D + d_j (call c + 1 = our step
    c), the initial token before their first forward."""
    user_delays = golden["delays"][9:]
    largest = int(user_delays.max())
    row = []
    for j, d in enumerate(user_delays):
        call = step - largest + int(d)
        row.append(golden[f"{prefix}audio"][call, 8 + j] if call >= 1 else INITIAL)
    return np.array(row)


def assert_matches_nvidia(result: dict, golden: dict, prefix: str = "") -> None:
    """Our steps against their calls (their call c + 1 = our step c); `prefix`: the golden's
    run ("" on the bf16 file, "q4_" / "q8_" on our converter's folders)."""
    steps = len(result["text"])
    text, audio, out = (golden[prefix + key] for key in ("text", "audio", "out"))
    np.testing.assert_array_equal(result["text"], text[1 : steps + 1])
    np.testing.assert_array_equal(np.stack(result["raw"]), audio[1 : steps + 1, :8])
    assert result["frames"][0] is None
    for step in range(1, steps):
        frame = result["frames"][step]
        assert frame.shape == (16,)
        np.testing.assert_array_equal(frame[:8], out[step + 1, 1:9],
                                      err_msg=f"Moshi's frame at step {step}")
        np.testing.assert_array_equal(frame[8:], expected_user_frame(golden, step, prefix),
                                      err_msg=f"predicted user frame at step {step}")


@pytest.mark.parametrize("config", ["personaplex", "plain"])
def test_float32_greedy_matches_nvidia(personaplex_file, golden, config):
    # "plain": a Moshi config (dep_q 8) meets the 16-slice file: the tensors decide.
    given = (personaplex_config() if config == "personaplex"
             else personaplex_random.plain_moshi_config())
    lm = load_lm(personaplex_file, config=given, dtype=mx.float32)
    assert lm.cfg.dep_q == 16 and lm.cfg.system_prompt_tags and lm.cfg.predicts_user
    assert json.loads(str(golden["config"]))["dep_q"] == 16
    user_codes = golden["user_codes"][:-1]  # their call c's frame is our step c's
    assert_matches_nvidia(run_greedy(lm, user_codes), golden)


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_quantized_folder_matches_nvidia_on_its_dequantized_weights(
        personaplex_file, golden, tmp_path, bits):
    # weights_convert, given the file with a plain Moshi config.json (as the golden tool did),
    # writes a folder whose config.json says PersonaPlex; its float32 run (quantized layers,
    # float32 scales) equals NVIDIA's run on the dequantized weights.
    from weights_convert import convert

    config = tmp_path / "config.json"
    config.write_text(json.dumps(personaplex_random.plain_moshi_config()))
    result = convert(tmp_path / f"q{bits}", input_path=personaplex_file, config=config,
                     bits=bits)
    assert personaplex_random.sha256(result.model_file) == str(golden[f"q{bits}_sha256"])
    written = json.loads((tmp_path / f"q{bits}" / "config.json").read_text())
    assert (written["dep_q"], written["system_prompt_tags"]) == (16, True)
    lm = load_lm(tmp_path / f"q{bits}", dtype=mx.float32)
    assert lm.cfg.predicts_user
    assert_matches_nvidia(run_greedy(lm, golden["user_codes"][:-1]), golden, f"q{bits}_")


def test_user_stream_is_input_not_feedback(personaplex_file, golden):
    # Same given user frames -> same text and Moshi audio whether or not the model's user
    # predictions were different: changing a later user frame changes nothing before it.
    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    codes = golden["user_codes"][:-1].copy()
    first = run_greedy(lm, codes)
    codes[8:] = (codes[8:] + 1) % 2048
    second = run_greedy(lm, codes)
    assert first["text"][:8] == second["text"][:8]
    assert first["text"] != second["text"]


def test_plain_moshi_file_is_refused_as_personaplex(fixtures_dir):
    config = {**json.loads((fixtures_dir / "lm_config.json").read_text())}
    config = LmConfig.from_dict(config).as_personaplex()
    with pytest.raises(WeightsError) as caught:
        load_lm(fixtures_dir / "lm_pytorch.safetensors", config=config)
    message = str(caught.value)
    assert "\n" not in message
    assert "depformer_emb.7 missing" in message and "not a PersonaPlex" in message


def test_personaplex_config():
    config = LmConfig.personaplex_7b()
    assert (config.dep_q, config.n_q, config.own_audio_q, config.user_audio_q) == (16, 16, 8, 8)
    assert config.depformer_context == 15 and config.system_prompt_tags
    assert LmConfig.from_dict(config.to_dict()) == config
    assert "system_prompt_tags" not in LmConfig.moshi_7b().to_dict()
    plain = LmConfig.moshi_7b()
    assert (plain.own_audio_q, plain.user_audio_q, plain.predicts_user) == (8, 8, False)


def test_released_repo_line():
    from moshi_mlx.loading.families import config_ignored, files_of

    spec = files_of("moshi")
    assert spec.default_repo("personaplex") == "nvidia/personaplex-7b-v1"
    assert spec.default_repo("personaplex", 4) == "nvidia/personaplex-7b-v1"
    assert config_ignored("nvidia/personaplex-7b-v1")
    assert not config_ignored("kyutai/moshiko-mlx-q4")


@pytest.mark.parametrize(("argv", "weights"), [
    (["--voice", "personaplex"], "model.safetensors"),
    (["--voice", "personaplex", "-q", "4"], "model.safetensors"),  # quantized while loading
    (["--hf-repo", "nvidia/personaplex-7b-v1"], "model.safetensors"),
])
def test_personaplex_repo_resolves_without_its_config(monkeypatch, tmp_path, argv, weights):
    import argparse
    from types import SimpleNamespace

    import moshi_mlx.loading.hub
    from moshi_mlx.cli.options import add_model_args, resolve_model_files

    repo = "nvidia/personaplex-7b-v1"
    fetched: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str) -> Path:
        assert filename != "config.json", "PersonaPlex's config.json is not ours to read"
        fetched.append((repo_id, filename))
        if filename != weights and filename.startswith("model"):
            raise WeightsError("not there")
        path = tmp_path / filename
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", fake_download)
    seen: list = []
    monkeypatch.setattr("moshi_mlx.loading.checkpoint.inspect_checkpoint",
                        lambda path, config, model_types: seen.append(config) or SimpleNamespace(
                            model_type="moshi", files=SimpleNamespace(owner={})))
    monkeypatch.setattr("moshi_mlx.loading.checkpoint.check_requested_bits",
                        lambda checkpoint, bits: None)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    files = resolve_model_files(parser.parse_args(argv))
    assert (repo, weights) in fetched
    assert (repo, "tokenizer_spm_32k_3.model") in fetched
    assert (repo, "tokenizer-e351c8d8-checkpoint125.safetensors") in fetched
    assert files.config is None and seen == [None]  # the config comes from the tensors


def test_config_beside_a_cached_personaplex_file_is_not_read(tmp_path):
    # huggingface_hub keeps a repo's files side by side; PersonaPlex's config.json (which its
    # own loader never reads) must not describe the weights.
    from moshi_mlx.loading.config import config_beside

    for repo, read in (("nvidia--personaplex-7b-v1", False), ("kyutai--moshiko-mlx-q4", True)):
        snapshot = tmp_path / f"models--{repo}" / "snapshots" / "0123"
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text('{"not": "ours"}')
        weights = snapshot / "model.safetensors"
        assert config_beside(weights) == (snapshot / "config.json" if read else None)


# --------------------------------------------------------------------------- saved voices

SINE = np.array([430, 1268, 381, 1611, 1095, 1495, 56, 472], dtype=np.int32)  # NVIDIA's
PAD = 3


def test_torch_file_reader_reads_what_torch_wrote(fixtures_dir, golden):
    from moshi_mlx.loading.torch_pickle import read_personaplex_voice, read_torch_file

    embeddings, cache = read_personaplex_voice(fixtures_dir / "personaplex_voice.pt")
    assert embeddings.dtype == np.float32 and cache.dtype == np.int64
    np.testing.assert_array_equal(embeddings, golden["voice_embeddings"][:, 0, 0])
    np.testing.assert_array_equal(cache, golden["voice_cache"][0])
    odd = read_torch_file(fixtures_dir / "torch_tensors.pt")
    assert odd["number"] == 7
    for key in ("bf16", "half", "view"):
        assert odd[key].dtype == golden[f"odd_{key}"].dtype, key
        np.testing.assert_array_equal(odd[key], golden[f"odd_{key}"], err_msg=key)
    np.testing.assert_array_equal(odd["list"][0], golden["odd_list"])


def test_torch_file_reader_refuses_code(tmp_path):
    import pickle
    import zipfile

    from moshi_mlx.loading.torch_pickle import read_torch_file

    class Boom:
        def __reduce__(self):
            return (print, ("never printed",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": Boom()}))
    with pytest.raises(WeightsError, match="builtins.print is not part of a plain tensor"):
        read_torch_file(path)
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match="not a readable PyTorch"):
        read_torch_file(tmp_path / "plain.pt")


def voice_phase(gen: LmGen, voice: np.ndarray, embeddings: np.ndarray | None) -> list:
    """Our steps of NVIDIA's voice phase (text PAD, Moshi's stream = the voice, user = SINE),
    forced in the delayed layout (step t forces codebook 0 of voice frame t + 1, the others
    of frame t); with `embeddings`, each step reads the saved embedding instead of embedding
    its tokens. Returns each step's text logits."""
    logits = []
    for t in range(voice.shape[1] - 1):
        forced = np.concatenate([voice[:1, t + 1], voice[1:, t]])[None]
        embedded = None if embeddings is None else mx.array(embeddings[t][None])
        gen.step(mx.array(SINE[None]), force_text=mx.array([PAD]), force_audio=mx.array(forced),
                 embedded=embedded)
        logits.append(np.array(gen.state.text_logits[0]))
    return logits


def voice_column(voice: np.ndarray, t: int) -> np.ndarray:
    """[1, 17] tokens NVIDIA's voice phase forwards at column t (their delays: codebooks 1..7
    of both streams one frame late; column 0, and the late codebooks of column 1, initial)."""
    if t == 0:
        return np.array([[personaplex_random.CONFIG["text_card"]] + [INITIAL] * 16])
    late = (lambda frame: frame[1:]) if t >= 2 else (lambda frame: [INITIAL] * 7)
    moshi = [voice[0, t], *late(voice[:, t - 1])]
    user = [SINE[0], *late(SINE)]
    return np.array([[PAD, *moshi, *user]])


def test_saved_voice_embeddings_replay_the_voice_phase(personaplex_file, golden):
    # The .pt's embeddings are the summed input embeddings of our steps through the voice
    # phase (NVIDIA's forward t + 1 = our step t), and stepping from them gives the state of
    # stepping through the tokens.
    from moshi_mlx.loading.torch_pickle import read_personaplex_voice

    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    embeddings, _ = read_personaplex_voice(Path(__file__).parent / "fixtures"
                                           / "personaplex_voice.pt")
    voice = golden["voice_codes"]
    for t, saved in enumerate(embeddings):
        np.testing.assert_allclose(np.array(lm.embed(mx.array(voice_column(voice, t)))[0]),
                                   saved, atol=1e-5, rtol=0, err_msg=f"column {t}")
    by_tokens = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    token_logits = voice_phase(by_tokens, voice, None)
    replay = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    replay_logits = voice_phase(replay, voice, embeddings)
    for t, (a, b) in enumerate(zip(token_logits, replay_logits, strict=True)):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0, err_msg=f"step {t}")
    assert replay.state.steps == by_tokens.state.steps == len(embeddings)


# --------------------------------------------------------------------------- prompt phases

SILENCE = np.array([948, 243, 1178, 546, 1736, 1030, 1978, 2008], dtype=np.int32)  # NVIDIA's
SILENCE_FRAMES = 6


def assert_prompted_conversation(gen: LmGen, golden: dict, prompt_texts: list[int],
                                 prompt_frames: int) -> None:
    """After `prompt_frames` prompt steps (their text tokens `prompt_texts`), greedy steps on
    the golden's user codes give NVIDIA's prompted run: text throughout, then Moshi's tokens,
    frames and user-frame predictions of every conversation step."""
    conversation = run_greedy_from(gen, golden["user_codes"][:-1])
    texts = prompt_texts + conversation["text"]
    np.testing.assert_array_equal(texts, golden["prompted_text"][1: len(texts) + 1])
    for i, step in enumerate(range(prompt_frames, len(texts))):
        np.testing.assert_array_equal(conversation["raw"][i],
                                      golden["prompted_audio"][step + 1, :8],
                                      err_msg=f"Moshi's tokens at step {step}")
        np.testing.assert_array_equal(conversation["frames"][i][:8],
                                      golden["prompted_out"][step + 1, 1:9],
                                      err_msg=f"Moshi's frame at step {step}")
        np.testing.assert_array_equal(conversation["frames"][i][8:],
                                      expected_user_frame(golden, step, "prompted_"),
                                      err_msg=f"predicted user frame at step {step}")


def test_text_prompt_forced_through_lm_gen_matches_nvidia(personaplex_file, golden):
    # NVIDIA's text-prompt phases (6 silence frames, the prompt, 6 silence frames: text, Moshi
    # = SILENCE, user = SINE) forced through our LmGen, then the conversation. Their frame f
    # feeds position f (codebook 0) and f + 1 (the others); our step s forces position s + 1.
    # The last prompt step forces only the late codebooks (-1: sampled), as theirs provides.
    tokens = golden["prompt_tokens"]
    prompt_frames = int(golden["prompted_calls"])
    assert prompt_frames == 2 * SILENCE_FRAMES + len(tokens)
    text = np.full(prompt_frames, PAD)
    text[SILENCE_FRAMES : SILENCE_FRAMES + len(tokens)] = tokens
    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    texts = []
    for s in range(prompt_frames):
        inside = s + 1 < prompt_frames
        force_text = int(text[s + 1]) if inside else -1
        force_audio = np.concatenate([[SILENCE[0] if inside else -1], SILENCE[1:]])
        out_text, _ = gen.step(mx.array(SINE[None]), force_text=mx.array([force_text]),
                               force_audio=mx.array(force_audio[None]))
        texts.append(int(out_text[0]))
    assert_prompted_conversation(gen, golden, texts, prompt_frames)


def test_engine_decodes_moshi_frames_of_personaplex(personaplex_file, golden, fixtures_dir):
    # The engine speaks the first 8 codebooks of the 16-wide frame: Moshi's, as NVIDIA's.
    import sentencepiece

    from moshi_mlx.conversation.engine import Engine

    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    codec = ScriptedCodec(golden["user_codes"][:-1])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(fixtures_dir / "tokenizer.model"))
    engine = Engine(codec, LmGen(lm, text_temp=0.0, audio_temp=0.0), sp)
    engine.warm_up()
    steps = len(golden["user_codes"]) - 1
    for _ in range(steps):
        engine.process(np.zeros(1920, dtype=np.float32))
    np.testing.assert_array_equal(np.stack(codec.decoded), golden["out"][2 : steps + 1, 1:9])


def test_saved_voice_then_text_prompt_matches_nvidia(personaplex_file, golden, fixtures_dir):
    # NVIDIA's replay of a saved voice (then its silence, text prompt, silence, conversation):
    # our steps from the .pt's embeddings, the last tokens taken from its cache.
    from moshi_mlx.loading.torch_pickle import read_personaplex_voice

    embeddings, cache = read_personaplex_voice(fixtures_dir / "personaplex_voice.pt")
    frames = len(embeddings) + 1
    columns = cache.shape[1]
    tokens = golden["prompt_tokens"]
    prompt_frames = 2 * SILENCE_FRAMES + len(tokens)
    assert int(golden["voiced_calls"]) == frames + prompt_frames
    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    texts = []
    for saved in embeddings:
        out_text, _ = gen.step(mx.array(SINE[None]), force_text=mx.array([PAD]),
                               force_audio=mx.array(np.full((1, 8), INITIAL)),
                               embedded=mx.array(saved[None]))
        texts.append(int(out_text[0]))
    gen.set_last_tokens(cache[0:1, (frames - 1) % columns],
                        cache[1:9, (frames - 1) % columns][None])
    late = cache[2:9, frames % columns]  # the voice's last frame, codebooks 1..7
    text = np.full(prompt_frames, PAD)
    text[SILENCE_FRAMES : SILENCE_FRAMES + len(tokens)] = tokens
    # Our step frames - 1 + s targets prompt frame s (NVIDIA's position frames + s): its
    # codebook 0 and text, and codebooks 1..7 of the frame before (the voice's last for s = 0);
    # the step after the prompt forces only those late codebooks.
    for s in range(prompt_frames + 1):
        inside = s < prompt_frames
        previous = late if s == 0 else SILENCE[1:]
        force_audio = np.concatenate([[SILENCE[0] if inside else -1], previous])
        force_text = int(text[s]) if inside else -1
        out_text, _ = gen.step(mx.array(SINE[None]), force_text=mx.array([force_text]),
                               force_audio=mx.array(force_audio[None]))
        texts.append(int(out_text[0]))
    conversation = run_greedy_from(gen, golden["user_codes"][:-1])
    texts += conversation["text"]
    np.testing.assert_array_equal(texts, golden["voiced_text"][1 : len(texts) + 1])
    start = frames + prompt_frames
    for index, frame in enumerate(conversation["frames"]):
        step = start + index
        np.testing.assert_array_equal(frame[:8], golden["voiced_out"][step + 1, 1:9],
                                      err_msg=f"Moshi's frame at step {step}")
        np.testing.assert_array_equal(frame[8:], expected_user_frame(golden, step, "voiced_"),
                                      err_msg=f"predicted user frame at step {step}")


def test_library_prompt_phases_on_personaplex_match_nvidia(personaplex_file, golden):
    # The conversation engine's own phases (conversation.prompts: phase_frames + run_phases,
    # what Engine.set_prompt runs) on the dep_q 16 model give NVIDIA's prompted conversation.
    from moshi_mlx.conversation.prompts import phase_frames, run_phases

    frames_in = phase_frames(golden["prompt_tokens"].tolist(), None)
    assert frames_in.count == int(golden["prompted_calls"])
    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    texts: list[int] = []
    run_phases(gen, frames_in, observe=lambda t: texts.append(int(gen.state.text[0])))
    assert_prompted_conversation(gen, golden, texts, frames_in.count)


# ------------------------------------------------------------ saved voices as voice prompts


class ScriptedCodec:
    """The engine's codec with fixed user codes (one row per encoded frame, from a reset);
    records the Moshi frames it is asked to decode."""

    def __init__(self, codes: np.ndarray) -> None:
        self.codes = codes
        self.reset()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        self.t += 1
        return self.codes[self.t - 1]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self.decoded.append(np.array(codes))
        return np.zeros(1920, dtype=np.float32)

    def reset(self) -> None:
        self.t = 0
        self.decoded: list[np.ndarray] = []


def saved_voice_engine(personaplex_file: Path, golden: dict, fixtures_dir: Path):
    import sentencepiece

    from moshi_mlx.conversation.engine import Engine

    lm = load_lm(personaplex_file, config=personaplex_config(), dtype=mx.float32)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(fixtures_dir / "tokenizer.model"))
    return Engine(ScriptedCodec(golden["user_codes"][:-1]),
                  LmGen(lm, text_temp=0.0, audio_temp=0.0), sp)


def saved_voice(fixtures_dir: Path):
    from moshi_mlx.conversation.prompts import SavedVoice
    from moshi_mlx.loading.torch_pickle import read_personaplex_voice

    return SavedVoice(*read_personaplex_voice(fixtures_dir / "personaplex_voice.pt"))


def engine_conversation(engine) -> tuple[list[int], list[np.ndarray]]:
    """The conversation from `engine.reset()` on the golden's user codes: text tokens and the
    Moshi frames decoded."""
    engine.reset()
    texts = []
    for _ in range(len(engine.codec.codes)):
        engine.process(np.zeros(1920, dtype=np.float32))
        texts.append(int(engine.lm_gen.state.text[0]))
    return texts, list(engine.codec.decoded)


def test_engine_saved_voice_and_text_prompt_match_nvidia(personaplex_file, golden, fixtures_dir):
    # NVIDIA's run: the .pt voice replayed, 6 silence frames, the text prompt (in system tags),
    # 6 silence frames, then the conversation on the golden's user codes.
    from moshi_mlx.conversation.prompts import MoshiPrompt

    engine = saved_voice_engine(personaplex_file, golden, fixtures_dir)
    engine.set_prompt(MoshiPrompt(text=str(golden["prompt_text"]),
                                  saved_voice=saved_voice(fixtures_dir)))
    start = int(golden["voiced_calls"])  # the prompt's steps: the voice's 5 frames, 6 + 25 + 6
    assert engine.lm_gen.state.steps == start == 5 + 2 * SILENCE_FRAMES + 25
    assert engine.prompt_description["phases"] == [["voice", 5], ["silence", 6], ["text", 25],
                                                   ["silence", 6]]
    texts, decoded = engine_conversation(engine)
    steps = len(texts)
    np.testing.assert_array_equal(texts, golden["voiced_text"][start + 1: start + steps + 1])
    assert len(decoded) == steps
    np.testing.assert_array_equal(np.stack(decoded),
                                  golden["voiced_out"][start + 1: start + steps + 1, 1:9])
    # The text prompt alone is NVIDIA's other run: the voice told.
    engine.set_prompt(MoshiPrompt(text=str(golden["prompt_text"])))
    plain, _ = engine_conversation(engine)
    start = int(golden["prompted_calls"])
    np.testing.assert_array_equal(plain, golden["prompted_text"][start + 1: start + steps + 1])
    assert plain != texts


def test_engine_saved_voice_alone_and_its_prompt_state(personaplex_file, golden, fixtures_dir,
                                                        tmp_path):
    # A saved voice without text, saved as a prompt state and resumed: the same conversation.
    from moshi_mlx.conversation.prompts import MoshiPrompt

    engine = saved_voice_engine(personaplex_file, golden, fixtures_dir)
    engine.set_prompt(MoshiPrompt(saved_voice=saved_voice(fixtures_dir)))
    assert engine.lm_gen.state.steps == 5 + 2 * SILENCE_FRAMES
    first = engine_conversation(engine)
    engine.save_prompt_state(tmp_path / "voice.safetensors")
    restored = saved_voice_engine(personaplex_file, golden, fixtures_dir)
    restored.load_prompt_state(tmp_path / "voice.safetensors")
    again = engine_conversation(restored)
    assert again[0] == first[0]
    np.testing.assert_array_equal(np.stack(again[1]), np.stack(first[1]))
    assert restored.prompt_description["voice_frames"] == 5


def test_saved_voice_of_another_model_is_one_line(personaplex_file, golden, fixtures_dir):
    from moshi_mlx.conversation.prompts import MoshiPrompt, SavedVoice
    from moshi_mlx.errors import PromptError

    engine = saved_voice_engine(personaplex_file, golden, fixtures_dir)
    voice = saved_voice(fixtures_dir)
    wide = SavedVoice(np.zeros((4, 128), np.float32), voice.cache, "NATF0.pt")
    with pytest.raises(PromptError) as caught:
        engine.set_prompt(MoshiPrompt(saved_voice=wide))
    assert str(caught.value) == ("NATF0.pt was saved for a model of dim 128; this model's dim "
                                 "is 64")
    assert engine.prompt_description is None and engine.lm_gen.state.steps == 0
    with pytest.raises(PromptError, match="token cache must be integers"):
        engine.set_prompt(MoshiPrompt(saved_voice=SavedVoice(voice.embeddings, voice.cache[:9])))
    with pytest.raises(PromptError, match="one voice prompt"):
        engine.set_prompt(MoshiPrompt(saved_voice=voice, voice_codes=golden["voice_codes"]))


def test_saved_voice_tokens_outside_the_vocabularies_are_one_line(personaplex_file, golden,
                                                                 fixtures_dir):
    # Only the tokens the phases read count: the position after the replay (text and Moshi's
    # 8) and the last frame's late codebooks; NVIDIA's ring may hold unwritten marks elsewhere.
    from moshi_mlx.conversation.prompts import MoshiPrompt, SavedVoice
    from moshi_mlx.errors import PromptError

    engine = saved_voice_engine(personaplex_file, golden, fixtures_dir)
    voice = saved_voice(fixtures_dir)
    columns = voice.cache.shape[1]
    unread = voice.cache.copy()
    unread[:, (voice.frames - 2) % columns] = -2  # a position the phases never read
    engine.set_prompt(MoshiPrompt(saved_voice=SavedVoice(voice.embeddings, unread)))
    for row, position in ((0, voice.frames - 1), (3, voice.frames)):
        bad = voice.cache.copy()
        bad[row, position % columns] = 5000
        with pytest.raises(PromptError, match="outside this model's vocabularies"):
            engine.set_prompt(MoshiPrompt(saved_voice=SavedVoice(voice.embeddings, bad)))
