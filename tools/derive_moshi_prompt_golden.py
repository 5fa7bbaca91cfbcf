"""tests/fixtures/moshi_prompt_golden.npz: prompted Moshi generation by two references, for
tests/test_prompt_phases.py (issue 19). Float32, greedy, on the tiny Moshi fixture.

Two parts, each in its own virtual environment (the package never imports torch):

a) transformers (/work/tfvenv: torch 2.13.0+cpu, transformers 5.24.0):

       /work/tfvenv/bin/python tools/derive_moshi_prompt_golden.py transformers

   `MoshiForConditionalGeneration.generate(input_ids, moshi_audio_codes, user_audio_codes,
   do_sample=False, max_new_tokens=N, return_audio_codes=True)` on the transformers-layout
   tiny Moshi (tests/transformers_layout.py rebuilds it from lm_pytorch.safetensors, checked
   against its manifest), with a seeded random prompt of three streams. Stores the prompt, the
   blank user codes its bundled tiny Mimi computes (an all-zero frame), and what generate
   returns (`sequences`, `audio_codes`) under `trfs_*`.

b) NVIDIA PersonaPlex (/work/ppvenv: their `moshi` fork, pyloudnorm, sphn < 0.2):

       /work/ppvenv/bin/python tools/derive_moshi_prompt_golden.py nvidia

   Their `LMModel` with the fixture's kwargs (lm_config.json, dep_q 8) and weights, float32,
   and their `LMGen` (greedy): `step_system_prompts` with a voice prompt (the first seconds of
   tests/fixtures/speech.wav through their -24 LUFS normalization and their Mimi, the tests'
   random real-size Mimi, tests/mimi_random.py) and a text prompt (token ids), then N steps
   on stored user codes. Stores (under `nv_*`) the voice codes their Mimi produced, the text
   prompt ids, per step the argmax of the text / audio logits (the model's predictions during
   the forced phases), and the conversation's returned frames. Their RingKVCache has a bug
   Kyutai fixed upstream (see `fix_ring_positions`: the depformer's last codebook never sees
   the text token); the golden is made with it fixed. `nvidia --as-released` runs their code
   as it is and prints where it leaves the golden (nothing is written). It also stores pyloudnorm's
   integrated loudness of a few signals (`loudness_*`) for tests of audio/loudness.py.

Each part rewrites only its own keys of the .npz (the other part's are kept) and records
the versions it ran with (`*_versions`, JSON).
"""

from __future__ import annotations

import json
import sys
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = FIXTURES / "moshi_prompt_golden.npz"
CACHE = ROOT / "tests" / ".cache"

PROMPT_FRAMES = 12  # transformers: frames of the three-stream prompt
NEW_TOKENS = 20  # transformers: max_new_tokens
TEXT_PROMPT_TOKENS = 9  # NVIDIA: text prompt length (token ids)
VOICE_SECONDS = 2.0  # NVIDIA: the voice prompt, the start of speech.wav
CONVERSATION_STEPS = 16  # NVIDIA: greedy steps after the phases


def speech() -> np.ndarray:
    with wave.open(str(FIXTURES / "speech.wav")) as f:
        assert f.getframerate() == 24000 and f.getsampwidth() == 2 and f.getnchannels() == 1
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def transformers_prompt(text_card: int, card: int) -> dict[str, np.ndarray]:
    """The seeded three-stream prompt (ids below text_card: the text initial token is the
    generation config's pad id, which generate would mask)."""
    rng = np.random.default_rng(19)
    return {
        "trfs_input_ids": rng.integers(4, text_card, (1, PROMPT_FRAMES)).astype(np.int64),
        "trfs_moshi_audio_codes": rng.integers(0, card, (1, 8, PROMPT_FRAMES)).astype(np.int64),
        "trfs_user_audio_codes": rng.integers(0, card, (1, 8, PROMPT_FRAMES)).astype(np.int64),
    }


def sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save(results: dict[str, np.ndarray]) -> None:
    prefix = next(iter(results)).split("_")[0] + "_"
    kept = {}
    if GOLDEN.is_file():
        with np.load(GOLDEN) as old:
            kept = {k: old[k] for k in old.files if not k.startswith(prefix)
                    and not (prefix == "nv_" and k.startswith("loudness_"))}
    np.savez_compressed(GOLDEN, **kept, **results)
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


