"""The batched-generation golden of the CSM fixture: transformers' own batched `generate` on
the fixture's transformers-layout weights, float32, greedy.

Run in a venv with CPU torch + transformers + numpy + safetensors (not ours: the package never
imports torch; made with torch 2.13.0+cpu and transformers 5.24.0, the fixture's versions),
from the repository root:

    /work/tfvenv/bin/python tools/derive_csm_batch_golden.py \
        --fixtures /work/shared/fixtures/csm --out tests/fixtures/csm/csm_batch_golden.npz

--fixtures is the full CSM fixture folder (FIXTURES.md there): hf/ (weights with their tiny
codec, processor files) and context_speech.wav. Three conversations go through
`CsmProcessor.apply_chat_template` as ONE batch (left-padded by the processor) and one
`CsmForConditionalGeneration.generate(do_sample=False, depth_decoder_do_sample=False)`:

- a: speaker 0 "Hello from Sesame." (no context; the fixture's weights end it by the all-zero
  frame after 10 frames: the row that finishes early);
- b: the fixture's prompt b (a context turn of speaker 1 with the whole clip, 39 frames);
- c: a context turn of speaker 0 with the clip's first 15 frames, then a short text.

Written (codes only): per conversation `{name}_frames` int32 [F, 32] (up to, not including, the
first all-zero frame), `{name}_stop` ("eos" or "max"), `{name}_context_codes` int32 [32, T]
(what transformers' codec made of that conversation's context audio: our runs take these
codes), `{name}_text`, `{name}_speaker`, `{name}_context_text`, `{name}_context_speaker`;
`max_new_tokens`, `padded_lengths` (the prompt length of each row). Each conversation is also
generated alone; the script stops if a batched row differs from its single run, or if the
codec's codes of the whole clip differ from the fixture's `context_codes` in the first 6
codebooks. (The later codebooks differ from the fixture's: it made its codes by a route not
recorded in its notes; the report gives the share equal per codebook. Every run here takes the
codes written in this golden, so that does not matter.)

Workaround: transformers 5.24's CsmProcessor passes `pad_to_multiple_of` to its
EncodecFeatureExtractor, which refuses that keyword (TypeError): the script drops that one
keyword before the feature extractor sees it. Nothing else of transformers is changed.
"""

from __future__ import annotations

import argparse
import json
import time
import wave
from pathlib import Path

import numpy as np
import torch

MAX_NEW_TOKENS = 16
CLIP_FRAMES_C = 15
SAMPLES_PER_FRAME = 1920
CONTEXT_TEXT = "The quick brown fox jumps over the lazy dog."
CONVERSATIONS = {
    "a": dict(speaker=0, text="Hello from Sesame.", context=None),
    "b": dict(speaker=1, text="Numbers like seven and twelve are spoken slowly.",
              context=dict(speaker=1, text=CONTEXT_TEXT, frames=None)),
    "c": dict(speaker=0, text="Seven and twelve.",
              context=dict(speaker=0, text="The quick brown fox.", frames=CLIP_FRAMES_C)),
}


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1 or f.getframerate() != 24000:
            raise SystemExit(f"{path}: expected 24 kHz mono 16-bit")
        data = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return data.astype(np.float32) / 32768.0


def conversation(spec: dict, clip: np.ndarray) -> tuple[list[dict], np.ndarray | None]:
    turns, audio = [], None
    ctx = spec["context"]
    if ctx is not None:
        audio = clip if ctx["frames"] is None else clip[: ctx["frames"] * SAMPLES_PER_FRAME]
        turns.append({"role": str(ctx["speaker"]),
                      "content": [{"type": "text", "text": ctx["text"]},
                                  {"type": "audio", "audio": audio}]})
    turns.append({"role": str(spec["speaker"]),
                  "content": [{"type": "text", "text": spec["text"]}]})
    return turns, audio


def frames_of(sequence: np.ndarray) -> tuple[np.ndarray, str]:
    """A row of `sequences` [steps, 32] -> frames before the first all-zero frame, stop."""
    zero = np.flatnonzero(~sequence.any(axis=1))
    if zero.size:
        return sequence[: zero[0]], "eos"
    return sequence, "max"


def drop_pad_to_multiple_of(processor) -> None:
    extractor = processor.feature_extractor
    base = type(extractor)

    class Extractor(base):
        def __call__(self, audio, **kwargs):
            kwargs.pop("pad_to_multiple_of", None)
            return base.__call__(self, audio, **kwargs)

    extractor.__class__ = Extractor


def generate(model, processor, convs: list[list[dict]]) -> np.ndarray:
    inputs = processor.apply_chat_template(convs, tokenize=True, return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             depth_decoder_do_sample=False)
    return out.numpy().astype(np.int32), inputs["input_ids"].shape[1], inputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import transformers
    from transformers import AutoProcessor, CsmForConditionalGeneration

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf = args.fixtures / "hf"
    model = CsmForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(hf)
    drop_pad_to_multiple_of(processor)
    clip = read_wav(args.fixtures / "context_speech.wav")
    with np.load(args.fixtures / "csm_golden.npz") as golden:
        fixture_codes = golden["context_codes"]

    out: dict[str, np.ndarray] = {"max_new_tokens": np.int32(MAX_NEW_TOKENS)}
    convs = []
    for name, spec in CONVERSATIONS.items():
        turns, audio = conversation(spec, clip)
        convs.append(turns)
        out[f"{name}_text"] = np.str_(spec["text"])
        out[f"{name}_speaker"] = np.int32(spec["speaker"])
        ctx = spec["context"]
        out[f"{name}_context_text"] = np.str_(ctx["text"] if ctx else "")
        out[f"{name}_context_speaker"] = np.int32(ctx["speaker"] if ctx else -1)
        if audio is None:
            codes = np.zeros((32, 0), np.int32)
        else:
            with torch.no_grad():
                enc = model.codec_model.encode(torch.from_numpy(audio)[None, None])
            codes = enc.audio_codes[0].numpy().astype(np.int32)
        out[f"{name}_context_codes"] = codes
        if ctx is not None and ctx["frames"] is None:
            same = (codes == fixture_codes).mean(axis=1)
            if not same[:6].all():
                raise SystemExit("the codec's codes of the whole clip differ from the fixture's")
            whole_clip_agreement = [round(float(x), 3) for x in same]

    started = time.perf_counter()
    batched, width, inputs = generate(model, processor, convs)
    batch_s = time.perf_counter() - started
    out["padded_lengths"] = inputs["attention_mask"].sum(dim=1).numpy().astype(np.int32)
    report = {"transformers": transformers.__version__, "torch": torch.__version__,
              "batch_generate_s": round(batch_s, 3), "padded_width": int(width),
              "whole_clip_codes_equal_to_fixture_per_codebook": whole_clip_agreement,
              "rows": {}}
    for row, name in enumerate(CONVERSATIONS):
        frames, stop = frames_of(batched[row])
        single, _, _ = generate(model, processor, [convs[row]])
        single_frames, single_stop = frames_of(single[0])
        if stop != single_stop or not np.array_equal(frames, single_frames):
            raise SystemExit(f"row {name}: batched generate differs from its single run")
        out[f"{name}_frames"], out[f"{name}_stop"] = frames, np.str_(stop)
        report["rows"][name] = {"frames": len(frames), "stop": stop,
                                "prompt": int(out["padded_lengths"][row]),
                                "context_frames": int(out[f"{name}_context_codes"].shape[1])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
