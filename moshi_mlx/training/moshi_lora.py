"""LoRA on Moshi's LM: which linears training adapts, and putting an adapter on a loaded LM
to run it (ours from `moshi-finetune moshi`, or moshi-finetune's lora.safetensors), kept
apart or fused, by training.lora's one set of layers and fuse math."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from moshi_mlx.errors import MoshiError, WeightsError
from moshi_mlx.models.lm import Lm
from moshi_mlx.modules.parallel import default_cpu_threads
from moshi_mlx.training.kyutai_lora import KyutaiLora, read_kyutai_lora
from moshi_mlx.training.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    adapter_deltas,
    apply_lora,
    fuse_lora,
    load_adapter,
    select_linears,
    set_adapter_tensors,
)

FAMILY = "moshi"  # adapter_config.json's family, the checkpoint's model_type
# The linears of each transformer layer (temporal and depformer), as --target-modules names
# them; moshi-finetune adapts them all.
MOSHI_LORA_KEYS = ("self_attn.in_proj", "self_attn.out_proj", "gating.linear_in",
                   "gating.linear_out")
# The linears outside the layers, adapted whatever --num-layers says (moshi-finetune adapts
# every Linear of the LM): the text head and each depformer step's input and output.
HEAD_LINEARS = ("text_linear", "linear_in", "linear_out")
KYUTAI_LORA_NAME = "lora.safetensors"  # moshi-finetune's file in checkpoint_N/consolidated/


def moshi_lora_paths(lm: Lm, num_layers: int = -1, keys: Sequence[str] = MOSHI_LORA_KEYS
                     ) -> list[str]:
    """The chosen kinds (`keys`) in the last `num_layers` layers of the temporal transformer
    and of every depformer step (-1 or more than a stack has: all), plus the head linears.
    With everything chosen these are all the Linears of the LM, as moshi-finetune's."""
    unknown = sorted(set(keys) - set(MOSHI_LORA_KEYS))
    if unknown or not keys:
        raise MoshiError(f"unknown LoRA target modules {unknown or '(none)'}: choose among "
                         f"{', '.join(MOSHI_LORA_KEYS)}")
    if num_layers == 0 or num_layers < -1:
        raise MoshiError(f"--num-layers must be -1 (all) or >= 1, got {num_layers}")
    if lm.depformer is None:
        raise MoshiError("this LM has no depformer (a speech-to-text model?): Moshi "
                         "fine-tuning needs Moshi")
    stacks = [("transformer", len(lm.transformer.layers))] + [
        (f"depformer.slices.{k}.transformer", len(part.transformer.layers))
        for k, part in enumerate(lm.depformer.slices)]
    chosen = {"text_linear"}
    for k in range(len(lm.depformer.slices)):
        chosen |= {f"depformer.slices.{k}.{name}" for name in HEAD_LINEARS[1:]}
    for stack, count in stacks:
        first = 0 if num_layers == -1 else max(0, count - num_layers)
        chosen |= {f"{stack}.layers.{i}.{key}" for i in range(first, count) for key in keys}
    return select_linears(lm, lambda path, _: path in chosen)


def is_kyutai_lora(path: str | os.PathLike) -> bool:
    """A moshi-finetune LoRA: its lora.safetensors, or a folder holding one and no
    adapter_config.json of ours."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".safetensors"
    return (path / KYUTAI_LORA_NAME).is_file() and not (path / ADAPTER_CONFIG_NAME).is_file()


def adapter_weights_file(path: str | os.PathLike) -> Path:
    """The tensors file of an adapter folder of ours or of a moshi-finetune LoRA."""
    path = Path(path)
    if is_kyutai_lora(path):
        return path if path.is_file() else path / KYUTAI_LORA_NAME
    return path / ADAPTER_WEIGHTS_NAME


def read_kyutai(path: str | os.PathLike, config: str | os.PathLike | None, dep_q: int
                ) -> KyutaiLora:
    path = Path(path)
    return read_kyutai_lora(path / KYUTAI_LORA_NAME if path.is_dir() else path, config, dep_q)


def apply_kyutai_lora(lm: Lm, lora_weight: str | os.PathLike,
                      lora_config: str | os.PathLike | None = None) -> KyutaiLora:
    """Put moshi-finetune's LoRA on `lm` as LoRA layers (kept apart; `fuse_lora` fuses)."""
    lora = read_kyutai(lora_weight, lora_config, lm.cfg.dep_q)
    settings = lora.settings()
    known = set(select_linears(lm, lambda path, _: True))
    for path in settings.paths:
        if path not in known:
            raise WeightsError(f"{lora_weight}: the LoRA adapts {path}, which this model lacks "
                               "(a LoRA made for another model?)")
    apply_lora(lm, settings.paths, settings.rank, settings.scale)
    set_adapter_tensors(lm, lora.adapter_tensors(), str(lora_weight))
    lm.eval()
    return lora


