"""The state after the prompt phases, saved to a safetensors file and read back (issue 19:
`--save-prompt-state` / `--prompt-state`), so a restart skips running the phases.

The file holds everything an `LmStreamState` carries (every layer's keys / values up to the
position reached, the steps, the last text and audio tokens and logits, the user frames the
delays still read, the PRNG key) and, in its metadata, what it was made with: the model
(config, compute dtype, quantization, a fingerprint of its weights) and the prompt. Reading
it into another model raises PromptError (one line) before anything changes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from moshi_mlx.errors import PromptError
from moshi_mlx.models.lm_state import LmStreamState
from moshi_mlx.modules.cache import KVCache

FORMAT = "moshi_mlx.prompt_state"
VERSION = 1


def model_identity(lm: Any) -> dict[str, Any]:
    """What a prompt state depends on: the config, compute dtype and quantization (see
    `planned_identity`), and a fingerprint of the weights: the output norm's gains
    (fine-tunes of one architecture, e.g. Moshiko and Moshika, differ there) and the
    adapter's digest when one was put on the model (`lm.adapter_fingerprint`)."""
    quantized = [m for _, m in lm.named_modules() if isinstance(m, nn.QuantizedLinear)]
    gains = np.asarray(lm.out_norm.weight.astype(mx.float32))
    digest = hashlib.sha256(gains.tobytes())
    adapter = getattr(lm, "adapter_fingerprint", None)
    if adapter is not None:
        digest.update(f"adapter {adapter}".encode())
    return {**planned_identity(lm.cfg, lm.out_norm.weight.dtype,
                               quantized[0] if quantized else None),
            "weights": digest.hexdigest()[:16]}


def planned_identity(config: Any, dtype: mx.Dtype, quantization: Any) -> dict[str, Any]:
    """The part of `model_identity` known before the weights load: the LmConfig, the compute
    dtype and the quantization (anything with `bits` and `group_size`, or None)."""
    return {"config": config.to_dict(), "dtype": str(dtype),
            "quantization": None if quantization is None else {
                "bits": int(quantization.bits), "group_size": int(quantization.group_size)}}


def copy_state(state: LmStreamState) -> LmStreamState:
    """An independent copy (a step writes into its caches' buffers in place)."""
    caches = []
    for cache in state.caches:
        twin = KVCache(cache.context, cache.grow_step)
        if cache.keys is not None:
            twin.keys, twin.values = mx.array(cache.keys), mx.array(cache.values)
        twin.offset = cache.offset
        caches.append(twin)
    return LmStreamState(
        caches=caches, key=mx.array(state.key), steps=state.steps,
        text=None if state.text is None else mx.array(state.text),
        text_logits=None if state.text_logits is None else mx.array(state.text_logits),
        audio_tokens=[mx.array(a) for a in state.audio_tokens],
        user_codes=[mx.array(u) for u in state.user_codes],
        audio_logits=None if state.audio_logits is None else
        [mx.array(a) for a in state.audio_logits])


