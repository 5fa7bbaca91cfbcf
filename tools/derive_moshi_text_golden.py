"""The text-only golden of the Moshi fixture: transformers' `MoshiForCausalLM` (the temporal
transformer alone, text tokens in, text logits out) on the tiny Moshi LM, float32, greedy.

Run with the reference venv (CPU torch + transformers + numpy; made with torch 2.13.0+cpu,
transformers 5.24.0 and sentencepiece 0.2.3), sentencepiece importable beside it (the venv has
none: `pip install --target /tmp/spdeps sentencepiece`), from the repository root:

    PYTHONPATH=/tmp/spdeps /work/tfvenv/bin/python tools/derive_moshi_text_golden.py \
        --out tests/fixtures/moshi_text_golden.npz

The weights: tests/transformers_layout.py rebuilds the `MoshiForConditionalGeneration` folder
of the tiny LM from tests/fixtures/lm_pytorch.safetensors (into tests/.cache, checked tensor by
tensor against the manifest of transformers' own conversion). It is loaded in float32 and its
`.decoder` is the text model: in transformers 5.x, `MoshiForCausalLM.from_pretrained` on a
full Moshi checkpoint leaves every weight uninitialised.

The prompts: each of PROMPTS encoded with tests/fixtures/tokenizer.model (SentencePiece), once
as it is and once after BOS. Each is continued by GREEDY_TOKENS tokens of this script's own
argmax loop over full forwards (no cache, no `generate()`: its pad_token_id equals the text
initial token and would mask such a token out of the attention).

Written, per case i: `{i}_text`, `{i}_bos` (bool), `{i}_prompt_ids` int32 [T], `{i}_tokens`
int32 [GREEDY_TOKENS], `{i}_first_logits` float32 [text_card] (the logits at the prompt's last
position, which pick the first token); `cases`; the sha256 of lm_pytorch.safetensors, of the
rebuilt model.safetensors and of the tokenizer; the versions it ran with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PROMPTS = ("Hello, how are you?", "The quick brown fox")
GREEDY_TOKENS = 24
BOS_ID = 1


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def greedy(decoder, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """GREEDY_TOKENS argmax tokens after `prompt`, each from a full forward of everything so
    far; and the logits that chose the first one."""
    ids = list(prompt)
    first_logits = None
    with torch.no_grad():
        for _ in range(GREEDY_TOKENS):
            logits = decoder(input_ids=torch.tensor([ids])).logits[0, -1]
            if first_logits is None:
                first_logits = logits.numpy().astype(np.float32)
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt):], first_logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import sentencepiece
    import transformers
    from transformers import MoshiForConditionalGeneration
    from transformers_layout import ensure_transformers_moshi

    torch.set_num_threads(1)
    folder = ensure_transformers_moshi(ROOT / "tests" / ".cache")
    model = MoshiForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    decoder = model.decoder
    tokenizer_path = FIXTURES / "tokenizer.model"
    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_path))
    if tokenizer.bos_id() != BOS_ID:
        raise SystemExit(f"the tokenizer's BOS is {tokenizer.bos_id()}, expected {BOS_ID}")

    out: dict[str, np.ndarray] = {
        "pytorch_sha256": np.str_(sha256_of(FIXTURES / "lm_pytorch.safetensors")),
        "transformers_sha256": np.str_(sha256_of(folder / "model.safetensors")),
        "tokenizer_sha256": np.str_(sha256_of(tokenizer_path)),
        "versions": np.str_(json.dumps({"torch": torch.__version__,
                                        "transformers": transformers.__version__,
                                        "sentencepiece": sentencepiece.__version__})),
    }
    report = []
    case = 0
    for text in PROMPTS:
        for bos in (False, True):
            prompt = ([BOS_ID] if bos else []) + tokenizer.encode(text)
            tokens, first_logits = greedy(decoder, prompt)
            out[f"{case}_text"] = np.str_(text)
            out[f"{case}_bos"] = np.bool_(bos)
            out[f"{case}_prompt_ids"] = np.array(prompt, np.int32)
            out[f"{case}_tokens"] = np.array(tokens, np.int32)
            out[f"{case}_first_logits"] = first_logits
            report.append({"text": text, "bos": bos, "prompt": prompt, "tokens": tokens,
                           "distinct": len(set(tokens))})
            case += 1
    out["cases"] = np.int32(case)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(json.dumps({"versions": json.loads(str(out["versions"])), "cases": report}))


if __name__ == "__main__":
    main()
