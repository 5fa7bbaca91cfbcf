"""Issue 19's prompt phases, prompted generation and prompt states, against two references
(tests/fixtures/moshi_prompt_golden.npz, tools/derive_moshi_prompt_golden.py; float32, greedy,
on the tiny Moshi fixture):

- transformers' `MoshiForConditionalGeneration.generate(input_ids, moshi_audio_codes,
  user_audio_codes)`: `generate_prompted` returns the same text ids and audio codes;
- NVIDIA PersonaPlex's `LMGen.step_system_prompts` (voice + text prompt) and conversation
  steps: the same predictions at every step of every phase and the same conversation;
- pyloudnorm's integrated loudness: `audio.loudness` gives the same numbers.
"""

from __future__ import annotations

import hashlib
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.audio.loudness import integrated_loudness, normalize_loudness
from moshi_mlx.conversation.engine import Engine
from moshi_mlx.conversation.lm_gen import LmGen
from moshi_mlx.conversation.prompted import generate_prompted
from moshi_mlx.conversation.prompts import (
    SILENCE_FRAMES,
    SINE_TOKENS,
    MoshiPrompt,
    phase_frames,
    prompt_text_tokens,
    run_phases,
    voice_frames,
    wrap_with_system_tags,
)
from moshi_mlx.errors import PromptError
from moshi_mlx.loading.models import load_lm
from moshi_mlx.loading.text_tokenizer import load_sentencepiece


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "moshi_prompt_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def lm(fixtures_dir: Path):
    return load_lm(fixtures_dir / "lm_pytorch.safetensors",
                   config=fixtures_dir / "lm_config.json", dtype=mx.float32)


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir: Path):
    return load_sentencepiece(fixtures_dir / "tokenizer.model")


def speech(fixtures_dir: Path) -> np.ndarray:
    with wave.open(str(fixtures_dir / "speech.wav")) as f:
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def loudness_signals(fixtures_dir: Path) -> dict[str, np.ndarray]:
    """The signals of the golden's `loudness_*` (as the tool makes them)."""
    pcm = speech(fixtures_dir)
    rng = np.random.default_rng(1770)
    return {
        "speech": pcm,
        "voice": pcm[:48000],
        "noise": (rng.standard_normal(36000) * 0.1).astype(np.float32),
        "sine": (0.3 * np.sin(2 * np.pi * 440 * np.arange(30000) / 24000)).astype(np.float32),
    }


# ------------------------------------------------------------------ loudness, system tags


def test_integrated_loudness_matches_pyloudnorm(golden, fixtures_dir):
    for name, signal in loudness_signals(fixtures_dir).items():
        assert integrated_loudness(signal, 24000) == pytest.approx(
            float(golden[f"loudness_{name}"]), abs=1e-6), name


def test_normalized_voice_measures_the_target(fixtures_dir):
    voice = loudness_signals(fixtures_dir)["voice"]
    normalized = normalize_loudness(voice, 24000, -24.0)
    assert integrated_loudness(normalized, 24000) == pytest.approx(-24.0, abs=1e-3)
    # one gain, no limiter: the waveform's shape is kept
    ratio = normalized[voice != 0] / voice[voice != 0]
    assert np.allclose(ratio, ratio[0], rtol=1e-5)


def test_system_tags_as_nvidia_wraps_them(golden):
    for case, expected in zip(golden["nv_wrap_cases"], golden["nv_wrap_results"], strict=True):
        assert wrap_with_system_tags(str(case)) == str(expected)


def test_text_prompt_ids_as_nvidia_encodes_them(golden, tokenizer):
    ids = prompt_text_tokens(str(golden["nv_text_prompt"]), tokenizer, system_tags=True)
    assert ids == golden["nv_text_prompt_ids"].tolist()
    plain = prompt_text_tokens(str(golden["nv_text_prompt"]), tokenizer, system_tags=False)
    assert plain == tokenizer.encode(str(golden["nv_text_prompt"]))


# ------------------------------------------------------------------ the references


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def test_the_goldens_ran_on_these_files(golden, fixtures_dir):
    """The tool's model files are the tests' (the transformers folder is rebuilt from
    lm_pytorch.safetensors and checked against its manifest by transformers_layout)."""
    from transformers_layout import ensure_transformers_moshi

    assert sha256(fixtures_dir / "lm_pytorch.safetensors") == str(golden["nv_lm_sha256"])
    folder = ensure_transformers_moshi(Path(__file__).parent / ".cache")
    assert sha256(folder / "model.safetensors") == str(golden["trfs_weights_sha256"])


