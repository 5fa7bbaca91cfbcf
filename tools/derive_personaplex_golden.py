"""The PersonaPlex golden: NVIDIA's own `LMGen` (their fork of Kyutai's `moshi`) on a tiny
random dep_q 16 model in their layout, float32, greedy.

Run in NVIDIA's venv (their `moshi` package, CPU torch, numpy, safetensors; made with torch
2.13.0+cpu and moshi-personaplex 0.1.0), from the repository root:

    /work/ppvenv/bin/python tools/derive_personaplex_golden.py \
        --out tests/fixtures/personaplex_golden.npz

The weights come from tests/personaplex_random.py (seeded numpy, bf16 PyTorch layout: the
golden stores the file's sha256, the tests rebuild it). Their `LMModel` is built with the
tiny sizes of that file's config and dep_q 16, loaded in float32, and their
`LMGen(use_sampling=False)` steps through `user_codes` (random codes, one frame a call), no
prompt. Their generator forwards column c - 1 at call c (call 0 only writes), so call c + 1
is our step c. Written per call c (row 0: call 0, nothing forwarded, -1):

- `text` [C]: the text token their depformer step received (sampled: nothing is forced);
- `audio` [C, 16]: the 16 tokens their depformer sampled (Moshi's 8, then the user's 8,
  each user slice after the given code of the codebook before it);
- `out` [C, 17]: the frame their `step` returned (-1 where None);
- `user_codes` [C, 8], `delays`, `config` (JSON), `weights_sha256`, `versions` (JSON).

The depformer's tokens are read by wrapping their `LMGen.depformer_step` (called as it is;
the wrapper only records what it returns).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import personaplex_random  # noqa: E402

CALLS = 17
USER_SEED = 77


def build_model(weights: Path):
    from moshi.models.lm import LMModel
    from safetensors.torch import load_file

    config = dict(personaplex_random.CONFIG)
    kwargs = {key: value for key, value in config.items()}
    kwargs["depformer_causal"] = True
    model = LMModel(device="cpu", dtype=torch.float32, **kwargs)
    state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def run(model, user_codes: np.ndarray) -> dict[str, np.ndarray]:
    from moshi.models.lm import LMGen

    gen = LMGen(model, device="cpu", use_sampling=False, sample_rate=24000, frame_rate=12.5)
    recorded: list[tuple[int, list[int]]] = []
    original = gen.depformer_step

    def depformer_step(text_token, transformer_out, audio_tokens, audio_provided):
        tokens = original(text_token, transformer_out, audio_tokens, audio_provided)
        recorded.append((int(text_token[0]), [int(x) for x in tokens[0]]))
        return tokens

    gen.depformer_step = depformer_step
    calls = user_codes.shape[0]
    text = np.full(calls, -1, dtype=np.int32)
    audio = np.full((calls, model.dep_q), -1, dtype=np.int32)
    out = np.full((calls, model.num_codebooks), -1, dtype=np.int32)
    with torch.no_grad(), gen.streaming(1):
        for call in range(calls):
            before = len(recorded)
            frame = gen.step(input_tokens=torch.tensor(user_codes[call], dtype=torch.long)
                             .view(1, -1, 1))
            if len(recorded) > before:
                text[call], audio[call] = recorded[-1][0], recorded[-1][1]
            if frame is not None:
                out[call] = frame[0, :, 0].numpy()
    return {"text": text, "audio": audio, "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    user_codes = np.random.default_rng(USER_SEED).integers(0, 2048, (CALLS, 8), dtype=np.int32)
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "model.safetensors"
        sha = personaplex_random.write(weights)
        model = build_model(weights)
    result = run(model, user_codes)
    from importlib.metadata import version

    versions = {"torch": torch.__version__, "moshi-personaplex": version("moshi_personaplex"),
                "numpy": np.__version__}
    np.savez_compressed(
        args.out, user_codes=user_codes, delays=np.array(personaplex_random.CONFIG["delays"]),
        config=json.dumps(personaplex_random.CONFIG), weights_sha256=sha,
        versions=json.dumps(versions), **result)
    print(f"wrote {args.out}: {CALLS} calls, versions {versions}")
    print("text", result["text"].tolist())
    print("audio[1:4]", result["audio"][1:4].tolist())


if __name__ == "__main__":
    main()
