"""LoRA layers over float and quantized linears, fusing, adapter files (training/lora.py)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from moshi_mlx.errors import WeightsError
from moshi_mlx.training.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRALinear,
    LoraSettings,
    adapter_weights,
    apply_lora,
    fuse_lora,
    load_adapter,
    save_adapter,
    select_linears,
)


class Block(nn.Module):
    def __init__(self, width: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(nn.gelu(self.up(x)))


class Tiny(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = [Block(width), Block(width)]
        self.head = nn.Linear(width, 10, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _tiny(seed: int = 0, bits: int | None = None) -> Tiny:
    mx.random.seed(seed)
    model = Tiny()
    if bits:
        nn.quantize(model, group_size=32 if bits == 4 else 64, bits=bits,
                    class_predicate=lambda p, m: isinstance(m, nn.Linear) and p != "head")
    mx.eval(model.parameters())
    return model


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for name, value in adapter_weights(model).items():
        if name.endswith("lora_b"):
            layer_path = name.rsplit(".", 1)[0]
            layer = dict(model.named_modules())[layer_path]
            layer.lora_b = mx.array(rng.normal(0, 0.05, value.shape).astype(np.float32))
    mx.eval(model.parameters())


def _dequantized(layer: nn.Module) -> np.ndarray:
    if isinstance(layer, nn.QuantizedLinear):
        return np.array(mx.dequantize(layer.weight, layer.scales, layer.biases,
                                      layer.group_size, layer.bits))
    return np.array(layer.weight)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_lora_layer_is_base_plus_scaled_low_rank_product(bits):
    model = _tiny(bits=bits)
    base = model.layers[0].up
    weight = _dequantized(base)
    layer = LoRALinear(base, rank=4, scale=2.5)
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 128)
    x = np.random.default_rng(2).normal(size=(3, 5, 64)).astype(np.float32)
    # lora_b starts at zero: the adapter changes nothing at first
    np.testing.assert_allclose(np.array(layer(mx.array(x))), x @ weight.T, rtol=1e-5, atol=1e-5)
    layer.lora_b = mx.array(np.random.default_rng(3).normal(size=(4, 128)).astype(np.float32))
    a, b = np.array(layer.lora_a), np.array(layer.lora_b)
    expected = x @ weight.T + 2.5 * (x @ a @ b)
    np.testing.assert_allclose(np.array(layer(mx.array(x))), expected, rtol=1e-4, atol=1e-4)


def test_apply_lora_leaves_only_the_lora_leaves_trainable():
    model = _tiny()
    paths = select_linears(model, lambda path, m: path.startswith("layers.1."))
    assert paths == ["layers.1.down", "layers.1.up"]
    apply_lora(model, paths, rank=2, scale=1.0)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == ["layers.1.down.lora_a", "layers.1.down.lora_b",
                                 "layers.1.up.lora_a", "layers.1.up.lora_b"]


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_fused_model_equals_the_unfused_one(bits):
    model = _tiny(bits=bits)
    apply_lora(model, select_linears(model, lambda p, m: p != "head"), rank=4, scale=3.0)
    _randomize_b(model)
    x = mx.array(np.random.default_rng(4).normal(size=(2, 7, 64)).astype(np.float32))
    unfused = np.array(model(x))
    reference = _tiny(bits=bits)  # the same base, fused by hand in numpy
    for path, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            a, b = np.array(layer.lora_a), np.array(layer.lora_b)
            base = dict(reference.named_modules())[path]
            fused_weight = _dequantized(base) + 3.0 * (b.T @ a.T)
            plain = nn.Linear(*fused_weight.T.shape, bias="bias" in base)
            plain.weight = mx.array(fused_weight)
            if "bias" in base:
                plain.bias = base.bias
            reference.update_modules(tree_unflatten([(path, plain)]))
    np.testing.assert_allclose(unfused, np.array(reference(x)), rtol=1e-4, atol=1e-4)

    assert fuse_lora(model) == 4
    kinds = {type(m) for _, m in model.named_modules()}
    assert LoRALinear not in kinds
    if bits:
        # fused, then quantized again as the base was: equal up to the re-quantization
        assert isinstance(model.layers[0].up, nn.QuantizedLinear)
        assert model.layers[0].up.bits == bits
        step = np.abs(unfused).max() * (0.1 if bits == 4 else 0.01)
        np.testing.assert_allclose(np.array(model(x)), unfused, atol=step)
    else:
        np.testing.assert_allclose(np.array(model(x)), unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_gradients_reach_only_the_adapter(bits):
    model = _tiny(bits=bits)
    apply_lora(model, ["layers.0.up", "layers.1.down"], rank=4, scale=1.0)
    _randomize_b(model)
    x = mx.array(np.random.default_rng(5).normal(size=(2, 3, 64)).astype(np.float32))

    def loss(m: nn.Module) -> mx.array:
        return (m(x) ** 2).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    flat = dict(tree_flatten(grads))
    assert sorted(flat) == ["layers.0.up.lora_a", "layers.0.up.lora_b",
                            "layers.1.down.lora_a", "layers.1.down.lora_b"]
    # finite differences on one entry of lora_b
    layer = model.layers[0].up
    eps = 1e-2
    original = np.array(layer.lora_b)
    shifted = original.copy()
    shifted[1, 3] += eps
    layer.lora_b = mx.array(shifted)
    up = loss(model).item()
    shifted[1, 3] -= 2 * eps
    layer.lora_b = mx.array(shifted)
    down = loss(model).item()
    assert abs((up - down) / (2 * eps) - flat["layers.0.up.lora_b"][1, 3].item()) < 2e-3 * (
        1 + abs(flat["layers.0.up.lora_b"][1, 3].item()))
    assert np.isfinite(value.item())


def test_adapter_round_trip(tmp_path):
    model = _tiny()
    paths = apply_lora(model, ["layers.0.up", "layers.1.down"], rank=3, scale=4.0)
    _randomize_b(model)
    settings = LoraSettings(rank=3, scale=4.0, paths=tuple(paths), family="tiny",
                            extra={"num_layers": 2})
    save_adapter(model, tmp_path, settings)
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config["lora_parameters"] == {"rank": 3, "scale": 4.0, "dropout": 0.0}
    assert config["lora_paths"] == paths and config["num_layers"] == 2
    stored = mx.load(str(tmp_path / ADAPTER_WEIGHTS_NAME))
    assert sorted(stored) == sorted(adapter_weights(model))

    x = mx.array(np.random.default_rng(6).normal(size=(1, 4, 64)).astype(np.float32))
    fresh = _tiny()
    assert not np.allclose(np.array(fresh(x)), np.array(model(x)), atol=1e-3)
    loaded = load_adapter(fresh, tmp_path, family="tiny")
    assert loaded == settings
    np.testing.assert_array_equal(np.array(fresh(x)), np.array(model(x)))


def test_adapter_for_another_model_names_the_first_mismatched_tensor(tmp_path):
    model = _tiny()
    apply_lora(model, ["layers.0.up"], rank=3, scale=1.0)
    save_adapter(model, tmp_path, LoraSettings(rank=3, scale=1.0, paths=("layers.0.up",)))

    class Wider(Tiny):
        def __init__(self) -> None:
            super().__init__(width=32)

    with pytest.raises(WeightsError, match=r"tensor layers\.0\.up\.lora_a has shape "
                                           r"\(64, 3\), this model needs \(32, 3\)"):
        load_adapter(Wider(), tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    config["lora_paths"] = ["layers.0.sideways"]
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="adapts layers.0.sideways, which this model lacks"):
        load_adapter(_tiny(), tmp_path)
    with pytest.raises(WeightsError, match="no adapter_config.json"):
        load_adapter(_tiny(), tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="the adapter is for csm, not moshi"):
        save_adapter(model, tmp_path, LoraSettings(rank=3, scale=1.0, paths=("layers.0.up",),
                                                   family="csm"))
        load_adapter(_tiny(), tmp_path, family="moshi")


def test_dropout_acts_in_training_only(tmp_path):
    model = _tiny()
    apply_lora(model, ["layers.0.up"], rank=4, scale=1.0, dropout=0.5)
    _randomize_b(model)
    x = mx.array(np.random.default_rng(7).normal(size=(2, 3, 64)).astype(np.float32))
    model.train()
    assert not np.allclose(np.array(model(x)), np.array(model(x)))
    save_adapter(model, tmp_path, LoraSettings(rank=4, scale=1.0, dropout=0.5,
                                               paths=("layers.0.up",)))
    loaded = _tiny()
    load_adapter(loaded, tmp_path)  # to run: the same output every call
    np.testing.assert_array_equal(np.array(loaded(x)), np.array(loaded(x)))
    model.eval()
    np.testing.assert_allclose(np.array(loaded(x)), np.array(model(x)), rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_on_many_rows_equals_the_quantized_kernel(bits, monkeypatch):
    """Many rows on the CPU take the float matmul on the dequantized weight, whose backward
    pass dequantizes again (frozen_dequantized_matmul): loss and adapter gradients equal those
    through MLX's own quantized kernel and its autodiff. Rows counted over all leading axes
    ([N, 1, dim], as the depformer trains)."""
    import moshi_mlx.training.lora as lora

    model = _tiny(bits=bits)
    apply_lora(model, select_linears(model, lambda p, m: p != "head"), rank=4, scale=2.0)
    _randomize_b(model)
    x = mx.array(np.random.default_rng(6).normal(size=(24, 1, 64)).astype(np.float32))

    def loss(m: nn.Module) -> mx.array:
        return (m(x) ** 2).mean()

    def loss_and_grads() -> tuple[float, dict[str, np.ndarray]]:
        value, grads = nn.value_and_grad(model, loss)(model)
        return value.item(), {k: np.array(v) for k, v in tree_flatten(grads)}

    assert lora.runs_dequantized(model.layers[0].up.linear, 24)
    value, grads = loss_and_grads()
    monkeypatch.setattr(lora, "runs_dequantized", lambda layer, rows: False)
    want_value, want_grads = loss_and_grads()
    assert value == pytest.approx(want_value, rel=1e-5)
    assert sorted(grads) == sorted(want_grads) and len(grads) == 8
    for name, want in want_grads.items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-4, atol=1e-6, err_msg=name)
