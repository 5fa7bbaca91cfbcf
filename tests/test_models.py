"""One runner over a tiny config of every model family (in the spirit of mlx-lm's
test_models.py): the model builds from its config.json, every layout (official, transformers)
sanitizes to the same parameters, quantize-on-load (q4, q8) equals loading the converter's
quantized file, streaming through the cache equals one whole-sequence pass, and batch rows are
independent.

A family joins by adding a `FamilyCase` to `CASES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx.loading.checkpoint import load_model
from moshi_mlx.loading.config import read_config_json
from weights_convert import convert

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class FamilyCase:
    name: str
    model_types: tuple[str, ...]
    config: Path
    # Layouts of the same weights (a path, or a function that makes the file); the first is
    # converted.
    layouts: dict[str, Path | Callable[[], Path]]
    # (model, inputs [B, T, dim], caches) -> outputs [B, T, dim]: the sequence model
    run: Callable[[nn.Module, mx.array, Any], mx.array]
    make_cache: Callable[[nn.Module], Any]
    dim: Callable[[nn.Module], int]
    quantize: tuple[int, ...] = (4, 8)
    # Layouts that lack optional parameters the first one has: layout -> name prefix.
    lacks: dict[str, str] = field(default_factory=dict)


def _lm_run(model, x, caches):
    return model.transformer(x, caches)


def _transformers_moshi() -> Path:
    from transformers_layout import ensure_transformers_moshi

    return ensure_transformers_moshi(Path(__file__).parent / ".cache") / "model.safetensors"


def _transformers_stt() -> Path:
    from transformers_layout import ensure_transformers_stt

    return ensure_transformers_stt(Path(__file__).parent / ".cache") / "model.safetensors"


STT_Q8_CONFIG = FIXTURES / "stt" / "stt_q8_config.json"  # the STT fixture's, hidden 384


def _random_stt_q8() -> Path:
    """Random bf16 STT weights (our layout) for a config where q8 applies: every linear's
    input width is a multiple of 64 (the fixture's gating hidden size, 352, is not)."""
    from moshi_mlx.loading.models import read_lm_config
    from moshi_mlx.models.lm import Lm

    path = Path(__file__).parent / ".cache" / "stt_q8_random.safetensors"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        mx.random.seed(0)
        model = Lm(read_lm_config(STT_Q8_CONFIG))
        tensors = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
        partial = path.with_name("stt_q8_random.partial.safetensors")
        mx.save_safetensors(str(partial), tensors)
        partial.replace(path)
    return path


def layout_path(layout: Path | Callable[[], Path]) -> Path:
    return layout if isinstance(layout, Path) else layout()


CASES = [
    FamilyCase(
        name="moshi",
        model_types=("moshi",),
        config=FIXTURES / "lm_config.json",
        layouts={"pytorch": FIXTURES / "lm_pytorch.safetensors",
                 "transformers": _transformers_moshi},
        run=_lm_run,
        make_cache=lambda model: model.make_cache(),
        dim=lambda model: model.cfg.dim,
    ),
    FamilyCase(
        name="stt",
        model_types=("stt",),
        config=FIXTURES / "stt" / "stt_config.json",
        layouts={"pytorch": FIXTURES / "stt" / "stt_pytorch.safetensors",
                 "transformers": _transformers_stt},
        run=_lm_run,
        make_cache=lambda model: model.make_cache(),
        dim=lambda model: model.cfg.dim,
        quantize=(4,),  # q8 needs every input dim divisible by 64: the gating's 352 is not
        lacks={"transformers": "extra_heads."},  # transformers' STT has no VAD heads
    ),
    FamilyCase(
        name="stt-q8",
        model_types=("stt",),
        config=STT_Q8_CONFIG,
        layouts={"mlx": _random_stt_q8},
        run=_lm_run,
        make_cache=lambda model: model.make_cache(),
        dim=lambda model: model.cfg.dim,
    ),
    FamilyCase(  # its transformers layout: tests/test_csm.py (derived there from this file)
        name="csm",
        model_types=("csm",),
        config=FIXTURES / "csm" / "sesame" / "config.json",
        layouts={"sesame": FIXTURES / "csm" / "sesame" / "model.safetensors"},
        run=lambda model, x, caches: model.backbone(x, caches),
        make_cache=lambda model: model.backbone_cache(),
        dim=lambda model: model.cfg.backbone.dim,
    ),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def case(request) -> FamilyCase:
    return request.param


@pytest.fixture(scope="module")
def converted(case, tmp_path_factory) -> dict[int | None, Path]:
    """The converter's bf16 / q8 / q4 folders of the case's first layout."""
    root = tmp_path_factory.mktemp(f"converted_{case.name}")
    source = layout_path(next(iter(case.layouts.values())))
    return {bits: convert(root / str(bits), input_path=source, config=case.config,
                          bits=bits).model_file
            for bits in (None, *case.quantize)}


def load(case: FamilyCase, path: Path, quantize: int | None = None) -> nn.Module:
    model, _ = load_model(path, config=case.config, quantize=quantize, dtype=mx.float32,
                          model_types=case.model_types)
    return model


def parameters(model: nn.Module) -> dict[str, np.ndarray]:
    # Raw bits: bf16 scales have no numpy dtype, and equality here means the same bytes.
    return {k: np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)
            for k, v in tree_flatten(model.parameters())}


def assert_same_parameters(a: nn.Module, b: nn.Module, lacks: str | None = None) -> None:
    """Bit-identical parameters; `lacks`: a name prefix that `a` has none of, left out of b."""
    pa, pb = parameters(a), parameters(b)
    if lacks:
        assert not any(k.startswith(lacks) for k in pa)
        pb = {k: v for k, v in pb.items() if not k.startswith(lacks)}
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def test_builds_from_its_config_json(case):
    from moshi_mlx.loading.config import json_beside, resolve_config

    resolved = resolve_config(case.config, None, case.model_types)
    data = {k: v for k, v in read_config_json(case.config).items() if k != "quantization"}
    if hasattr(resolved.family, "complete_config"):  # files beside it (CSM's flavors.json)
        data = resolved.family.complete_config(data, json_beside(case.config))
    assert resolved.config == resolved.family.Config.from_dict(data)
    model = resolved.family.Model(resolved.config)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) > 0


