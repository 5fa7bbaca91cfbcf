"""Which linears of CSM get LoRA: the chosen kinds (`keys`) in the last `num_layers` layers of
the backbone and, as many, of the depth decoder (both speak: the backbone picks codebook 0,
the decoder the other 31)."""

from __future__ import annotations

from collections.abc import Sequence

from moshi_mlx.errors import MoshiError
from moshi_mlx.models.csm import Csm
from moshi_mlx.training.lora import select_linears

CSM_LORA_KEYS = ("attn.qkv_proj", "attn.out_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj")


def csm_lora_paths(model: Csm, num_layers: int = -1,
                   keys: Sequence[str] = CSM_LORA_KEYS) -> list[str]:
    """num_layers: the last N layers of each stack (-1 or more than a stack has: all)."""
    unknown = sorted(set(keys) - set(CSM_LORA_KEYS))
    if unknown or not keys:
        raise MoshiError(f"unknown LoRA target modules {unknown or '(none)'}: choose among "
                         f"{', '.join(CSM_LORA_KEYS)}")
    if num_layers == 0 or num_layers < -1:
        raise MoshiError(f"--num-layers must be -1 (all) or >= 1, got {num_layers}")
    chosen = set()
    for stack, llama in (("backbone", model.backbone), ("decoder", model.decoder)):
        count = len(llama.layers)
        first = 0 if num_layers == -1 else max(0, count - num_layers)
        chosen |= {f"{stack}.layers.{i}.{key}" for i in range(first, count) for key in keys}
    return select_linears(model, lambda path, _: path in chosen)