def derive_transformers() -> None:
    import torch
    import transformers
    from transformers import MoshiForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    from transformers_layout import ensure_transformers_moshi

    torch.set_grad_enabled(False)
    folder = ensure_transformers_moshi(CACHE)
    model = MoshiForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    lm = json.loads((FIXTURES / "lm_config.json").read_text())
    prompt = transformers_prompt(lm["text_card"], lm["card"])
    zero = torch.zeros(1, 1, 1920)
    blank = model.audio_encoder.encode(zero, num_quantizers=8)[0]
    out = model.generate(
        input_ids=torch.from_numpy(prompt["trfs_input_ids"]),
        moshi_audio_codes=torch.from_numpy(prompt["trfs_moshi_audio_codes"]),
        user_audio_codes=torch.from_numpy(prompt["trfs_user_audio_codes"]),
        do_sample=False, max_new_tokens=NEW_TOKENS, return_audio_waveforms=False,
        return_audio_codes=True)
    results = {
        **prompt,
        "trfs_blank_user_codes": blank.numpy().astype(np.int64)[0, :, 0],
        "trfs_sequences": out.sequences.numpy().astype(np.int64),
        "trfs_audio_codes": out.audio_codes.numpy().astype(np.int64),
        "trfs_new_tokens": np.array(NEW_TOKENS),
        "trfs_weights_sha256": np.array(sha256(folder / "model.safetensors")),
        "trfs_versions": np.array(json.dumps({"torch": torch.__version__,
                                              "transformers": transformers.__version__})),
    }
    print({k: v.shape for k, v in results.items()})
    print("sequences", results["trfs_sequences"].tolist())
    save(results)


def main() -> None:
    part = sys.argv[1] if len(sys.argv) > 1 else ""
    if part == "transformers":
        derive_transformers()
    elif part == "nvidia":
        derive_nvidia(as_released="--as-released" in sys.argv)
    else:
        sys.exit("usage: derive_moshi_prompt_golden.py transformers|nvidia")


NV_TEXT_PROMPT = "You enjoy a good talk."
WRAP_CASES = ("  Be brief. ", "<system> Kept as it is. <system>", "<system> only at the start",
              "")


def loudness_signals() -> dict[str, np.ndarray]:
    """Signals whose pyloudnorm loudness the golden stores (the test rebuilds them)."""
    pcm = speech()
    rng = np.random.default_rng(1770)
    return {
        "speech": pcm,
        "voice": pcm[: int(VOICE_SECONDS * 24000)],
        "noise": (rng.standard_normal(36000) * 0.1).astype(np.float32),
        "sine": (0.3 * np.sin(2 * np.pi * 440 * np.arange(30000) / 24000)).astype(np.float32),
    }


def fix_ring_positions() -> None:
    """Their RingKVCache (the fork's copy of an older Kyutai transformer.py) gives the slot
    written `capacity` steps ago the position `end_offset` whenever end_offset is a multiple of
    the capacity, so that key is masked: in the depformer (capacity = depformer_context = 8)
    the last codebook never sees the first input (the text token). Kyutai fixed this upstream
    ("Fix streaming propagate + fixing bug in KV Cache (#148)"); the golden is made with the
    positions computed right (slot i holds the newest position p with p = i mod capacity)."""
    import torch
    from moshi.modules import transformer

    released = transformer.RingKVCache.complete

    def complete(self, k, v):
        result = released(self, k, v)
        slots = torch.arange(self.capacity, device=self.end_offset.device)
        newest = self.end_offset - 1
        positions = newest - torch.remainder(newest - slots, self.capacity)
        positions = torch.where(positions >= 0, positions, torch.full_like(positions, -1))
        return transformer.KVCacheResult(result.keys, result.values, positions)

    transformer.RingKVCache.complete = complete