def test_prompted_generate_matches_transformers(golden, lm):
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    result = generate_prompted(gen, golden["trfs_input_ids"], golden["trfs_moshi_audio_codes"],
                               golden["trfs_user_audio_codes"], golden["trfs_blank_user_codes"],
                               int(golden["trfs_new_tokens"]))
    np.testing.assert_array_equal(result.sequences, golden["trfs_sequences"])
    np.testing.assert_array_equal(result.audio_codes, golden["trfs_audio_codes"])


def run_nvidia_scenario(gen: LmGen, golden: dict) -> dict[str, list]:
    """Our phases on the golden's prompt (its voice codes, its text ids), then the
    conversation on its user codes; per step: text / audio argmax, text, returned frame."""
    frames = phase_frames(golden["nv_text_prompt_ids"].tolist(), golden["nv_voice_codes"])
    record: dict[str, list] = {"text_argmax": [], "audio_argmax": [], "text": [], "frame": []}

    def observe(_: int) -> None:
        state = gen.state
        record["text_argmax"].append(int(mx.argmax(state.text_logits[0])))
        record["audio_argmax"].append([int(mx.argmax(x[0])) for x in state.audio_logits])
        record["text"].append(int(state.text[0]))

    run_phases(gen, frames, observe=observe)
    record["frame"] = [None] * frames.count  # (the phases' frames are forced ones)
    user = golden["nv_user_codes"]
    for t in range(golden["nv_out"].shape[0] - 1):
        _, frame = gen.step(user[:, t][None])
        observe(t)
        record["frame"].append(np.array(frame[0]))
    return record


def test_prompt_phases_match_nvidia(golden, lm):
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    frames = phase_frames(golden["nv_text_prompt_ids"].tolist(), golden["nv_voice_codes"])
    voice = golden["nv_voice_codes"].shape[1]
    assert frames.phases == (("voice", voice), ("silence", SILENCE_FRAMES),
                             ("text", len(golden["nv_text_prompt_ids"])),
                             ("silence", SILENCE_FRAMES))
    # NVIDIA's first call runs no forward: its forward n is our step n - 1
    assert int(golden["nv_phase_steps"]) == frames.count - 1
    record = run_nvidia_scenario(gen, golden)
    np.testing.assert_array_equal(record["text_argmax"], golden["nv_text_argmax"])
    np.testing.assert_array_equal(record["audio_argmax"], golden["nv_audio_argmax"])
    # Their call after the phases' last returns frame F - 1 (text of column F - 1, which our
    # step F - 2 returned) and then one frame per call, one call later than ours.
    count = frames.count
    for j, expected in enumerate(golden["nv_out"]):
        assert record["text"][count - 2 + j] == expected[0], j
        if j:
            np.testing.assert_array_equal(record["frame"][count - 1 + j], expected[1:])


def test_our_mimi_codes_of_the_voice(golden, fixtures_dir, random_mimi_path):
    """The same 2 s of speech, normalized and encoded by our streaming Mimi: the codes of
    NVIDIA's Mimi (PyTorch) within float rounding: all semantic codes, 99% of all."""
    from moshi_mlx.conversation.engine import make_codec
    from moshi_mlx.conversation.prompts import encode_voice

    assert sha256(random_mimi_path) == str(golden["nv_mimi_sha256"])
    codes = encode_voice(loudness_signals(fixtures_dir)["voice"], make_codec(random_mimi_path))
    expected = golden["nv_voice_codes"]
    assert codes.shape == expected.shape
    np.testing.assert_array_equal(codes[0], expected[0])
    assert (codes == expected).mean() >= 0.99  # (all 200 equal when derived)


# ------------------------------------------------------------------ the engine


class ScriptedCodec:
    """A Codec whose encoder returns the given user codes frame after frame and whose
    decoder records Moshi's codes."""

    def __init__(self, user_codes: np.ndarray) -> None:
        self.user_codes = user_codes
        self.reset()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        codes = self.user_codes[:, self.encoded % self.user_codes.shape[1]]
        self.encoded += 1
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self.decoded.append(np.array(codes))
        return np.zeros(1920, np.float32)

    def reset(self) -> None:
        self.encoded = 0
        self.decoded: list[np.ndarray] = []


def make_engine(lm, tokenizer, user_codes: np.ndarray) -> Engine:
    return Engine(ScriptedCodec(user_codes), LmGen(lm, text_temp=0.0, audio_temp=0.0),
                  tokenizer)