@dataclass(frozen=True)
class LmAdapterOptions:
    """An adapter to run Moshi with: an adapter folder of ours (`adapter_path`, kept apart:
    LoRA layers over the base) or moshi-finetune's LoRA file (`lora_weight` with its
    `lora_config`, default the config.json beside it), fused into the base unless not `fuse`
    (as moshi.server's --lora-weight / --no-fuse-lora)."""

    adapter_path: str | None = None
    lora_weight: str | None = None
    lora_config: str | None = None
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.adapter_path is not None and self.lora_weight is not None:
            raise MoshiError("give --adapter-path or --lora-weight, not both")
        if self.lora_config is not None and self.lora_weight is None:
            raise MoshiError("--lora-config goes with --lora-weight")
        if not self.fuse and self.lora_weight is None:
            raise MoshiError("--no-fuse-lora goes with --lora-weight")

    @property
    def active(self) -> bool:
        return self.adapter_path is not None or self.lora_weight is not None

    def apply(self, lm: Lm, cpu_threads: int | None = None) -> None:
        """Put the adapter on `lm` (loaded, not yet generating); cpu_threads: the split the
        loader made (load_lm's cpu_threads), made again over the new layers."""
        if not self.active:
            return
        lm.use_cpu_threads(1)  # LoRA wraps (or fusing replaces) plain layers
        if self.adapter_path is not None:
            if is_kyutai_lora(self.adapter_path):
                apply_kyutai_lora(lm, self.adapter_path)
            else:
                load_adapter(lm, self.adapter_path, family=FAMILY)
        else:
            apply_kyutai_lora(lm, self.lora_weight, self.lora_config)
            if self.fuse:
                fuse_lora(lm)
        lm.use_cpu_threads(default_cpu_threads() if cpu_threads is None else cpu_threads)
        lm.adapter_fingerprint = self.fingerprint()

    def fingerprint(self) -> str:
        """A digest of the adapter's files (weights and settings), fused or kept apart alike:
        what a saved prompt state made with this adapter records of it."""
        digest = hashlib.sha256()
        weights = adapter_weights_file(self.adapter_path or self.lora_weight)
        settings = Path(self.lora_config) if self.lora_config is not None else \
            weights.parent / ("config.json" if is_kyutai_lora(weights) else ADAPTER_CONFIG_NAME)
        for path in (weights, settings):
            if path.is_file():
                digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


def fuse_deltas(adapter_path: str | os.PathLike, weight_shapes: dict[str, tuple[int, ...]],
                family: str | None) -> dict[str, mx.array]:
    """weights_convert --adapter-path: what fusing adds to each weight, for an adapter folder
    of ours (any family) or, for Moshi, moshi-finetune's lora.safetensors (or its folder)."""
    if is_kyutai_lora(adapter_path):
        if family not in (None, FAMILY):
            raise WeightsError(f"{adapter_path}: a moshi-finetune LoRA is for Moshi, not "
                               f"{family}")
        dep_q = sum(1 for name in weight_shapes
                    if name.startswith("depformer.slices.") and name.endswith(".linear_in.weight"))
        lora = read_kyutai(adapter_path, None, dep_q)
        return lora.deltas(weight_shapes, str(adapter_path))
    return adapter_deltas(adapter_path, weight_shapes, family)[1]
