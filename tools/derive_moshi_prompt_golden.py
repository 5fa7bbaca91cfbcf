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
   the forced phases), and the conversation's returned frames. It also stores pyloudnorm's
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
        derive_nvidia()
    else:
        sys.exit("usage: derive_moshi_prompt_golden.py transformers|nvidia")


def derive_nvidia() -> None:
    raise NotImplementedError


if __name__ == "__main__":
    main()
