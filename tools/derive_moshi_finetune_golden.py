"""Goldens of Moshi fine-tuning: kyutai-labs/moshi-finetune's loss, data and LoRA on the tiny
Moshi fixture, written to tests/fixtures/moshi_finetune_golden.npz (checked by
tests/test_moshi_finetune.py).

Run in /work/ftvenv (python3 -m venv; a .pth file naming /work/tfvenv's site-packages for
torch 2.13.0+cpu; `pip install moshi==0.2.13 --no-deps` (the fixtures' version), einops,
sentencepiece, sphn==0.1.12 (moshi-finetune's pin); moshi-finetune's source (commit 2acc879)
on the path), from the repository root:

    /work/ftvenv/bin/python tools/derive_moshi_finetune_golden.py \
        --fixtures tests/fixtures --out tests/fixtures/moshi_finetune_golden.npz

What it records (everything float32 on the PyTorch side):

- loss: a batch of 2 x T codes [2, 17, T] built from the stored codes of lm_golden.npz (text
  with PAD / EPAD put in, the second row ending in -1 audio padding and -1 text), run through
  Kyutai's `LMModel.forward` (lm_pytorch.safetensors loaded as float32) and moshi-finetune's
  `compute_loss_with_mask` exactly as its train.py calls it; `text_loss`, `audio_loss`, `loss`
  per weight setting (`(0.5, 1.0)`: moshi-finetune's defaults; `(0.5, 100.0)`: its 7B
  example), and d loss / d W of a few Linear weights: rows `GRAD_ROWS` of each, and the whole
  gradient projected on a seeded Gaussian matrix (`grad_probe_seed`), a scalar.
- interleaver: moshi-finetune's `Interleaver` (keep_main_only, as train.py builds it) on the
  fixture's tokenizer.model, for the alignment cases of `INTERLEAVER_CASES` (the fixture's
  tokenizer has no newline piece, which moshi-finetune's `tokenize` reads first: the script
  answers that one query with <unk>; no word here contains a newline).
- chunks: `sphn.dataset_jsonl(duration_sec, pad_last_segment=True)` on silent WAVs of the
  sizes of `WAV_SPECS`, for each of `CHUNK_RUNS` (start times, unpadded lengths) and the text
  stream that moshi-finetune's `InterleavedTokenizer` makes of each chunk (a stand-in Mimi
  that returns ceil(n / 1920) frames of zeros: only the frame count matters for the text;
  `.cuda()` is made a no-op).
- lora: the fixture wrapped by `moshi.models.loaders.get_moshi_lm(lora=True)` (Kyutai's
  `LoRALinear` on every Linear, not fused) with the seeded LoRA of `lora_tensors` (rank
  `LORA_RANK`, scaling `LORA_SCALING`); its loss parts at the default weights and some logit
  rows (text at `LOGIT_ROWS`, audio there for `LOGIT_CODEBOOKS`); `lora_digest` identifies
  the LoRA tensors (sha256 over names, shapes and bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch

T = 24
PAD, EPAD = 3, 0
WEIGHT_SETTINGS = {"default": (0.5, 1.0), "7b": (0.5, 100.0)}
GRAD_ROWS = (5, 63)
GRAD_PROBE_SEED = 1234
# Kyutai's parameter name -> ours (checked by the test through our names).
GRAD_WEIGHTS = {
    "transformer.layers.0.self_attn.in_projs.0.weight":
        "transformer.layers.0.self_attn.in_proj.weight",
    "transformer.layers.1.gating.linear_out.weight":
        "transformer.layers.1.gating.linear_out.weight",
    "text_linear.weight": "text_linear.weight",
    "depformer_in.2.weight": "depformer.slices.2.linear_in.weight",
    "depformer.layers.1.self_attn.in_projs.3.weight":
        "depformer.slices.3.transformer.layers.1.self_attn.in_proj.weight",
    "depformer.layers.0.gating.5.linear_in.weight":
        "depformer.slices.5.transformer.layers.0.gating.linear_in.weight",
    "linears.7.weight": "depformer.slices.7.linear_out.weight",
}
LORA_RANK, LORA_SCALING, LORA_SEED = 4, 2.0, 7
LOGIT_ROWS = ((0, 3), (1, 10))  # (batch row, time step) of the text / audio logits kept
LOGIT_CODEBOOKS = (5,)  # the audio logits kept at those steps

# (name, alignments, frames): word, [start, end] seconds, speaker.
INTERLEAVER_CASES = [
    ("gaps", [["hello", [0.0, 0.4], "SPEAKER_MAIN"], ["world", [1.0, 1.5], "SPEAKER_MAIN"]], 25),
    ("cut_short", [["extraordinarily", [0.1, 0.3], "SPEAKER_MAIN"],
                   ["quick", [0.2, 0.5], "SPEAKER_MAIN"], ["end", [0.9, 1.0], "SPEAKER_MAIN"]], 16),
    ("same_frame", [["a", [0.30, 0.35], "SPEAKER_MAIN"], ["b", [0.32, 0.6], "SPEAKER_MAIN"]], 10),
    ("speakers_and_durations", [["mine", [0.0, 0.3], "SPEAKER_MAIN"],
                                ["yours", [0.4, 0.8], "SPEAKER_OTHER"],
                                ["zero", [0.9, 0.9], "SPEAKER_MAIN"],
                                ["back", [1.04, 1.2], "SPEAKER_MAIN"]], 20),
    ("boundary_and_unsorted", [["later", [0.8, 1.0], "SPEAKER_MAIN"],
                               ["first", [0.08, 0.16], "SPEAKER_MAIN"],
                               ["past", [1.9, 2.5], "SPEAKER_MAIN"]], 12),
    ("empty", [], 8),
    ("empty_words", [["extraordinarily", [0.0, 0.5], "SPEAKER_MAIN"],
                     ["", [0.2, 0.3], "SPEAKER_MAIN"], [" ", [0.5, 0.6], "SPEAKER_MAIN"],
                     ["ok", [0.7, 0.8], "SPEAKER_MAIN"]], 15),
]
# (name, sample rate, samples, alignments of the left channel)
WAV_SPECS = [
    ("a", 24000, 24000 * 2 + 5000, [["one", [0.1, 0.5], "SPEAKER_MAIN"],
                                     ["two", [0.66, 0.9], "SPEAKER_MAIN"],
                                     ["three", [1.5, 1.9], "SPEAKER_MAIN"],
                                     ["four", [2.05, 2.3], "SPEAKER_MAIN"],
                                     ["after", [2.5, 2.9], "SPEAKER_MAIN"]]),
    ("b", 24000, 24000 + 1000, [["solo", [0.2, 0.6], "SPEAKER_MAIN"],
                                ["other", [0.3, 0.5], "SPEAKER_OTHER"]]),
    # A last chunk of one frame in a long chunk: moshi-finetune's text turns -1 after 13 frames.
    ("c", 24000, 24000 * 2 + 1000, [["early", [0.3, 0.6], "SPEAKER_MAIN"],
                                    ["late", [2.6, 2.9], "SPEAKER_MAIN"]]),
]
CHUNK_RUNS = [(0.7, ("a", "b")), (2.0, ("c",))]  # (duration_sec, files of the .jsonl)


def lora_names(cfg: dict) -> list[tuple[str, int, int]]:
    """Every Linear that Kyutai's LoRA wraps in the fixture: (module name, in, out)."""
    dim, dep_dim, q = cfg["dim"], cfg["depformer_dim"], cfg["dep_q"]
    hidden = 21 * dim // 8 if 4 * dim == int(cfg["hidden_scale"] * dim) else \
        int(2 * cfg["hidden_scale"] * dim / 3)
    dep_hidden = 2 * cfg["depformer_dim_feedforward"] // 3
    out = []
    for layer in range(cfg["num_layers"]):
        base = f"transformer.layers.{layer}"
        out += [(f"{base}.self_attn.in_projs.0", dim, 3 * dim),
                (f"{base}.self_attn.out_projs.0", dim, dim),
                (f"{base}.gating.linear_in", dim, 2 * hidden),
                (f"{base}.gating.linear_out", hidden, dim)]
    out.append(("text_linear", dim, cfg["text_card"]))
    for k in range(q):
        out += [(f"depformer_in.{k}", dim, dep_dim), (f"linears.{k}", dep_dim, cfg["card"])]
    for layer in range(cfg["depformer_num_layers"]):
        base = f"depformer.layers.{layer}"
        for k in range(q):
            out += [(f"{base}.self_attn.in_projs.{k}", dep_dim, 3 * dep_dim),
                    (f"{base}.self_attn.out_projs.{k}", dep_dim, dep_dim),
                    (f"{base}.gating.{k}.linear_in", dep_dim, 2 * dep_hidden),
                    (f"{base}.gating.{k}.linear_out", dep_hidden, dep_dim)]
    return out


