"""The CSM fine-tuning golden: transformers' training loss of `CsmForConditionalGeneration`
(backbone loss, depth decoder loss, their sum) on the fixture's transformers-layout weights,
float32, for a batch of two conversations, and the gradients of LoRA leaves put on chosen
linear layers.

Run in a venv with CPU torch + transformers + numpy + safetensors + tokenizers (not ours: the
package never imports torch; made with torch 2.13.0+cpu and transformers 5.24.0, the fixture's
versions), from the repository root:

    /work/tfvenv/bin/python tools/derive_csm_finetune_golden.py \
        --fixtures /work/shared/fixtures/csm --out tests/fixtures/csm/csm_finetune_golden.npz

The batch (right-padded, attention mask 0 on the padding):
- conversation 0: speaker 0 "Hello from Sesame." + 6 frames, speaker 1 "Numbers like seven."
  + 5 frames;
- conversation 1: speaker 1 "The quick brown fox." + 8 frames.
Codes are seeded random Mimi codes (numpy default_rng(0)). Each turn is, as transformers'
processor lays it out (`<|begin_of_text|>[speaker]text<|end_of_text|>` then one `<|AUDIO|>` row
per frame then one `<|audio_eos|>` row): text rows embedded by `embed_text_tokens`, audio rows
and the all-zero end-of-audio row by `backbone_model.embed_tokens` (what
`_merge_input_ids_with_input_values` does). Labels [B, S, 32] follow the processor and the
merge: text rows -100, audio rows their codes, end-of-audio rows 0; with
`depth_decoder_labels_ratio` 0.5, int(n * 0.5) of the n audio frames of the batch, drawn by
torch.randperm (seed 0) as the processor draws them, keep codebook 0 and leave the depth loss
(-100 in codebooks 1..31). These go to `model(inputs_embeds=..., attention_mask=...,
labels=...)`, transformers' own loss.

LoRA (this script's few lines, on transformers' modules): y = base(x) + scale * (x @ A @ B), A
[in, r], B [r, out] fixed (seeded normal, B nonzero), in OUR module naming and row order: our
`attn.qkv_proj` is q, k, v stacked on Sesame's interleaved RoPE rows, so its one A and B feed
transformers' q_proj, k_proj and v_proj, the q and k columns reordered to transformers' rotated
halves (permute_for_rope). After backward, the gradients of A and B are written.

Written: `tokens`, `mask` int32/bool [B, S, 33] (our frame rows), `labels` int32 [B, S, 32],
`depth_dropped` bool [B, S], `lengths`, `full_loss`, `full_backbone_loss`,
`full_depth_decoder_loss` (the same batch and LoRA with every frame in the depth loss), the
conversations (`conv{i}_turn{j}_{speaker,text,codes}`), `loss`, `backbone_loss`,
`depth_decoder_loss`, `lora_rank`, `lora_scale`, `lora_paths`, and per path
`{path}.lora_a`, `.lora_b`, `.grad_lora_a`, `.grad_lora_b`; `versions` and the sha256 of
hf/model.safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

CONVERSATIONS = [
    [(0, "Hello from Sesame.", 6), (1, "Numbers like seven.", 5)],
    [(1, "The quick brown fox.", 8)],
]
DEPTH_RATIO = 0.5
RANK, SCALE = 4, 2.0
K = 32
TARGETS = [
    "backbone.layers.0.attn.qkv_proj",
    "backbone.layers.1.attn.out_proj",
    "backbone.layers.1.mlp.gate_proj",
    "backbone.layers.0.mlp.down_proj",
    "decoder.layers.1.attn.qkv_proj",
    "decoder.layers.0.mlp.up_proj",
    "projection",
]


def hf_module(model, path: str):
    """Our module path -> transformers' module (or the three q, k, v for qkv_proj)."""
    parts = path.split(".")
    if path == "projection":
        return model.depth_decoder.model.inputs_embeds_projector
    stack = model.backbone_model if parts[0] == "backbone" else model.depth_decoder.model
    layer = stack.layers[int(parts[2])]
    if parts[3] == "attn":
        attn = layer.self_attn
        if parts[4] == "qkv_proj":
            return attn.q_proj, attn.k_proj, attn.v_proj
        return attn.o_proj
    return getattr(layer.mlp, parts[4])