def converse(engine: Engine, frames: int) -> tuple[list[int], list[list[int]]]:
    """`frames` frames of conversation from `engine.reset()`: text tokens, Moshi's codes."""
    engine.reset()
    texts = []
    for _ in range(frames):
        engine.process(np.zeros(1920, np.float32))
        texts.append(int(engine.lm_gen.state.text[0]))
    return texts, [c.tolist() for c in engine.codec.decoded]


def test_engine_prompt_is_the_phases_then_the_conversation(golden, lm, tokenizer):
    """set_prompt + process = the NVIDIA scenario (ids given as the tokenizer makes them:
    the fixture has no system tags, so the text is wrapped by hand here)."""
    engine = make_engine(lm, tokenizer, golden["nv_user_codes"])
    engine.set_prompt(MoshiPrompt(text=wrap_with_system_tags(str(golden["nv_text_prompt"])),
                                  voice_codes=golden["nv_voice_codes"]))
    texts, codes = converse(engine, golden["nv_out"].shape[0] - 1)
    expected = run_nvidia_scenario(LmGen(lm, text_temp=0.0, audio_temp=0.0), golden)
    count = len(expected["text"]) - len(texts)
    assert texts == expected["text"][count:]
    assert codes == [f.tolist() for f in expected["frame"][count:]]
    np.testing.assert_array_equal(codes, golden["nv_out"][1:, 1:])
    assert engine.prompt_description["phases"][0] == ["voice", golden["nv_voice_codes"].shape[1]]


def test_saved_prompt_state_resumes_exactly(golden, lm, tokenizer, tmp_path):
    user = golden["nv_user_codes"]
    prompt = MoshiPrompt(text="Talk about boats.", voice_codes=golden["nv_voice_codes"][:, :9])
    engine = make_engine(lm, tokenizer, user)
    engine.set_prompt(prompt)
    first = converse(engine, 12)
    assert converse(engine, 12) == first  # a conversation never changes the prompt's state
    engine.save_prompt_state(tmp_path / "prompt.safetensors")

    restored = make_engine(lm, tokenizer, user)
    restored.load_prompt_state(tmp_path / "prompt.safetensors")
    assert converse(restored, 12) == first
    assert restored.prompt_description == engine.prompt_description
    assert converse(make_engine(lm, tokenizer, user), 12) != first  # the prompt mattered

    engine.set_prompt(MoshiPrompt())  # an empty prompt clears it: silence again
    assert engine.prompt_description is None
    assert converse(engine, 12) == converse(make_engine(lm, tokenizer, user), 12)


def test_saved_prompt_state_sampling_resumes_exactly(golden, lm, tokenizer, tmp_path):
    """With sampling, the PRNG key travels with the state: same samples after loading."""
    user = golden["nv_user_codes"]
    engine = Engine(ScriptedCodec(user), LmGen(lm, seed=7), tokenizer)
    engine.set_prompt(MoshiPrompt(text="Hello there."))
    first = converse(engine, 10)
    engine.save_prompt_state(tmp_path / "sampled.safetensors")
    restored = Engine(ScriptedCodec(user), LmGen(lm, seed=99), tokenizer)
    restored.load_prompt_state(tmp_path / "sampled.safetensors")
    assert converse(restored, 10) == first


# ------------------------------------------------------------------ bad input


def test_bad_voice_prompts_are_prompt_errors(fixtures_dir):
    with pytest.raises(PromptError, match="silent"):
        voice_frames(np.zeros(24000, np.float32))
    with pytest.raises(PromptError, match="not mono audio"):
        voice_frames(np.ones(24000, np.int16))
    with pytest.raises(PromptError, match="not mono audio"):
        voice_frames(np.ones((2, 24000), np.float32))
    with pytest.raises(PromptError, match="shorter than one 400 ms"):
        voice_frames(loudness_signals(fixtures_dir)["voice"][:4000])
    frames = voice_frames(loudness_signals(fixtures_dir)["voice"][:10000])
    assert frames.shape == (6, 1920) and not frames[5, 10000 - 5 * 1920:].any()
    assert frames[5, : 10000 - 5 * 1920].any()


