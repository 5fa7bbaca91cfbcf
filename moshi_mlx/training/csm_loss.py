"""Sesame CSM's training loss, as transformers' `CsmForConditionalGeneration` computes it.

loss = backbone_loss + depth_decoder_loss:
- backbone_loss: cross-entropy of codebook 0, the logits of row p-1 predicting row p, mean
  over the labelled rows (audio frames and end-of-audio rows; text rows are not targets);
- depth_decoder_loss: for each row whose codebooks 1..K-1 are labelled (the frames that
  `depth_decoder_labels_ratio` keeps, and end-of-audio rows), the depth decoder reads
  [backbone hidden state of row p-1, c0 .. c(K-2)] and its position i predicts c_i with
  head i-1; mean over those rows x (K-1) codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.models.csm import Csm, Llama

IGNORE = -100  # transformers' ignore_index


@dataclass(frozen=True)
class CsmBatch:
    """tokens, mask [B, S, K + 1] (frame rows as `speech.generate.build_prompt` makes them),
    labels [B, S, K] (IGNORE where not a target). depth_rows: flat indices b * S + s of the
    rows that train the depth decoder. frames: the audio frames of the batch (for speed)."""

    tokens: mx.array
    mask: mx.array
    labels: mx.array
    depth_rows: mx.array
    frames: int

    @classmethod
    def from_numpy(cls, tokens: np.ndarray, mask: np.ndarray, labels: np.ndarray
                   ) -> CsmBatch:
        depth = np.flatnonzero((labels[..., 1:] != IGNORE).any(axis=-1).reshape(-1))
        if depth.size and (depth % labels.shape[1] == 0).any():
            raise ValueError("a depth-decoder target in a batch's first row has no previous "
                             "backbone state")
        frames = int((labels[..., 0] != IGNORE).sum())
        return cls(mx.array(tokens.astype(np.int32)), mx.array(mask.astype(bool)),
                   mx.array(labels.astype(np.int32)), mx.array(depth.astype(np.int32)), frames)


class WholeSequence:
    """The cache a Llama layer attends with when it sees the whole sequence at once (training):
    nothing kept, a causal mask."""

    offset = 0

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, str]:
        return k, v, "causal"


def run_stack(llama: Llama, x: mx.array, checkpoint: bool = False) -> mx.array:
    """A Llama stack over whole sequences x [B, T, dim] -> normed hidden states. checkpoint:
    recompute each layer in the backward pass instead of keeping its activations."""
    for layer in llama.layers:
        x = checkpointed(layer, x) if checkpoint else layer(x, WholeSequence())
    return llama.norm(x)


def checkpointed(layer: nn.Module, x: mx.array) -> mx.array:
    def forward(params: dict, x: mx.array) -> mx.array:
        layer.update(params)
        return layer(x, WholeSequence())

    return mx.checkpoint(forward)(layer.trainable_parameters(), x)


def _cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """(sum of the CE over targets != IGNORE, their count), float32."""
    valid = targets != IGNORE
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(valid, targets, 0),
                                 reduction="none")
    return (ce * valid).sum(), valid.sum()


def csm_loss(model: Csm, batch: CsmBatch, checkpoint: bool = False
             ) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """(loss, targets, parts): parts are backbone_loss and depth_decoder_loss (means) with
    their target counts (`*_targets`); targets = the backbone's."""
    k = model.cfg.num_codebooks
    hidden = run_stack(model.backbone, model.embed_frames(batch.tokens, batch.mask), checkpoint)
    c0_sum, c0_count = _cross_entropy(model.codebook0_head(hidden[:, :-1]),
                                      batch.labels[:, 1:, 0])
    backbone_loss = c0_sum / mx.maximum(c0_count, 1)

    rows = batch.depth_rows
    if rows.size == 0:
        depth_loss, depth_count = mx.array(0.0), mx.array(0)
    else:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        codes = batch.labels.reshape(-1, k)[rows]  # [N, K]
        offsets = mx.arange(k - 1, dtype=mx.int32) * model.cfg.audio_vocab_size
        inputs = mx.concatenate([flat_hidden[rows - 1][:, None, :],
                                 model.audio_embeddings(codes[:, :-1] + offsets)], axis=1)
        depth_hidden = run_stack(model.decoder, model.projection(inputs), checkpoint)
        logits = mx.einsum("nkd,kdv->nkv", depth_hidden[:, 1:], model.audio_head)
        depth_sum, depth_count = _cross_entropy(logits, codes[:, 1:])
        depth_loss = depth_sum / mx.maximum(depth_count, 1)
    parts = {"backbone_loss": backbone_loss, "depth_decoder_loss": depth_loss,
             "backbone_loss_targets": c0_count, "depth_decoder_loss_targets": depth_count}
    return backbone_loss + depth_loss, c0_count, parts