def save_state(path: str | Path, state: LmStreamState, identity: dict[str, Any],
               prompt: dict[str, Any]) -> None:
    """Write `state` (keys / values up to the position reached) with `identity` (see
    `model_identity`) and a description of the prompt."""
    arrays: dict[str, mx.array] = {"key": state.key}
    offsets = []
    for i, cache in enumerate(state.caches):
        offsets.append(cache.offset)
        if cache.keys is not None:
            held = min(cache.offset, cache.keys.shape[2])
            arrays[f"cache.{i}.keys"] = cache.keys[:, :, :held]
            arrays[f"cache.{i}.values"] = cache.values[:, :, :held]
    for name, value in (("text", state.text), ("text_logits", state.text_logits)):
        if value is not None:
            arrays[name] = value
    for name, values in (("audio_tokens", state.audio_tokens),
                         ("user_codes", state.user_codes),
                         ("audio_logits", state.audio_logits or [])):
        for j, value in enumerate(values):
            arrays[f"{name}.{j}"] = value
    layout = {"steps": state.steps, "offsets": offsets,
              "contexts": [c.context for c in state.caches],
              "grow_steps": [c.grow_step for c in state.caches],
              "audio_tokens": len(state.audio_tokens), "user_codes": len(state.user_codes),
              "audio_logits": len(state.audio_logits or [])}
    metadata = {"format": FORMAT, "version": str(VERSION), "model": json.dumps(identity),
                "state": json.dumps(layout), "prompt": json.dumps(prompt)}
    path = Path(path)
    partial = path.with_name(path.name + ".partial.safetensors")
    mx.eval(list(arrays.values()))
    mx.save_safetensors(str(partial), arrays, metadata=metadata)
    partial.replace(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a prompt state file (its header only): {"model", "state", "prompt"}.
    PromptError when the file is missing or is not a prompt state."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= 100_000_000:
                raise ValueError
            header = json.loads(f.read(length))
        meta = header["__metadata__"]
        if meta.get("format") != FORMAT:
            raise ValueError
        if int(meta["version"]) != VERSION:
            raise PromptError(f"{path.name}: prompt state version {meta['version']}, this "
                              f"version reads {VERSION}")
        return {key: json.loads(meta[key]) for key in ("model", "state", "prompt")}
    except FileNotFoundError:
        raise PromptError(f"prompt state not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PromptError(f"{path.name} is not a prompt state file (saved with "
                          "--save-prompt-state)") from None


def check_state_model(path: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the state file `path` (see `read_metadata`); PromptError (one line)
    when it was saved with another model than `identity` describes (`model_identity`, or
    `planned_identity` before the weights load: no weight fingerprint to compare then)."""
    path = Path(path)
    meta = read_metadata(path)
    mismatch = _differences(meta["model"], identity)
    if mismatch:
        raise PromptError(f"{path.name} was saved with {mismatch}; run the prompt again "
                          "(--save-prompt-state) with this model")
    return meta


def _differences(saved: dict[str, Any], ours: dict[str, Any]) -> str:
    if saved["config"] != ours["config"]:
        keys = sorted(k for k in set(saved["config"]) | set(ours["config"])
                      if saved["config"].get(k) != ours["config"].get(k))
        return "a model of another shape (config " + ", ".join(keys[:4]) + " differ)"
    for key, what in (("dtype", "another compute dtype"), ("quantization", "another quantization"),
                      ("weights", "other weights")):
        if key in ours and saved.get(key) != ours[key]:
            return f"{what} ({saved[key]} there, {ours[key]} here)"
    return ""


def load_state(path: str | Path, identity: dict[str, Any]) -> tuple[LmStreamState, dict]:
    """The state saved in `path` and its prompt description; PromptError (one line) when it
    was saved with another model (see `model_identity`) or is damaged."""
    path = Path(path)
    meta = check_state_model(path, identity)
    layout = meta["state"]
    try:
        arrays = mx.load(str(path))
        caches = []
        for i, offset in enumerate(layout["offsets"]):
            cache = KVCache(layout["contexts"][i], layout["grow_steps"][i])
            if f"cache.{i}.keys" in arrays:
                keys, values = arrays[f"cache.{i}.keys"], arrays[f"cache.{i}.values"]
                cache._reserve(keys, values, keys.shape[2])
                cache.keys[:, :, : keys.shape[2]] = keys
                cache.values[:, :, : values.shape[2]] = values
            cache.offset = int(offset)
            caches.append(cache)
        state = LmStreamState(
            caches=caches, key=arrays["key"], steps=int(layout["steps"]),
            text=arrays.get("text"), text_logits=arrays.get("text_logits"),
            audio_tokens=[arrays[f"audio_tokens.{j}"] for j in range(layout["audio_tokens"])],
            user_codes=[arrays[f"user_codes.{j}"] for j in range(layout["user_codes"])],
            audio_logits=[arrays[f"audio_logits.{j}"] for j in range(layout["audio_logits"])]
            or None)
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError):
        raise PromptError(f"{path.name}: the prompt state is damaged (save it again)") from None
    return state, meta["prompt"]