def derive_nvidia(as_released: bool = False) -> None:
    import importlib.metadata
    import tempfile

    import pyloudnorm
    import safetensors.torch
    import sentencepiece
    import torch
    from moshi.models import loaders
    from moshi.models.lm import LMGen, LMModel
    from moshi.offline import wrap_with_system_tags

    sys.path.insert(0, str(ROOT / "tests"))
    from mimi_random import ensure_random_mimi

    torch.set_grad_enabled(False)
    if not as_released:
        fix_ring_positions()
    lm_kwargs = json.loads((FIXTURES / "lm_config.json").read_text())
    model = LMModel(device="cpu", dtype=torch.float32, **lm_kwargs).eval()
    weights = safetensors.torch.load_file(str(FIXTURES / "lm_pytorch.safetensors"))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    mimi_path = ensure_random_mimi(CACHE, FIXTURES)
    mimi = loaders.get_mimi(mimi_path, device="cpu")

    gen = LMGen(model, device="cpu", use_sampling=False, sample_rate=24000, frame_rate=12.5,
                audio_silence_frame_cnt=int(0.5 * 12.5))
    text_argmax, audio_argmax, voice_codes = [], [], []
    forward_depformer = model.forward_depformer
    process = gen.process_transformer_output

    def record_depformer(cb_index, sequence, transformer_out):
        logits = forward_depformer(cb_index, sequence, transformer_out)
        audio_argmax[-1].append(int(logits.argmax(-1).reshape(-1)[0]))
        return logits

    def record_text(transformer_out, text_logits, *args):
        text_argmax.append(int(text_logits.argmax(-1).reshape(-1)[0]))
        audio_argmax.append([])
        return process(transformer_out, text_logits, *args)

    encode_frames = gen._encode_voice_prompt_frames

    def record_voice(mimi_model):
        for codes in encode_frames(mimi_model):
            voice_codes.append(codes[0, :, 0].numpy().astype(np.int64))
            yield codes

    model.forward_depformer = record_depformer
    gen.process_transformer_output = record_text
    gen._encode_voice_prompt_frames = record_voice

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    prompt_ids = tokenizer.encode(wrap_with_system_tags(NV_TEXT_PROMPT))
    rng = np.random.default_rng(1919)
    user_codes = rng.integers(0, lm_kwargs["card"], (8, CONVERSATION_STEPS)).astype(np.int64)
    with tempfile.TemporaryDirectory() as work:
        voice_wav = Path(work) / "voice.wav"
        samples = np.round(loudness_signals()["voice"] * 32768).astype("<i2")
        with wave.open(str(voice_wav), "wb") as f:
            f.setnchannels(1)
            f.setsampwidth(2)
            f.setframerate(24000)
            f.writeframes(samples.tobytes())
        mimi.streaming_forever(1)
        gen.streaming_forever(1)
        gen.load_voice_prompt(str(voice_wav))
        gen.text_prompt_tokens = prompt_ids
        mimi.reset_streaming()
        gen.reset_streaming()
        gen.step_system_prompts(mimi)
        mimi.reset_streaming()
        phase_steps = len(text_argmax)
        outs = []
        for t in range(CONVERSATION_STEPS):
            out = gen.step(torch.from_numpy(user_codes[:, t]).view(1, 8, 1))
            outs.append(out[0, :, 0].numpy().astype(np.int64))
    meter = pyloudnorm.Meter(24000)
    results = {
        "nv_text_prompt": np.array(NV_TEXT_PROMPT),
        "nv_text_prompt_ids": np.array(prompt_ids, np.int64),
        "nv_voice_codes": np.stack(voice_codes, axis=1),
        "nv_user_codes": user_codes,
        "nv_phase_steps": np.array(phase_steps),
        "nv_text_argmax": np.array(text_argmax, np.int64),
        "nv_audio_argmax": np.array(audio_argmax, np.int64),
        "nv_out": np.stack(outs),
        "nv_lm_sha256": np.array(sha256(FIXTURES / "lm_pytorch.safetensors")),
        "nv_mimi_sha256": np.array(sha256(mimi_path)),
        "nv_wrap_cases": np.array(WRAP_CASES),
        "nv_wrap_results": np.array([wrap_with_system_tags(c) for c in WRAP_CASES]),
        "nv_versions": np.array(json.dumps({
            "torch": torch.__version__,
            "moshi-personaplex": importlib.metadata.version("moshi-personaplex"),
            "personaplex commit": "3428dfd95309a7f3c84fd93259ded0f810d1ff91",
            "patched": "RingKVCache positions (fix_ring_positions)",
            "pyloudnorm": importlib.metadata.version("pyloudnorm")})),
    }
    for name, signal in loudness_signals().items():
        results[f"loudness_{name}"] = np.array(meter.integrated_loudness(signal))
    print({k: v.shape for k, v in results.items()})
    print("phase steps", phase_steps, "out", results["nv_out"][:, 0].tolist())
    if as_released:  # compare only: where the released code leaves the golden
        with np.load(GOLDEN) as old:
            for key in ("nv_text_argmax", "nv_audio_argmax", "nv_out"):
                differ = np.flatnonzero((results[key] != old[key]).reshape(len(old[key]), -1)
                                        .any(axis=1))
                print(key, "first step that differs:", differ[0] if differ.size else None)
        return
    save(results)


if __name__ == "__main__":
    main()