def hf_rows_from_ours(heads: int, head_dim: int) -> np.ndarray:
    """index[i] = our (interleaved) row that transformers' (rotated halves) row i holds."""
    index = np.empty(heads * head_dim, np.int64)
    half = head_dim // 2
    for h in range(heads):
        for j in range(2):
            for i in range(half):
                index[h * head_dim + j * half + i] = h * head_dim + 2 * i + j
    return index


def attach_lora(model, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
    target = hf_module(model, path)

    def hook_for(columns: torch.Tensor | slice):
        def hook(module, inputs, output):
            delta = (inputs[0] @ a) @ b
            return output + SCALE * delta[..., columns]
        return hook

    if not isinstance(target, tuple):
        target.register_forward_hook(hook_for(slice(None)))
        return
    q, k, v = target
    cfg = q.weight.shape[0], k.weight.shape[0]
    attn = (model.backbone_model if path.startswith("backbone") else
            model.depth_decoder.model).layers[0].self_attn
    head_dim = attn.head_dim
    q_rows = torch.from_numpy(hf_rows_from_ours(cfg[0] // head_dim, head_dim))
    k_rows = torch.from_numpy(hf_rows_from_ours(cfg[1] // head_dim, head_dim)) + cfg[0]
    v_rows = torch.arange(cfg[0] + cfg[1], cfg[0] + 2 * cfg[1])
    for module, rows in ((q, q_rows), (k, k_rows), (v, v_rows)):
        module.register_forward_hook(hook_for(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import tokenizers
    import transformers
    from transformers import CsmForConditionalGeneration

    torch.set_num_threads(1)
    hf = args.fixtures / "hf"
    model = CsmForConditionalGeneration.from_pretrained(
        hf, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = tokenizers.Tokenizer.from_file(str(hf / "tokenizer.json"))
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|end_of_text|>")
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}

    rows, labels, audio_rows = [], [], []
    for c, turns in enumerate(CONVERSATIONS):
        conv_rows, conv_labels, conv_audio = [], [], []
        for t, (speaker, text, frames) in enumerate(turns):
            codes = rng.integers(0, 2048, (K, frames)).astype(np.int32)
            out[f"conv{c}_turn{t}_speaker"] = np.int32(speaker)
            out[f"conv{c}_turn{t}_text"] = np.str_(text)
            out[f"conv{c}_turn{t}_codes"] = codes
            ids = [bos, *tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids,
                   eos]
            for token in ids:
                conv_rows.append(("text", token))
                conv_labels.append(np.full(K, -100, np.int64))
                conv_audio.append(False)
            for f in range(frames):
                conv_rows.append(("audio", codes[:, f]))
                conv_labels.append(codes[:, f].astype(np.int64))
                conv_audio.append(True)
            conv_rows.append(("audio", np.zeros(K, np.int32)))  # end of audio
            conv_labels.append(np.zeros(K, np.int64))
            conv_audio.append(False)
        rows.append(conv_rows)
        labels.append(conv_labels)
        audio_rows.append(conv_audio)

    lengths = [len(r) for r in rows]
    batch, steps = len(rows), max(lengths)
    tokens = np.zeros((batch, steps, K + 1), np.int32)
    mask = np.zeros((batch, steps, K + 1), bool)
    label_array = np.full((batch, steps, K), -100, np.int64)
    is_audio = np.zeros((batch, steps), bool)
    for b in range(batch):
        for s, (kind, value) in enumerate(rows[b]):
            if kind == "text":
                tokens[b, s, K], mask[b, s, K] = value, True
            else:
                tokens[b, s, :K], mask[b, s, :K] = value, True
            label_array[b, s] = labels[b][s]
            is_audio[b, s] = audio_rows[b][s]

    # the processor's draw: int(n * (1 - ratio)) audio frames of the whole batch leave the
    # depth loss (row-major order of (batch, position), as `.nonzero()` lists them)
    torch.manual_seed(0)
    frame_index = np.argwhere(is_audio)
    n = len(frame_index)
    drawn = torch.randperm(n)[: int(n * (1 - DEPTH_RATIO))].numpy()
    depth_dropped = np.zeros((batch, steps), bool)
    for b, s in frame_index[drawn]:
        depth_dropped[b, s] = True
    every_frame = label_array.copy()  # depth_decoder_labels_ratio 1.0: no frame left out
    label_array[depth_dropped, 1:] = -100

    with torch.no_grad():
        text_embeds = model.embed_text_tokens(torch.from_numpy(tokens[..., K].astype(np.int64)))
        audio_embeds = model.backbone_model.embed_tokens(
            torch.from_numpy(tokens[..., :K].astype(np.int64)))
    is_text = torch.from_numpy(mask[..., K])[..., None]
    embeds = torch.where(is_text, text_embeds, audio_embeds)
    attention = torch.from_numpy(np.arange(steps)[None, :] < np.array(lengths)[:, None]).long()
    embeds = embeds * attention[..., None]

    for param in model.parameters():
        param.requires_grad_(False)
    leaves = {}
    for path in TARGETS:
        target = hf_module(model, path)
        first = target[0] if isinstance(target, tuple) else target
        in_dim = first.weight.shape[1]
        out_dim = sum(m.weight.shape[0] for m in target) if isinstance(target, tuple) else (
            first.weight.shape[0])
        a = torch.tensor(rng.normal(0, in_dim ** -0.5, (in_dim, RANK)).astype(np.float32),
                         requires_grad=True)
        b = torch.tensor(rng.normal(0, 0.05, (RANK, out_dim)).astype(np.float32),
                         requires_grad=True)
        attach_lora(model, path, a, b)
        leaves[path] = (a, b)

    result = model(inputs_embeds=embeds, attention_mask=attention,
                   labels=torch.from_numpy(label_array))
    result.loss.backward()
    with torch.no_grad():
        full = model(inputs_embeds=embeds, attention_mask=attention,
                     labels=torch.from_numpy(every_frame))
    out.update(
        tokens=tokens, mask=mask, labels=label_array.astype(np.int32),
        depth_dropped=depth_dropped, lengths=np.array(lengths, np.int32),
        loss=np.float32(result.loss.item()),
        backbone_loss=np.float32(result.backbone_loss.item()),
        depth_decoder_loss=np.float32(result.depth_decoder_loss.item()),
        depth_ratio=np.float32(DEPTH_RATIO),
        full_loss=np.float32(full.loss.item()),
        full_backbone_loss=np.float32(full.backbone_loss.item()),
        full_depth_decoder_loss=np.float32(full.depth_decoder_loss.item()),
        lora_rank=np.int32(RANK),
        lora_scale=np.float32(SCALE), lora_paths=np.array(TARGETS),
        versions=np.str_(json.dumps({"torch": torch.__version__,
                                     "transformers": transformers.__version__})),
        hf_model_sha256=np.str_(hashlib.sha256((hf / "model.safetensors").read_bytes())
                                .hexdigest()),
    )
    for path, (a, b) in leaves.items():
        out[f"{path}.lora_a"] = a.detach().numpy()
        out[f"{path}.lora_b"] = b.detach().numpy()
        out[f"{path}.grad_lora_a"] = a.grad.numpy()
        out[f"{path}.grad_lora_b"] = b.grad.numpy()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(json.dumps({"loss": float(result.loss), "backbone_loss": float(result.backbone_loss),
                      "depth_decoder_loss": float(result.depth_decoder_loss),
                      "lengths": lengths, "depth_dropped": int(depth_dropped.sum()),
                      "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