def lora_tensors(cfg: dict) -> dict[str, np.ndarray]:
    """The seeded LoRA (float32): A [r, in], B [out, r], both small Gaussians."""
    rng = np.random.default_rng(LORA_SEED)
    tensors = {}
    for name, fan_in, fan_out in lora_names(cfg):
        tensors[f"{name}.lora_A.weight"] = (
            0.1 * rng.standard_normal((LORA_RANK, fan_in))).astype(np.float32)
        tensors[f"{name}.lora_B.weight"] = (
            0.1 * rng.standard_normal((fan_out, LORA_RANK))).astype(np.float32)
    return tensors


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        digest.update(f"{name}{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def batch_codes(golden: dict) -> np.ndarray:
    """[2, 17, T]: text / Moshi's audio / the user's audio of the stored greedy run."""
    rows = []
    for start in (0, 14):
        text = golden["torch_f32_text"][start:start + T].astype(np.int64)
        audio = golden["torch_f32_audio_raw"][start:start + T].T.astype(np.int64)
        user = golden["user_codes"][:, start:start + T].astype(np.int64)
        rows.append(np.concatenate([text[None], audio, user], axis=0))
    codes = np.stack(rows)
    codes[0, 0, [2, 3, 4, 9, 15]] = PAD
    codes[0, 0, [5, 16]] = EPAD
    codes[1, 0, [0, 1, 7]] = PAD
    codes[1, 0, [8]] = EPAD
    codes[1, 0, T - 2:] = -1  # text zero padding
    codes[1, 1:, T - 5:] = -1  # audio zero padding (a padded last chunk)
    return codes


def loss_parts(model, codes: torch.Tensor, text_padding_weight: float,
               first_codebook_weight_multiplier: float):
    from finetune.loss import compute_loss_with_mask

    output = model(codes=codes, condition_tensors=None)
    text_loss = compute_loss_with_mask(
        output.text_logits, codes[:, : model.audio_offset], output.text_mask, mode="text",
        text_padding_weight=text_padding_weight,
        text_padding_ids={model.text_padding_token_id, model.end_of_text_padding_id})
    audio_loss = compute_loss_with_mask(
        output.logits, codes[:, model.audio_offset: model.audio_offset + model.dep_q],
        output.mask, mode="audio",
        first_codebook_weight_multiplier=first_codebook_weight_multiplier)
    return output, text_loss, audio_loss


def derive_loss(fixtures: Path, cfg: dict, out: dict) -> None:
    from moshi.models import loaders

    golden = dict(np.load(fixtures / "lm_golden.npz"))
    model = loaders.get_moshi_lm(str(fixtures / "lm_pytorch.safetensors"), lm_kwargs=dict(cfg),
                                 device="cpu", dtype=torch.float32)
    model.train()
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    codes_np = batch_codes(golden)
    codes = torch.from_numpy(codes_np)
    out["codes"] = codes_np.astype(np.int32)
    for key, (tpw, fcm) in WEIGHT_SETTINGS.items():
        model.zero_grad()
        output, text_loss, audio_loss = loss_parts(model, codes, tpw, fcm)
        loss = text_loss + audio_loss
        loss.backward()
        out[f"{key}_text_loss"] = np.float64(text_loss.item())
        out[f"{key}_audio_loss"] = np.float64(audio_loss.item())
        out[f"{key}_loss"] = np.float64(loss.item())
        out[f"{key}_n_targets"] = np.int64(output.text_mask.sum() + output.mask.sum())
        for index, name in enumerate(GRAD_WEIGHTS):
            grad = params[name].grad.detach().numpy().astype(np.float64)
            probe = np.random.default_rng(GRAD_PROBE_SEED + index).standard_normal(grad.shape)
            out[f"{key}_grad{index}_rows"] = grad[list(GRAD_ROWS)].astype(np.float32)
            out[f"{key}_grad{index}_probe"] = np.float64((grad * probe).sum())
    out["grad_kyutai_names"] = np.array(list(GRAD_WEIGHTS))
    out["grad_our_names"] = np.array(list(GRAD_WEIGHTS.values()))
    out["grad_rows"] = np.array(GRAD_ROWS)
    out["grad_probe_seed"] = np.int64(GRAD_PROBE_SEED)


def derive_lora(fixtures: Path, cfg: dict, out: dict) -> None:
    from moshi.models import loaders
    from moshi.modules.lora import LoRALinear
    from safetensors.numpy import save_file

    tensors = lora_tensors(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(tensors, str(path))
        kwargs = dict(cfg, lora=True, lora_rank=LORA_RANK, lora_scaling=LORA_SCALING)
        model = loaders.get_moshi_lm(str(fixtures / "lm_pytorch.safetensors"), lm_kwargs=kwargs,
                                     device="cpu", dtype=torch.float32, lora_weights=str(path),
                                     fuse_lora=False)
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected = {name for name, _, _ in lora_names(cfg)}
    if wrapped != expected:
        raise SystemExit(f"LoRA-wrapped modules differ: {sorted(wrapped ^ expected)}")
    codes = torch.from_numpy(out["codes"].astype(np.int64))
    with torch.no_grad():
        output, text_loss, audio_loss = loss_parts(model, codes, *WEIGHT_SETTINGS["default"])
    out["lora_text_loss"] = np.float64(text_loss.item())
    out["lora_audio_loss"] = np.float64(audio_loss.item())
    out["lora_logit_rows"] = np.array(LOGIT_ROWS)
    out["lora_logit_codebooks"] = np.array(LOGIT_CODEBOOKS)
    out["lora_text_logits"] = np.stack(
        [output.text_logits[b, 0, t].numpy() for b, t in LOGIT_ROWS]).astype(np.float32)
    out["lora_audio_logits"] = np.stack(
        [output.logits[b, list(LOGIT_CODEBOOKS), t].numpy() for b, t in LOGIT_ROWS]
    ).astype(np.float32)
    out["lora_rank"], out["lora_scaling"] = np.int64(LORA_RANK), np.float64(LORA_SCALING)
    out["lora_digest"] = np.array(tensors_digest(tensors))


def make_interleaver(fixtures: Path):
    import sentencepiece
    from finetune.data.interleaver import Interleaver

    class NewlineTolerant(sentencepiece.SentencePieceProcessor):
        # moshi-finetune's `tokenize` reads the newline piece as encode("\n")[-1]; the
        # fixture's tokenizer encodes "\n" to nothing. No word here holds a newline, so the
        # piece is never used: any id will do.
        def encode(self, text, **kwargs):
            if text == "\n":
                return [self.unk_id()]
            return super().encode(text, **kwargs)

    spm = NewlineTolerant(model_file=str(fixtures / "tokenizer.model"))
    return Interleaver(spm, 12.5, PAD, EPAD, -1, keep_main_only=True, device="cpu")


def derive_interleaver(fixtures: Path, out: dict) -> None:
    interleaver = make_interleaver(fixtures)
    for name, alignments, frames in INTERLEAVER_CASES:
        aligned = [(w, tuple(ts), s) for w, ts, s in alignments]
        stream = interleaver.build_token_stream(
            interleaver._keep_those_with_duration(interleaver._keep_main_only(
                interleaver._tokenize(sorted(aligned, key=lambda a: a[1][0])), "SPEAKER_MAIN")),
            frames / 12.5)
        stream_via_item = interleaver.prepare_item(aligned, frames / 12.5)
        assert torch.equal(stream, stream_via_item)
        assert stream.numel() == frames, (name, stream.numel())  # frames / 12.5 * 12.5 exact
        out[f"interleave_{name}"] = stream.view(-1).numpy().astype(np.int32)
    out["interleave_cases"] = np.array(json.dumps(INTERLEAVER_CASES))


class _FrameCountMimi:
    """What InterleavedTokenizer needs of Mimi to make the text: the frame count."""

    frame_rate = 12.5
    sample_rate = 24000

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        frames = math.ceil(pcm.shape[-1] / 1920)
        return torch.zeros(pcm.shape[0], 8, frames, dtype=torch.long)


def derive_chunks(fixtures: Path, out: dict) -> None:
    import sphn
    from finetune.data.interleaver import InterleavedTokenizer

    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU only: the tokenizer calls .cuda()
    specs = {name: (rate, samples, alignments) for name, rate, samples, alignments in WAV_SPECS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (rate, samples, alignments) in specs.items():
            with wave.open(str(Path(tmp) / f"{name}.wav"), "wb") as f:
                f.setnchannels(2)
                f.setsampwidth(2)
                f.setframerate(rate)
                f.writeframes(np.zeros((samples, 2), "<i2").tobytes())
            (Path(tmp) / f"{name}.json").write_text(json.dumps({"alignments": alignments}))
        for run, (duration_sec, names) in enumerate(CHUNK_RUNS):
            tokenizer = InterleavedTokenizer(_FrameCountMimi(), make_interleaver(fixtures),
                                             duration_sec=duration_sec)
            jsonl = Path(tmp) / f"run{run}.jsonl"
            jsonl.write_text("".join(json.dumps({"path": f"{name}.wav",
                                                 "duration": specs[name][1] / specs[name][0]})
                                     + "\n" for name in names))
            dataset = sphn.dataset_jsonl(str(jsonl), duration_sec=duration_sec, num_threads=1,
                                         sample_rate=24000, pad_last_segment=True)
            for sample in dataset.seq(skip=0, step_by=1):
                wav = sample["data"][..., : sample["unpadded_len"]]
                codes = tokenizer(wav, sample["start_time_sec"], sample["path"]).codes
                index = len(rows)
                rows.append((run, Path(sample["path"]).stem, sample["start_time_sec"],
                             sample["unpadded_len"]))
                out[f"chunk{index}_text"] = codes[0, 0].numpy().astype(np.int32)
                out[f"chunk{index}_audio_pad"] = (codes[0, 1:] == -1).numpy().all(0)
    out["chunks"] = np.array(json.dumps(rows))
    out["chunk_runs"] = np.array(json.dumps(CHUNK_RUNS))
    out["wav_specs"] = np.array(json.dumps(WAV_SPECS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", type=Path, default=Path("tests/fixtures"))
    parser.add_argument("--out", type=Path,
                        default=Path("tests/fixtures/moshi_finetune_golden.npz"))
    args = parser.parse_args()
    from importlib.metadata import version

    import moshi

    torch.manual_seed(0)
    cfg = json.loads((args.fixtures / "lm_config.json").read_text())
    out: dict = {}
    derive_loss(args.fixtures, cfg, out)
    derive_lora(args.fixtures, cfg, out)
    derive_interleaver(args.fixtures, out)
    derive_chunks(args.fixtures, out)
    out["versions"] = np.array(json.dumps({
        "torch": torch.__version__, "moshi": moshi.__version__, "sphn": version("sphn"),
        "moshi_finetune": "2acc879fe7c48f885a18f6cc9548bccb2674d87b"}))
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    for key in ("default_loss", "default_text_loss", "default_audio_loss", "7b_loss",
                "lora_text_loss", "lora_audio_loss"):
        print(key, float(out[key]))


if __name__ == "__main__":
    main()
