"""The PersonaPlex golden: NVIDIA's own `LMGen` (their fork of Kyutai's `moshi`) on a tiny
random dep_q 16 model in their layout, float32, greedy.

Run in NVIDIA's venv (their `moshi` package, CPU torch, numpy, safetensors; made with torch
2.13.0+cpu and moshi-personaplex 0.1.0), from the repository root:

    /work/ppvenv/bin/python tools/derive_personaplex_golden.py \
        --out tests/fixtures/personaplex_golden.npz \
        --voice tests/fixtures/personaplex_voice.pt --odd tests/fixtures/torch_tensors.pt

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
- `q4_text`, `q4_audio`, `q4_out` and `q8_...`: the same on our converter's q4 / q8 folder
  (made from the file with `weights_convert` and the plain Moshi config.json of the tiny sizes,
  by tools/personaplex_quantized.py in our venv: --our-python), dequantized in float32 and
  mapped back to their layout; `q4_sha256`, `q8_sha256`: those folders' model files;
- `prompted_text`, `prompted_audio`, `prompted_out` [P + C, ...]: the same conversation after
  their `step_system_prompts` with a text prompt only (`prompt_text`, wrapped by their
  `wrap_with_system_tags` into `prompt_wrapped`, encoded by the fixture's SentencePiece
  tokenizer into `prompt_tokens`; no voice, 6 silence frames before and after it, as their
  offline.py sets them): rows 0 .. P - 1 (`prompted_calls` = P) are the prompt's calls, row
  P + c the call given user_codes[c]; text rows hold the forced token where one was forced;
- `voiced_text`, `voiced_audio`, `voiced_out`, `voiced_calls`: the same with the voice below
  replayed first from its .pt (their `load_voice_prompt_embeddings`);
- `voice_codes` [8, 5]: random Mimi codes given to their voice phase (their
  `_step_voice_prompt_core`, save_voice_prompt_embeddings=True, the Mimi encoding replaced by
  these codes) on the bf16 file in float32; their code saved --voice (.pt), and
  `voice_embeddings` [4, 1, 1, 64], `voice_cache` [1, 17, 4] are what torch.load reads in it;
- --odd: a .pt of a bf16, a half, a strided int32 view, a list of a bool tensor and a number;
  `odd_bf16` (as float32), `odd_half`, `odd_view`, `odd_list` are their values;
- `user_codes` [C, 8], `delays`, `config` (JSON), `weights_sha256`, `versions` (JSON).

The depformer's tokens are read by wrapping their `LMGen.depformer_step` (called as it is;
the wrapper only records what it returns).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import personaplex_random  # noqa: E402

CALLS = 17
USER_SEED = 77
PROMPT_TEXT = " You are a tiny test model. "
VOICE_FRAMES = 5
VOICE_SEED = 78


def build_model(state: dict[str, torch.Tensor]):
    """Their LMModel with the tiny sizes, float32, holding `state` (their layout)."""
    from moshi.models.lm import LMModel

    kwargs = dict(personaplex_random.CONFIG)
    kwargs["depformer_causal"] = True
    model = LMModel(device="cpu", dtype=torch.float32, **kwargs)
    state = {k: v.to(torch.float32) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SystemExit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def run(model, user_codes: np.ndarray, prompt_tokens: list[int] | None = None,
        voice: Path | None = None) -> dict[str, np.ndarray]:
    """Their greedy generator on `user_codes` (one frame a call); with `prompt_tokens`, after
    their `step_system_prompts` (6 silence frames around the text prompt, as offline.py sets
    them; with `voice`, a saved voice replayed first). Rows: every call, the prompt's first."""
    from moshi.models.lm import LMGen

    gen = LMGen(model, device="cpu", use_sampling=False, sample_rate=24000, frame_rate=12.5,
                audio_silence_frame_cnt=int(0.5 * 12.5), text_prompt_tokens=prompt_tokens)
    recorded: dict[int, tuple[int, list[int]]] = {}
    original = gen.depformer_step

    def depformer_step(text_token, transformer_out, audio_tokens, audio_provided):
        tokens = original(text_token, transformer_out, audio_tokens, audio_provided)
        call = gen._streaming_state.offset  # advanced after this call's outputs
        recorded[call] = (int(text_token[0]), [int(x) for x in tokens[0]])
        return tokens

    gen.depformer_step = depformer_step
    if voice is not None:
        gen.load_voice_prompt_embeddings(str(voice))
    outs: dict[int, np.ndarray] = {}
    with torch.no_grad(), gen.streaming(1):
        if prompt_tokens is not None:
            gen.step_system_prompts(None)  # no voice prompt: their Mimi is never used
        first = gen._streaming_state.offset
        for index, codes in enumerate(user_codes):
            frame = gen.step(input_tokens=torch.tensor(codes, dtype=torch.long).view(1, -1, 1))
            if frame is not None:
                outs[first + index] = frame[0, :, 0].numpy()
    calls = first + len(user_codes)
    text = np.full(calls, -1, dtype=np.int32)
    audio = np.full((calls, model.dep_q), -1, dtype=np.int32)
    out = np.full((calls, model.num_codebooks), -1, dtype=np.int32)
    for call, (token, tokens) in recorded.items():
        text[call], audio[call] = token, tokens
    for call, frame in outs.items():
        out[call] = frame
    return {"text": text, "audio": audio, "out": out}


