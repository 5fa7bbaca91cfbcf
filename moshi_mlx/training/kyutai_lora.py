"""Kyutai's moshi-finetune LoRA files -> our Moshi LM: adapter tensors (then kept apart or
fused by moshi_mlx.training.lora, as any adapter) or the deltas weights_convert adds.

moshi-finetune saves `lora.safetensors` (for every Linear of the LM, `<module>.lora_A.weight`
[r, in] and `<module>.lora_B.weight` [out, r], PyTorch module names) and a `config.json` with
`lora_rank` and `lora_scaling`; its layer computes y = W x + scaling * B (A x). In mlx-lm's
convention (ours) that is lora_a = A.T [in, r], lora_b = B.T [r, out], scale = scaling, and the
fused weight is W + scaling * B @ A.

Module names: Kyutai's per-step attention projections (`self_attn.in_projs.{k}`, or the
`in_proj` form that stacks the steps on dim 0) and its depformer lists (`depformer_in.{k}`,
`linears.{k}`, `gating.{k}`) become our `depformer.slices.{k}...` modules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from moshi_mlx.errors import WeightsError
from moshi_mlx.training.lora import LoraSettings, deltas_of

_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")

# Kyutai module name -> ours ({k} = depformer step, {l} = layer)
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"transformer\.layers\.(\d+)\.self_attn\.(in|out)_projs?(\.0)?"),
     r"transformer.layers.\1.self_attn.\2_proj"),
    (re.compile(r"transformer\.layers\.(\d+)\.gating\.(linear_in|linear_out)"),
     r"transformer.layers.\1.gating.\2"),
    (re.compile(r"text_linear"), "text_linear"),
    (re.compile(r"extra_heads\.(\d+)"), r"extra_heads.\1"),
    (re.compile(r"depformer_in\.(\d+)"), r"depformer.slices.\1.linear_in"),
    (re.compile(r"linears\.(\d+)"), r"depformer.slices.\1.linear_out"),
    (re.compile(r"depformer\.layers\.(\d+)\.self_attn\.(in|out)_projs\.(\d+)"),
     r"depformer.slices.\3.transformer.layers.\1.self_attn.\2_proj"),
    (re.compile(r"depformer\.layers\.(\d+)\.gating\.(\d+)\.(linear_in|linear_out)"),
     r"depformer.slices.\2.transformer.layers.\1.gating.\3"),
]
# The stacked form: one A / B holding the dep_q steps on dim 0 (split like the base weight).
_STACKED = re.compile(r"depformer\.layers\.(\d+)\.self_attn\.(in|out)_proj")


@dataclass(frozen=True)
class KyutaiLora:
    """A moshi-finetune LoRA in our module names: module -> (A [r, in], B [out, r])."""

    pairs: dict[str, tuple[mx.array, mx.array]]
    rank: int
    scaling: float

    def adapter_tensors(self) -> dict[str, mx.array]:
        """mlx-lm-style adapter tensors: `<module>.lora_a` = A.T, `<module>.lora_b` = B.T
        (their scale is `scaling`)."""
        out = {}
        for module, (a, b) in self.pairs.items():
            out[f"{module}.lora_a"] = a.T
            out[f"{module}.lora_b"] = b.T
        return out

    def settings(self, family: str = "moshi") -> LoraSettings:
        """The adapter these tensors are, in mlx-lm's terms (scale = lora_scaling)."""
        return LoraSettings(self.rank, self.scaling, paths=tuple(sorted(self.pairs)),
                            family=family, extra={"source": "moshi-finetune"})

    def deltas(self, weight_shapes: dict[str, tuple[int, ...]], source: str = "the LoRA"
               ) -> dict[str, mx.array]:
        """What fusing adds to each adapted weight ({"<module>.weight": scaling * B @ A}),
        checked against the model's (out, in) weight shapes; training.lora's one fuse math."""
        return deltas_of(self.settings(), self.adapter_tensors(), weight_shapes, source)


def our_module(name: str) -> str | None:
    """Kyutai's module name -> ours (None for the stacked depformer form and unknown names)."""
    for pattern, target in _RENAMES:
        if pattern.fullmatch(name):
            return pattern.sub(target, name)
    return None


def read_lora_config(path: str | Path) -> tuple[int, float]:
    """(lora_rank, lora_scaling) of moshi-finetune's config.json."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["lora_rank"]), float(data["lora_scaling"])
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such LoRA config (moshi-finetune writes config.json "
                           "beside lora.safetensors)") from None
    except (OSError, ValueError, TypeError, KeyError):
        raise WeightsError(f"{path}: expected a moshi-finetune config.json with lora_rank "
                           "and lora_scaling") from None


def read_kyutai_lora(lora_path: str | Path, config_path: str | Path | None = None,
                     dep_q: int = 8) -> KyutaiLora:
    """moshi-finetune's lora.safetensors (+ its config.json, by default the one beside it)."""
    lora_path = Path(lora_path)
    if not lora_path.is_file():
        raise WeightsError(f"{lora_path}: no such LoRA file (moshi-finetune's "
                           "checkpoint_N/consolidated/lora.safetensors)")
    rank, scaling = read_lora_config(config_path or lora_path.parent / "config.json")
    try:
        tensors = mx.load(str(lora_path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise WeightsError(f"{lora_path}: cannot read the LoRA weights ({exc})") from None
    if not isinstance(tensors, dict) or not tensors:
        raise WeightsError(f"{lora_path}: no LoRA tensors in the file")
    halves: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise WeightsError(f"{lora_path}: {key} is not a LoRA tensor (<module>.lora_A/B)")
        halves.setdefault(match["module"], {})[match["part"]] = value
    pairs: dict[str, tuple[mx.array, mx.array]] = {}
    for name, parts in halves.items():
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise WeightsError(f"{lora_path}: {name} has no {missing}")
        a, b = parts["A"], parts["B"]
        if (stacked := _STACKED.fullmatch(name)) is not None:
            layer, proj = stacked[1], stacked[2]
            for k, (a_k, b_k) in enumerate(zip(_split(a, dep_q, name),
                                               _split(b, dep_q, name), strict=True)):
                module = f"depformer.slices.{k}.transformer.layers.{layer}.self_attn.{proj}_proj"
                pairs[module] = _checked(a_k, b_k, rank, name)
            continue
        module = our_module(name)
        if module is None:
            raise WeightsError(f"{lora_path}: {name} is not a module of a Moshi LM")
        pairs[module] = _checked(a, b, rank, name)
    return KyutaiLora(pairs, rank, scaling)


def _split(tensor: mx.array, parts: int, name: str) -> list[mx.array]:
    if tensor.ndim != 2 or tensor.shape[0] % parts:
        raise WeightsError(f"LoRA tensor of {name} {tuple(tensor.shape)} cannot be split in "
                           f"{parts} depformer steps")
    rows = tensor.shape[0] // parts
    return [tensor[k * rows : (k + 1) * rows] for k in range(parts)]


def _checked(a: mx.array, b: mx.array, rank: int, name: str) -> tuple[mx.array, mx.array]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
        raise WeightsError(f"LoRA of {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                           f"have rank {rank} (A [r, in], B [out, r])")
    return a, b