def test_engine_refuses_bad_prompts_before_changing_anything(golden, lm, tokenizer, tmp_path,
                                                             fixtures_dir):
    user = golden["nv_user_codes"]
    engine = make_engine(lm, tokenizer, user)
    engine.set_prompt(MoshiPrompt(text="Talk about boats."))
    before = converse(engine, 6)
    limit = engine.max_prompt_tokens
    assert limit == lm.cfg.context - 2 * SILENCE_FRAMES
    with pytest.raises(PromptError, match=f"leaves {limit}$"):
        engine.set_prompt(MoshiPrompt(text=" ".join(["boat"] * (limit + 1))))
    voice = loudness_signals(fixtures_dir)["voice"]  # 25 frames
    with pytest.raises(PromptError, match=f"leaves {limit - 25} beside 25 frames of voice"):
        engine.set_prompt(MoshiPrompt(text=" ".join(["boat"] * (limit - 20)), voice_pcm=voice))
    assert engine.codec.encoded == 6  # the codec was not touched (no encode, no reset)
    with pytest.raises(PromptError, match="silent"):
        engine.set_prompt(MoshiPrompt(text="hi", voice_pcm=np.zeros(48000, np.float32)))
    with pytest.raises(PromptError, match="voice codes"):
        engine.set_prompt(MoshiPrompt(voice_codes=np.full((8, 3), 5000)))
    with pytest.raises(PromptError, match="not a prompt state"):
        (tmp_path / "junk.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{}" * 8)
        engine.load_prompt_state(tmp_path / "junk.safetensors")
    with pytest.raises(PromptError, match="not found"):
        engine.load_prompt_state(tmp_path / "missing.safetensors")
    assert converse(engine, 6) == before
    with pytest.raises(PromptError, match="no prompt to save"):
        make_engine(lm, tokenizer, user).save_prompt_state(tmp_path / "none.safetensors")


def test_prompt_state_of_another_model_is_refused(golden, lm, tokenizer, fixtures_dir, tmp_path):
    user = golden["nv_user_codes"]
    engine = make_engine(lm, tokenizer, user)
    engine.set_prompt(MoshiPrompt(text="Talk about boats."))
    engine.save_prompt_state(tmp_path / "f32.safetensors")
    other = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                    config=fixtures_dir / "lm_config.json", dtype=mx.bfloat16)
    bf16 = make_engine(other, tokenizer, user)
    before = converse(bf16, 4)
    with pytest.raises(PromptError, match="another compute dtype"):
        bf16.load_prompt_state(tmp_path / "f32.safetensors")
    assert bf16.prompt_description is None and converse(bf16, 4) == before
    bigger = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                     config=fixtures_dir / "lm_config.json", dtype=mx.float32)
    bigger.cfg = bigger.cfg.with_overrides(context=100)
    with pytest.raises(PromptError, match="another shape.*context"):
        make_engine(bigger, tokenizer, user).load_prompt_state(tmp_path / "f32.safetensors")
    tuned = load_lm(fixtures_dir / "lm_pytorch.safetensors",
                    config=fixtures_dir / "lm_config.json", dtype=mx.float32)
    tuned.out_norm.weight = tuned.out_norm.weight * 1.01  # same shape, other weights
    with pytest.raises(PromptError, match="saved with other weights"):
        make_engine(tuned, tokenizer, user).load_prompt_state(tmp_path / "f32.safetensors")


def test_phase_frames_hold_the_hard_coded_tokens():
    frames = phase_frames([11, 12], None, text_pad=3)
    assert frames.phases == (("silence", 6), ("text", 2), ("silence", 6))
    assert frames.text.tolist() == [3] * 6 + [11, 12] + [3] * 6
    assert (frames.user == np.array(SINE_TOKENS)[:, None]).all()


def test_quantized_prompt_state_resumes_and_is_refused_elsewhere(golden, lm, tokenizer,
                                                                 fixtures_dir, tmp_path):
    user = golden["nv_user_codes"]
    q4 = load_lm(fixtures_dir / "lm_pytorch.safetensors", config=fixtures_dir / "lm_config.json",
                 dtype=mx.float32, quantize=4)
    engine = make_engine(q4, tokenizer, user)
    engine.set_prompt(MoshiPrompt(text="Talk about boats.", voice_codes=golden["nv_voice_codes"]))
    first = converse(engine, 8)
    engine.save_prompt_state(tmp_path / "q4.safetensors")
    restored = make_engine(q4, tokenizer, user)
    restored.load_prompt_state(tmp_path / "q4.safetensors")
    assert converse(restored, 8) == first
    with pytest.raises(PromptError, match="another quantization"):
        make_engine(lm, tokenizer, user).load_prompt_state(tmp_path / "q4.safetensors")