def to_their_layout(ours: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Our (MLX) layout of the tiny model -> NVIDIA's: slices' depformer attention stacked
    again, the shared depformer norms taken from slice 0, norm gains as (1, 1, dim)."""
    config = personaplex_random.CONFIG
    slices = config["dep_q"]
    out: dict[str, np.ndarray] = {}
    for name, value in ours.items():
        parts = name.split(".")
        if parts[0] == "audio_embs":
            out[f"emb.{parts[1]}.weight"] = value
        elif name in ("text_emb.weight", "text_linear.weight"):
            out[name] = value
        elif name == "out_norm.weight":
            out["out_norm.alpha"] = value.reshape(1, 1, -1)
        elif parts[0] == "transformer":
            rest = ".".join(parts[3:])
            prefix = f"transformer.layers.{parts[2]}."
            if rest in ("norm1.weight", "norm2.weight"):
                out[prefix + rest.replace("weight", "alpha")] = value.reshape(1, 1, -1)
            elif rest == "self_attn.in_proj.weight":
                out[prefix + "self_attn.in_proj_weight"] = value
            else:
                out[prefix + rest] = value
        elif parts[:2] == ["depformer", "slices"]:
            k, rest = int(parts[2]), ".".join(parts[3:])
            if rest == "linear_in.weight":
                out[f"depformer_in.{k}.weight"] = value
            elif rest == "linear_out.weight":
                out[f"linears.{k}.weight"] = value
            elif rest == "emb.weight":
                out["depformer_text_emb.weight" if k == 0
                    else f"depformer_emb.{k - 1}.weight"] = value
            else:  # transformer.layers.{l}.<part>
                layer, part = parts[5], ".".join(parts[6:])
                prefix = f"depformer.layers.{layer}."
                if part in ("norm1.weight", "norm2.weight"):
                    if k == 0:
                        out[prefix + part.replace("weight", "alpha")] = value.reshape(1, 1, -1)
                elif part.startswith("gating."):
                    out[prefix + part.replace("gating.", f"gating.{k}.")] = value
                else:
                    stacked = prefix + {"self_attn.in_proj.weight": "self_attn.in_proj_weight",
                                        "self_attn.out_proj.weight": "self_attn.out_proj.weight"
                                        }[part]
                    out.setdefault(stacked, [None] * slices)[k] = value
        else:
            raise SystemExit(f"unexpected tensor {name}")
    return {k: torch.from_numpy(np.concatenate(v) if isinstance(v, list) else v)
            for k, v in out.items()}


def quantized_state(folder: Path, weights: Path, bits: int, our_python: str
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Our converter's q4 / q8 folder of the checkpoint, dequantized in float32 and mapped to
    their layout (tools/personaplex_quantized.py, in our venv), and that file's sha256."""
    config = folder / "config.json"
    config.write_text(json.dumps(personaplex_random.plain_moshi_config()))
    dump = folder / f"q{bits}.npz"
    helper = Path(__file__).resolve().parent / "personaplex_quantized.py"
    done = subprocess.run([our_python, str(helper), "--weights", str(weights), "--config",
                           str(config), "--bits", str(bits), "--folder",
                           str(folder / f"q{bits}"), "--dump", str(dump)],
                          check=True, capture_output=True, text=True)
    with np.load(dump) as data:
        ours = {k: data[k] for k in data.files}
    return to_their_layout(ours), done.stdout.split()[-1]


def voice_prompt(model, voice_codes: np.ndarray, folder: Path) -> Path:
    """Their voice phase on `voice_codes` [8, V] with save_voice_prompt_embeddings: their own
    code writes the .pt (their Mimi encoding is replaced by these codes, one frame a step)."""
    from moshi.models.lm import LMGen

    gen = LMGen(model, device="cpu", use_sampling=False, sample_rate=24000, frame_rate=12.5,
                save_voice_prompt_embeddings=True)
    gen.voice_prompt = str(folder / "voice.wav")  # their code saves beside it, as voice.pt
    gen.voice_prompt_audio = np.zeros((1, 1920 * voice_codes.shape[1]), dtype=np.float32)
    frames = [torch.tensor(voice_codes[:, i], dtype=torch.long).view(1, 8, 1)
              for i in range(voice_codes.shape[1])]
    gen._encode_voice_prompt_frames = lambda mimi: iter(frames)
    with torch.no_grad(), gen.streaming(1):
        for _ in gen._step_voice_prompt_core(None):
            pass
    return folder / "voice.pt"


def odd_tensors() -> dict:
    """A .pt of the kinds a reader must get right besides the voices' (bf16, half, a strided
    view with an offset, a list, a plain number)."""
    generator = torch.Generator().manual_seed(5)
    base = torch.arange(24, dtype=torch.int32).view(2, 3, 4)
    return {"bf16": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
            "half": torch.randn(3, generator=generator).to(torch.float16),
            "view": base.transpose(1, 2)[:, 1:], "list": [torch.ones(2, dtype=torch.bool)],
            "number": 7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--voice", type=Path, required=True, help="the saved voice (.pt)")
    parser.add_argument("--odd", type=Path, required=True, help="the .pt of other tensors")
    parser.add_argument("--our-python", default="/work/main/.venv/bin/python",
                        help="the python of a venv with this package (for the q4 / q8 files)")
    parser.add_argument("--tokenizer", type=Path, default=Path("tests/fixtures/tokenizer.model"))
    args = parser.parse_args()
    import sentencepiece
    from moshi.offline import wrap_with_system_tags
    from safetensors.torch import load_file

    torch.manual_seed(0)
    user_codes = np.random.default_rng(USER_SEED).integers(0, 2048, (CALLS, 8), dtype=np.int32)
    result: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "model.safetensors"
        sha = personaplex_random.write(weights)
        result.update(run(build_model(load_file(str(weights))), user_codes))
        for bits in (4, 8):
            state, result[f"q{bits}_sha256"] = quantized_state(Path(folder), weights, bits,
                                                                args.our_python)
            for key, value in run(build_model(state), user_codes).items():
                result[f"q{bits}_{key}"] = value
        voice_codes = np.random.default_rng(VOICE_SEED).integers(0, 2048, (8, VOICE_FRAMES),
                                                                 dtype=np.int32)
        saved = voice_prompt(build_model(load_file(str(weights))), voice_codes, Path(folder))
        voice = torch.load(saved)
        args.voice.write_bytes(saved.read_bytes())
        result.update(voice_codes=voice_codes, voice_embeddings=voice["embeddings"].numpy(),
                      voice_cache=voice["cache"].numpy())
        prompt = wrap_with_system_tags(PROMPT_TEXT)
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer))
        prompt_tokens = tokenizer.encode(prompt)
        result.update(prompt_text=PROMPT_TEXT, prompt_wrapped=prompt,
                      prompt_tokens=np.array(prompt_tokens, dtype=np.int32))
        for name, voice_file in (("prompted", None), ("voiced", saved)):
            runs = run(build_model(load_file(str(weights))), user_codes, prompt_tokens,
                       voice_file)
            result.update({f"{name}_{key}": value for key, value in runs.items()})
            result[f"{name}_calls"] = len(runs["text"]) - CALLS
    odd = odd_tensors()
    torch.save(odd, args.odd)
    result.update(odd_bf16=odd["bf16"].float().numpy(), odd_half=odd["half"].numpy(),
                  odd_view=odd["view"].numpy(), odd_list=odd["list"][0].numpy())
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
