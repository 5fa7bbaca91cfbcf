"""Moshi's fine-tuning loss, as kyutai-labs/moshi-finetune computes it.

A batch is codes [B, 1 + n_q, T] as moshi-finetune builds them (`moshi_mlx.training.moshi_data`):
stream 0 the text, 1..dep_q Moshi's audio codebooks, the rest the user's; -1 = padding (no
input, no target). The LM runs teacher forced over the whole sequence, as Kyutai's
`LMModel.forward`: every stream delayed by its acoustic delay behind an initial step, the
temporal transformer over all T positions, the depformer over all positions at once with the
true previous tokens as inputs. Each part is sum(w * CE) / sum(w):

- text: w = 1 on valid targets, times `text_padding_weight` where the target is PAD or EPAD;
- audio (Moshi's dep_q codebooks only): w = 1 on valid targets (not -1, not past the end of a
  delayed codebook), times `first_codebook_weight_multiplier` on codebook 0.

loss = text_loss + audio_loss (both float32).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import mlx.core as mx
import numpy as np

from moshi_mlx.models.lm import Lm

# Kyutai's LMModel `existing_text_end_padding_id` (its default; the released config.json files
# do not carry it). PAD is the config's `existing_text_padding_id`.
END_OF_TEXT_PADDING_ID = 0
# moshi-finetune's defaults (finetune/args.py); its 7B example uses a multiplier of 100.
TEXT_PADDING_WEIGHT = 0.5
FIRST_CODEBOOK_WEIGHT_MULTIPLIER = 1.0

Codes = mx.array | np.ndarray  # int codes [B, 1 + n_q, T]


def delayed_inputs(lm: Lm, codes: mx.array) -> mx.array:
    """codes [B, K, T] -> [B, K, T + 1]: an initial step, then each stream k shifted right by
    its delay (the first `delay` steps of a stream hold its initial token)."""
    cfg = lm.cfg
    batch, streams, steps = codes.shape
    rows = []
    for k in range(streams):
        initial = cfg.text_initial_token if k == 0 else cfg.audio_initial_token
        lead = mx.full((batch, 1 + cfg.delays[k]), initial, dtype=codes.dtype)
        rows.append(mx.concatenate([lead, codes[:, k, : steps - cfg.delays[k]]], axis=1))
    return mx.stack(rows, axis=1)


def forward_logits(lm: Lm, codes: mx.array, checkpoint: bool = False
                   ) -> tuple[mx.array, mx.array]:
    """codes [B, 1 + n_q, T] -> (text logits [B, T, text_card], audio logits [B, dep_q, T,
    card]), both aligned with `codes` (position t predicts codes[:, :, t]); audio positions
    whose target lies past the end of a delayed codebook hold meaningless values (masked).
    checkpoint: recompute each temporal layer in the backward pass (less memory)."""
    if lm.depformer is None:
        raise ValueError("the Moshi loss needs an LM with a depformer (dep_q > 0)")
    batch, _, steps = codes.shape
    delayed = delayed_inputs(lm, codes)
    hidden, text_logits = lm.sequence(delayed[:, :, :-1], checkpoint=checkpoint)
    dep_q = lm.cfg.dep_q
    # The depformer of position s reads the delayed tokens of position s itself: the text
    # token, then each audio codebook before the one it predicts.
    targets_in = delayed[:, :dep_q, 1:].transpose(0, 2, 1).reshape(batch * steps, dep_q)
    logits = lm.depformer.teacher_forced(hidden.reshape(batch * steps, -1), targets_in)
    logits = logits.reshape(batch, steps, dep_q, -1).transpose(0, 2, 1, 3)
    aligned = []
    for k in range(dep_q):
        delay = lm.cfg.delays[1 + k]
        line = logits[:, k]
        if delay:  # position t's target was predicted at delayed position t + delay
            line = mx.concatenate([line[:, delay:], mx.zeros_like(line[:, :delay])], axis=1)
        aligned.append(line)
    return text_logits, mx.stack(aligned, axis=1)


def audio_target_mask(lm: Lm, codes: mx.array) -> mx.array:
    """[B, dep_q, T] bool: Moshi's audio targets that count (not -1, not in the last `delay`
    steps of a delayed codebook, whose prediction would need steps past the end)."""
    dep_q, steps = lm.cfg.dep_q, codes.shape[-1]
    positions = mx.arange(steps)
    limits = mx.array([steps - lm.cfg.delays[1 + k] for k in range(dep_q)])
    inside = positions[None, :] < limits[:, None]
    return inside[None] & (codes[:, 1 : 1 + dep_q] != -1)


def weighted_cross_entropy(logits: mx.array, targets: mx.array, weights: mx.array
                           ) -> tuple[mx.array, mx.array]:
    """(sum(w * CE), sum(w)) in float32; targets where w == 0 are ignored (may be -1)."""
    logits = logits.astype(mx.float32)
    safe = mx.maximum(targets, 0)
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = mx.logsumexp(logits, axis=-1) - picked
    return mx.sum(mx.where(weights > 0, ce * weights, 0.0)), mx.sum(weights)


def loss_sums(lm: Lm, batch: Codes, text_padding_weight: float = TEXT_PADDING_WEIGHT,
              first_codebook_weight_multiplier: float = FIRST_CODEBOOK_WEIGHT_MULTIPLIER,
              checkpoint: bool = False) -> dict[str, mx.array]:
    """The sums the loss of a batch of codes [B, 1 + n_q, T] is made of: `text_sum`,
    `text_weight`, `audio_sum`, `audio_weight` (sum(w * CE), sum(w) of each part) and
    `n_targets` (the valid text and audio targets: moshi-finetune's "real tokens")."""
    codes = (batch if isinstance(batch, mx.array) else mx.array(batch)).astype(mx.int32)
    text_logits, audio_logits = forward_logits(lm, codes, checkpoint)
    text_targets = codes[:, 0]
    text_mask = text_targets != -1
    padding = (text_targets == lm.cfg.existing_text_padding_id) | (
        text_targets == END_OF_TEXT_PADDING_ID)
    text_weights = text_mask * mx.where(padding, text_padding_weight, 1.0)
    audio_targets = codes[:, 1 : 1 + lm.cfg.dep_q]
    audio_mask = audio_target_mask(lm, codes)
    first = (mx.arange(lm.cfg.dep_q) == 0)[None, :, None]
    audio_weights = audio_mask * mx.where(first, first_codebook_weight_multiplier, 1.0)
    text_sum, text_weight = weighted_cross_entropy(text_logits, text_targets,
                                                   text_weights.astype(mx.float32))
    audio_sum, audio_weight = weighted_cross_entropy(audio_logits, audio_targets,
                                                     audio_weights.astype(mx.float32))
    return {"text_sum": text_sum, "text_weight": text_weight, "audio_sum": audio_sum,
            "audio_weight": audio_weight, "n_targets": text_mask.sum() + audio_mask.sum()}


def moshi_loss(lm: Lm, batch: Codes, text_padding_weight: float = TEXT_PADDING_WEIGHT,
               first_codebook_weight_multiplier: float = FIRST_CODEBOOK_WEIGHT_MULTIPLIER,
               checkpoint: bool = False) -> tuple[mx.array, mx.array, dict[str, mx.array]]:
    """moshi-finetune's loss of one batch of codes [B, 1 + n_q, T] ->
    (loss, n_targets, {"text_loss", "audio_loss", "text_loss_targets",
    "audio_loss_targets"}); n_targets counts the valid text and audio targets
    (moshi-finetune's "real tokens"); each part's `_targets` is its sum of weights, so the
    trainer combines batches into the loss of one batch holding them all."""
    sums = loss_sums(lm, batch, text_padding_weight, first_codebook_weight_multiplier,
                     checkpoint)
    text_loss = sums["text_sum"] / sums["text_weight"]
    audio_loss = sums["audio_sum"] / sums["audio_weight"]
    return (text_loss + audio_loss, sums["n_targets"],
            {"text_loss": text_loss, "audio_loss": audio_loss,
             "text_loss_targets": sums["text_weight"],
             "audio_loss_targets": sums["audio_weight"]})


def evaluate(lm: Lm, batches: Iterable[Codes], text_padding_weight: float = TEXT_PADDING_WEIGHT,
             first_codebook_weight_multiplier: float = FIRST_CODEBOOK_WEIGHT_MULTIPLIER
             ) -> dict[str, float]:
    """The loss of all `batches` weighted as one batch holding them all would weight them
    (the shared trainer's evaluation): {"loss", "text_loss", "audio_loss", "n_targets",
    "batches"}."""
    from moshi_mlx.training.trainer import evaluate as evaluate_batches

    count = 0

    def counted() -> Iterator[Codes]:
        nonlocal count
        for batch in batches:
            count += 1
            yield batch

    result = evaluate_batches(
        lm, lambda model, batch: moshi_loss(model, batch, text_padding_weight,
                                            first_codebook_weight_multiplier), counted())
    return {"loss": result["loss"], "text_loss": result["text_loss"],
            "audio_loss": result["audio_loss"], "n_targets": int(result["targets"]),
            "batches": count}
