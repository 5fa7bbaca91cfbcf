"""The CSM fixture's Sesame tensors in the other layouts the loader reads: transformers'
(sesame/csm-1b's CsmForConditionalGeneration) and mlx-audio's (mlx-community/csm-1b). Each
derived file is checked against a manifest of the real layout where one is recorded
(hf_model.manifest.json, mlx_audio_model.manifest.json)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from transformers_layout import half_split_rope_rows

CSM = Path(__file__).parent / "fixtures" / "csm"


def hf_from_sesame(sesame: dict[str, np.ndarray], flavors: dict) -> dict[str, np.ndarray]:
    """The Sesame tensors in the transformers layout: convert_csm.py's mapping as documented in
    the fixtures' research notes."""
    heads = {"backbone": flavors["fixture-backbone"], "decoder": flavors["fixture-decoder"]}
    renames = [
        (r"^backbone\.layers\.", "backbone_model.layers."),
        (r"^decoder\.layers\.", "depth_decoder.model.layers."),
        (r"\.attn\.output_proj\.", ".self_attn.o_proj."),
        (r"\.attn\.", ".self_attn."),
        (r"\.mlp\.w1\.", ".mlp.gate_proj."),
        (r"\.mlp\.w2\.", ".mlp.down_proj."),
        (r"\.mlp\.w3\.", ".mlp.up_proj."),
        (r"\.sa_norm\.scale$", ".input_layernorm.weight"),
        (r"\.mlp_norm\.scale$", ".post_attention_layernorm.weight"),
        (r"^backbone\.norm\.scale$", "backbone_model.norm.weight"),
        (r"^decoder\.norm\.scale$", "depth_decoder.model.norm.weight"),
        (r"^text_embeddings\.", "embed_text_tokens."),
        (r"^audio_embeddings\.", "depth_decoder.model.embed_tokens."),
        (r"^codebook0_head\.", "lm_head."),
        (r"^audio_head$", "depth_decoder.codebooks_head.weight"),
        (r"^projection\.", "depth_decoder.model.inputs_embeds_projector."),
    ]
    out = {}
    for key, value in sesame.items():
        name = key
        for pattern, repl in renames:
            name = re.sub(pattern, repl, name)
        part = key.split(".")[0]
        if key.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            kw = heads[part]
            value = half_split_rope_rows(
                value, kw["num_heads"] if ".q_proj" in key else kw["num_kv_heads"])
        out[name] = np.ascontiguousarray(value)
    return out


def mlx_audio_from_sesame(sesame: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mlx-audio's layout (mlx-community/csm-1b) of the Sesame tensors, as its sanitize names
    them (benchmarks/derive_mlx_audio_csm.py recorded what mlx-audio itself holds)."""
    renames = [(r"\.attn\.output_proj\.", ".self_attn.o_proj."), (r"\.attn\.", ".self_attn."),
               (r"\.mlp\.w1\.", ".mlp.gate_proj."), (r"\.mlp\.w2\.", ".mlp.down_proj."),
               (r"\.mlp\.w3\.", ".mlp.up_proj."), (r"\.sa_norm\.scale$", ".input_layernorm.weight"),
               (r"\.mlp_norm\.scale$", ".post_attention_layernorm.weight"),
               (r"^(backbone|decoder)\.norm\.scale$", r"\1.norm.weight"), (r"^", "model.")]
    out = {}
    for key, value in sesame.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def write_transformers_csm(folder: Path) -> Path:
    """A transformers CSM folder (config.json, tokenizer.json, model.safetensors; no bundled
    codec) of the fixture model, checked tensor by tensor against the original file's
    manifest."""
    from references import assert_matches_manifest
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    flavors = json.loads((CSM / "sesame" / "flavors.json").read_text())
    save_file(hf_from_sesame(load_file(CSM / "sesame" / "model.safetensors"), flavors),
              folder / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((CSM / "hf_model.manifest.json").read_text())["tensors"]
    assert_matches_manifest(folder / "model.safetensors", manifest,
                            "derived transformers tensors against the original file")
    shutil.copy(CSM / "hf" / "config.json", folder / "config.json")
    shutil.copy(CSM / "hf" / "tokenizer.json", folder / "tokenizer.json")
    return folder


def write_mlx_audio_csm(folder: Path) -> Path:
    """mlx-audio's CSM folder of the fixture model (model_type sesame), checked against the
    manifest of what mlx-audio itself holds."""
    from references import assert_matches_manifest
    from safetensors.numpy import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(mlx_audio_from_sesame(load_file(CSM / "sesame" / "model.safetensors")),
              folder / "model.safetensors")
    manifest = json.loads((CSM / "mlx_audio_model.manifest.json").read_text())["tensors"]
    assert_matches_manifest(folder / "model.safetensors", manifest,
                            "derived mlx-audio tensors against mlx-audio's own")
    config = json.loads((CSM / "sesame" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "sesame"}))
    shutil.copy(CSM / "sesame" / "flavors.json", folder / "flavors.json")
    return folder
