"""senstella/csm-mlx's LoRA fine-tuning as a benchmark worker, run by benchmarks/finetune.py in
csm-mlx's own virtual environment (never imported by moshi_mlx; see benchmarks/finetune.py for
how that venv is made).

What is csm-mlx's own: its `CSM` model (csm-1b sizes), `linear_to_lora_layers` with its
"attn" target (q/k/v/o and the three MLP linears of every backbone and decoder layer, as our
LoRA targets), and `CSMTrainer.train_step` (its compiled loss and gradient, Adam update) on a
batch dict in its format. What is replaced: its hub downloads (weights, Mimi, Llama-3
tokenizer), since nothing can be downloaded here: the weights are its own random
initialisation (float32; values do not change the timing), and the batch is the one our side
trains on (tokens and mask [B, S, 33] in the Sesame frame layout, which csm-mlx shares),
given as an .npz, with every audio row a target. For -q the backbone and decoder layer
linears are quantized as ours are (q4: group 32, q8: group 64): QLoRA on the same layers.

Prints one JSON line: frames_per_s (median over the steps after the first; frames: the rows
whose codebook 0 is a target, as ours counts), peak_memory_gb (MLX's), max_rss_gb.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

GROUP_SIZE = {4: 32, 8: 64}  # as moshi_mlx.loading.quantization.QUANTIZATIONS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", required=True, help=".npz with tokens, mask, labels")
    p.add_argument("-q", "--quantize", type=int, choices=(0, 4, 8), default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--sesame-folder", default=None,
                   help="a Sesame config.json + flavors.json folder (the fixture) instead of "
                        "csm-1b's sizes")
    args = p.parse_args()

    from csm_mlx import CSM
    from csm_mlx.finetune.trainer import CSMTrainer, TrainArgs
    from csm_mlx.finetune.utils import linear_to_lora_layers

    mx.random.seed(0)
    model = CSM(model_args(args.sesame_folder))
    mx.eval(model.parameters())
    if args.quantize:
        nn.quantize(model, group_size=GROUP_SIZE[args.quantize], bits=args.quantize,
                    class_predicate=lambda path, m: isinstance(m, nn.Linear) and path.startswith(
                        ("backbone.layers.", "decoder.layers.")))
    model.freeze()
    # as its `lora sft` command does, with our rank / scale and its "attn" target
    linear_to_lora_layers(model, {"rank": args.rank, "scale": args.scale, "dropout": 0.0,
                                  "keys": ["attn"]})
    mx.eval(model.parameters())
    model.train()
    trainable = sum(v.size for _, v in _flat(model.trainable_parameters()))

    with np.load(args.batch) as data:
        tokens, mask, labels = data["tokens"], data["mask"], data["labels"]
    batch = {"tokens": mx.array(tokens.astype(np.int32)), "masks": mx.array(mask.astype(bool)),
             "loss_masks": mx.ones(mask.shape, dtype=mx.bool_)}
    frames = int((labels[..., 0] != -100).sum())

    trainer = CSMTrainer(TrainArgs(model=model, optimizer=optim.Adam(args.learning_rate),
                                   output_dir=args.output_dir, max_norm=0.0,
                                   gradient_checkpointing=args.grad_checkpoint))
    mx.reset_peak_memory()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(trainer.train_step(batch))  # evaluates the update and the loss
        times.append(time.perf_counter() - start)
    speeds = [frames / t for t in times[1:]]
    print(json.dumps({
        "trainable_parameters": trainable, "frames_per_step": frames,
        "frames_per_s": statistics.median(speeds) if speeds else None,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "quantize": args.quantize or None, "steps": args.steps, "losses": losses}), flush=True)


def model_args(sesame_folder: str | None):
    """csm-1b's, or a Sesame folder's sizes registered under its flavor names in csm-mlx's
    configuration tables (which know only the real sizes)."""
    from csm_mlx import csm_1b
    from csm_mlx.config import BACKBONE_CONFIGURATION, DECODER_CONFIGURATION
    from csm_mlx.models import ModelArgs
    from mlx_lm.models.llama import ModelArgs as LlamaArgs

    if sesame_folder is None:
        return csm_1b()
    folder = Path(sesame_folder)
    config = json.loads((folder / "config.json").read_text())
    flavors = json.loads((folder / "flavors.json").read_text())
    for table, name in ((BACKBONE_CONFIGURATION, config["backbone_flavor"]),
                        (DECODER_CONFIGURATION, config["decoder_flavor"])):
        f = flavors[name]
        table[name] = LlamaArgs(
            model_type="llama", vocab_size=f["vocab_size"], num_hidden_layers=f["num_layers"],
            num_attention_heads=f["num_heads"], num_key_value_heads=f["num_kv_heads"],
            head_dim=f["embed_dim"] // f["num_heads"], intermediate_size=f["intermediate_dim"],
            hidden_size=f["embed_dim"], rms_norm_eps=f["norm_eps"],
            rope_theta=float(f["rope_base"]),
            rope_scaling={"factor": float(f["scale_factor"]), "high_freq_factor": 4.0,
                          "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
                          "rope_type": "llama3"})
    return ModelArgs(backbone_name=config["backbone_flavor"],
                     decoder_name=config["decoder_flavor"],
                     n_text_vocab=config["text_vocab_size"],
                     n_audio_vocab=config["audio_vocab_size"],
                     n_audio_codebooks=config["audio_num_codebooks"])


def _flat(tree: object) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


if __name__ == "__main__":
    main()
