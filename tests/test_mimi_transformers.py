"""load_mimi on the transformers layout (`MimiModel.save_pretrained`, kyutai/mimi): the random
real-size checkpoint rewritten here with numpy the way transformers' conversion script renames
and splits it must load to exactly the model the official file gives (whose codes and audio
match rustymimi: test_mimi.py), from a file, a folder or shards.

That the rewrite is the one transformers makes is shown outside the tests, with transformers'
own script and models: tools/derive_transformers_layouts.py (same codes and audio).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from transformers_layout import half_split_rope_rows

from moshi_mlx import WeightsError
from moshi_mlx.loading.models import load_mimi

# transformers' MimiConfig() (kyutai/mimi's architecture): the keys our mapping reads.
CONFIG = {
    "model_type": "mimi", "architectures": ["MimiModel"], "sampling_rate": 24000,
    "audio_channels": 1, "hidden_size": 512, "num_filters": 64, "num_residual_layers": 1,
    "upsampling_ratios": [8, 6, 5, 4], "kernel_size": 7, "last_kernel_size": 3,
    "residual_kernel_size": 3, "dilation_growth_rate": 2, "use_causal_conv": True,
    "pad_mode": "constant", "compress": 2, "trim_right_ratio": 1.0, "codebook_size": 2048,
    "codebook_dim": 256, "num_quantizers": 32, "use_conv_shortcut": False,
    "vector_quantization_hidden_dimension": 256, "num_semantic_quantizers": 1,
    "upsample_groups": 512, "num_hidden_layers": 8, "intermediate_size": 2048,
    "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "gelu",
    "max_position_embeddings": 8000, "norm_eps": 1e-05, "use_cache": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "sliding_window": 250, "attention_dropout": 0.0, "layer_scale_initial_scale": 0.01,
    "attention_bias": False,
}

_RENAMES = [  # official -> transformers, applied in order (as the conversion script does)
    ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"), ("conv.conv", "conv"),
    ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"), ("_initialized", "initialized"), ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"), ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("self_attn.out_proj", "self_attn.o_proj"),
    ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"), ("layer_scale_2", "mlp_layer_scale"),
]


def to_transformers(official: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in official.items():
        for old, new in _RENAMES:
            key = key.replace(old, new)
        if key.endswith("in_proj_weight"):
            q, k, v = np.split(value, 3)
            base = key[: -len("in_proj_weight")]
            out[base + "q_proj.weight"] = half_split_rope_rows(q, 8)
            out[base + "k_proj.weight"] = half_split_rope_rows(k, 8)
            out[base + "v_proj.weight"] = v
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def official(random_mimi_path):
    return load_mimi(random_mimi_path, num_codebooks=8)


@pytest.fixture(scope="module")
def transformers_folder(random_mimi_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mimi_transformers")
    tensors = to_transformers(load_file(str(random_mimi_path)))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


def assert_same_model(a, b) -> None:
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(np.array(pa[key]), np.array(pb[key]), err_msg=key)
    assert a.cfg == b.cfg


def test_folder_and_file_load_the_official_model(transformers_folder, official):
    assert_same_model(load_mimi(transformers_folder, num_codebooks=8), official)
    assert_same_model(load_mimi(transformers_folder / "model.safetensors", num_codebooks=8),
                      official)


def test_sharded_folder_loads_the_official_model(transformers_folder, official, tmp_path):
    tensors = load_file(str(transformers_folder / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names[i::2]}, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(names[i::2], shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    assert_same_model(load_mimi(tmp_path, num_codebooks=8), official)


def test_unknown_tensor_names_the_transformers_layout(transformers_folder, tmp_path):
    tensors = load_file(str(transformers_folder / "model.safetensors"))
    tensors["encoder_transformer.layers.0.self_attn.rotary.inv_freq"] = np.zeros(4, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match="transformers-layout Mimi") as info:
        load_mimi(tmp_path / "model.safetensors")
    assert "rotary.inv_freq" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"pad_mode": "reflect"}, "pad_mode 'reflect' is not supported"),
    ({"num_semantic_quantizers": 2}, "num_semantic_quantizers"),
])
def test_unsupported_config_is_a_clear_error(transformers_folder, tmp_path, change, message):
    (tmp_path / "model.safetensors").symlink_to(transformers_folder / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **change}))
    with pytest.raises(WeightsError, match=re.escape(message)) as info:
        load_mimi(tmp_path)
    assert "transformers Mimi layout" in str(info.value)


def test_a_moshi_lm_is_named_when_given_as_mimi(fixtures_dir):
    with pytest.raises(WeightsError, match="official PyTorch layout"):
        load_mimi(fixtures_dir / "lm_pytorch.safetensors")
