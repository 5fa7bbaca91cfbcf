"""Moshi fine-tuning against kyutai-labs/moshi-finetune and Kyutai's moshi 0.2.13 (PyTorch):
the loss and its gradients, the data (Interleaver, chunks), Kyutai's LoRA files.

Goldens: tests/fixtures/moshi_finetune_golden.npz, made by tools/derive_moshi_finetune_golden.py
(float32, the tiny Moshi fixture).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx import load_lm
from moshi_mlx.training.moshi_loss import moshi_loss

RELATIVE = 1e-4


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "moshi_finetune_golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def lm32(fixtures_dir: Path):
    return load_lm(fixtures_dir / "lm_pytorch.safetensors",
                   config=fixtures_dir / "lm_config.json", dtype=mx.float32)


def assert_relative(got: float, want: float, what: str) -> None:
    assert abs(got - want) <= RELATIVE * abs(want), f"{what}: {got} vs {want}"


# --------------------------------------------------------------------------- loss

@pytest.mark.parametrize("setting, weights", [("default", (0.5, 1.0)), ("7b", (0.5, 100.0))])
def test_loss_and_gradients_equal_moshi_finetune(lm32, golden, setting, weights):
    codes = mx.array(golden["codes"])
    loss, n_targets, parts = moshi_loss(lm32, codes, *weights)
    assert_relative(loss.item(), float(golden[f"{setting}_loss"]), "loss")
    assert_relative(parts["text_loss"].item(), float(golden[f"{setting}_text_loss"]), "text")
    assert_relative(parts["audio_loss"].item(), float(golden[f"{setting}_audio_loss"]), "audio")
    assert n_targets.item() == int(golden[f"{setting}_n_targets"])

    grads = dict(tree_flatten(nn.value_and_grad(
        lm32, lambda model: moshi_loss(model, codes, *weights)[0])(lm32)[1]))
    for index, name in enumerate(golden["grad_our_names"]):
        grad = np.array(grads[str(name)]).astype(np.float64)
        want_rows = golden[f"{setting}_grad{index}_rows"]
        rows = grad[list(golden["grad_rows"])]
        assert np.abs(rows - want_rows).max() <= RELATIVE * np.abs(want_rows).max(), name
        # The whole gradient, projected on the golden's seeded Gaussian matrix; relative to
        # the sum of the terms' magnitudes (the projection itself can cancel to near 0).
        probe = np.random.default_rng(int(golden["grad_probe_seed"]) + index).standard_normal(
            grad.shape)
        terms = grad * probe
        want = float(golden[f"{setting}_grad{index}_probe"])
        assert abs(terms.sum() - want) <= RELATIVE * np.abs(terms).sum(), name


def test_first_codebook_multiplier_changes_only_the_audio_part(lm32, golden):
    codes = mx.array(golden["codes"])
    _, _, plain = moshi_loss(lm32, codes, 0.5, 1.0)
    _, _, heavy = moshi_loss(lm32, codes, 0.5, 100.0)
    assert plain["text_loss"].item() == heavy["text_loss"].item()
    assert plain["audio_loss"].item() != heavy["audio_loss"].item()