def test_every_layout_and_our_converted_file_give_the_same_model(case, converted):
    reference = load(case, converted[None])
    for name, layout in case.layouts.items():
        assert_same_parameters(load(case, layout_path(layout)), reference,
                               case.lacks.get(name)), name


@pytest.mark.parametrize(
    ("case", "bits"), [(c, bits) for c in CASES for bits in c.quantize], indirect=["case"],
    ids=[f"{c.name}-q{bits}" for c in CASES for bits in c.quantize])
def test_quantize_on_load_equals_the_converted_quantized_file(case, converted, bits):
    on_load = load(case, layout_path(next(iter(case.layouts.values()))), quantize=bits)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in on_load.named_modules())
    assert_same_parameters(on_load, load(case, converted[bits]))


def _inputs(dim: int, batch: int, steps: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).normal(size=(batch, steps, dim)),
                    dtype=mx.float32)


def test_streaming_equals_one_whole_sequence_pass(case, converted):
    model = load(case, converted[None])
    x = _inputs(case.dim(model), 1, 12, seed=1)
    whole = case.run(model, x, case.make_cache(model))
    caches = case.make_cache(model)
    steps = [case.run(model, x[:, t : t + 1], caches) for t in range(x.shape[1])]
    streamed = mx.concatenate(steps, axis=1)
    scale = float(mx.abs(whole).max())
    np.testing.assert_allclose(np.array(streamed), np.array(whole), rtol=0, atol=1e-5 * scale)


def test_batch_rows_are_independent(case, converted):
    model = load(case, converted[None])
    x = _inputs(case.dim(model), 2, 6, seed=2)
    both = case.run(model, x, case.make_cache(model))
    scale = float(mx.abs(both).max())
    for row in range(2):
        alone = case.run(model, x[row : row + 1], case.make_cache(model))
        np.testing.assert_allclose(np.array(both[row : row + 1]), np.array(alone), rtol=0,
                                   atol=1e-5 * scale)
