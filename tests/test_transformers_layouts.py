"""The transformers layouts (MoshiForConditionalGeneration, MimiModel) load like the official
ones: the tiny Moshi LM, in the layout transformers' own conversion script gives it (rebuilt and
checked against its manifest by tests/transformers_layout.py), reproduces the float32 PyTorch
goldens token for token, and the converter turns it into byte-identical MLX files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_lm import assert_matches_golden, run_greedy

from moshi_mlx import WeightsError, load_lm
from moshi_mlx.loading.models import read_lm_config
from moshi_mlx.models.lm_config import LmConfig, SttConfig
from moshi_mlx.models.lm_layouts import from_transformers_moshi
from weights_convert import convert


@pytest.fixture(scope="module")
def golden(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "lm_golden.npz") as data:
        return {k: data[k] for k in data.files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_float32_greedy_matches_pytorch(transformers_moshi, fixtures_dir, golden):
    # A folder like kmhf/hf-moshiko: config.json (transformers keys) + model.safetensors.
    lm = load_lm(transformers_moshi, dtype=mx.float32)
    assert lm.cfg == read_lm_config(fixtures_dir / "lm_config.json")
    assert_matches_golden(run_greedy(lm, golden["user_codes"]), golden, "torch_f32")


@pytest.mark.parametrize(("bits", "prefix"), [(8, "torch_f32_deq_q8"), (4, "torch_f32_deq_q4")])
def test_quantize_on_load_matches_official_quantized_goldens(transformers_moshi, golden, bits,
                                                             prefix):
    lm = load_lm(transformers_moshi, quantize=bits, dtype=mx.float32)
    result = run_greedy(lm, golden["user_codes"])
    np.testing.assert_array_equal(result["text"], golden[f"{prefix}_text"])
    np.testing.assert_array_equal(result["audio_raw"], golden[f"{prefix}_audio_raw"])


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_converter_output_is_byte_identical_to_the_official_layouts(
    transformers_moshi, fixtures_dir, tmp_path, bits
):
    official = convert(tmp_path / "official", input_path=fixtures_dir / "lm_pytorch.safetensors",
                       config=fixtures_dir / "lm_config.json", bits=bits)
    ours = convert(tmp_path / "transformers", hf_repo=str(transformers_moshi), bits=bits)
    assert ours.model_file.name == official.model_file.name
    assert _sha256(ours.model_file) == _sha256(official.model_file)
    # The folder's config.json holds the official keys, whatever the source's layout; the
    # transformers file's bundled Mimi goes into the folder too, named and described there.
    config = json.loads((tmp_path / "transformers" / "config.json").read_text())
    codec = {key: config.pop(key) for key in ("mimi_name", "codec_config")}
    assert config == json.loads((tmp_path / "official" / "config.json").read_text())
    source_config = json.loads((transformers_moshi / "config.json").read_text())
    assert codec == {"mimi_name": "mimi.safetensors",
                     "codec_config": source_config["audio_encoder_config"]}
    assert ours.manifest["source"]["sha256"] == _sha256(transformers_moshi / "model.safetensors")


def test_transformers_config_maps_to_ours(fixtures_dir):
    data = json.loads((fixtures_dir / "lm_transformers_config.json").read_text())
    assert LmConfig.from_dict(data) == read_lm_config(fixtures_dir / "lm_config.json")


def test_transformers_default_moshi_config_is_the_7b():
    # MoshiConfig() of transformers (kmhf/hf-moshiko's architecture), its architecture keys.
    data = {
        "model_type": "moshi", "vocab_size": 32000, "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "head_dim": 128, "ffn_dim": 22528, "hidden_act": "silu", "rms_norm_eps": 1e-8,
        "sliding_window": 3000, "max_position_embeddings": 3000, "num_codebooks": 8,
        "audio_vocab_size": 2048, "rope_parameters": {"rope_theta": 10000.0,
                                                      "rope_type": "default"},
        "depth_decoder_config": {
            "hidden_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 16,
            "num_key_value_heads": 16, "head_dim": 64, "ffn_dim": 5632, "hidden_act": "silu",
            "rms_norm_eps": 1e-8, "sliding_window": 8, "max_position_embeddings": 9,
            "model_type": "moshi_depth", "input_size": 4096, "audio_vocab_size": 2048,
            "vocab_size": 32000, "num_codebooks": 8,
        },
    }
    assert LmConfig.from_dict(data) == LmConfig.moshi_7b()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 8}, "num_key_value_heads must equal num_attention_heads"),
        ({"hidden_act": "gelu"}, "hidden_act must be silu"),
        ({"rope_scaling": {"type": "linear"}}, "only the default RoPE"),
        ({"sliding_windows": 4}, "unknown transformers Moshi config key.*sliding_windows"),
    ],
)
def test_unsupported_transformers_config_is_a_clear_error(fixtures_dir, change, message):
    data = json.loads((fixtures_dir / "lm_transformers_config.json").read_text())
    with pytest.raises(WeightsError, match=message) as info:
        from_transformers_moshi({**data, **change}, "config.json")
    assert "\n" not in str(info.value)


def _write(path: Path, tensors: dict[str, mx.array]) -> None:
    from moshi_mlx.loading.safetensors import SAFETENSORS_DTYPE_NAMES, tensor_to_bytes

    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        blob = tensor_to_bytes(array)
        header[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def _copy_without(folder: Path, dest: Path, drop: str | None = None,
                  add: str | None = None) -> Path:
    """A copy of the transformers folder with one tensor removed or one extra tensor added."""
    from moshi_mlx.loading.safetensors import read_safetensors

    tensors = read_safetensors(folder / "model.safetensors")
    if drop:
        del tensors[drop]
    if add:
        tensors[add] = mx.zeros((4,), mx.bfloat16)
    dest.mkdir()
    _write(dest / "model.safetensors", tensors)
    shutil.copy(folder / "config.json", dest / "config.json")
    return dest


@pytest.fixture(scope="module")
def sharded_moshi(transformers_moshi, tmp_path_factory) -> Path:
    """The same checkpoint as save_pretrained shards it: model-0000i-of-00003.safetensors +
    model.safetensors.index.json (names spread over the shards, q/k/v of a layer split)."""
    from moshi_mlx.loading.safetensors import read_safetensors

    dest = tmp_path_factory.mktemp("sharded")
    tensors = read_safetensors(transformers_moshi / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        _write(dest / shard, {name: tensors[name] for name in names[i::3]})
        weight_map.update(dict.fromkeys(names[i::3], shard))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(transformers_moshi / "config.json", dest / "config.json")
    return dest


def test_sharded_checkpoint_loads_and_converts_like_one_file(sharded_moshi, transformers_moshi,
                                                              golden, tmp_path):
    lm = load_lm(sharded_moshi, dtype=mx.float32)
    result = run_greedy(lm, golden["user_codes"], steps=5)
    np.testing.assert_array_equal(result["text"], golden["torch_f32_text"][:5])
    one = convert(tmp_path / "one", hf_repo=str(transformers_moshi), bits=4)
    sharded = convert(tmp_path / "sharded", hf_repo=str(sharded_moshi), bits=4)
    assert _sha256(sharded.model_file) == _sha256(one.model_file)


def test_unknown_tensor_names_the_transformers_layout(transformers_moshi, tmp_path):
    bad = _copy_without(transformers_moshi, tmp_path / "bad",
                        add="depth_decoder.layers.0.cross_attn.weight")
    with pytest.raises(WeightsError, match="transformers-layout Moshi LM") as info:
        load_lm(bad)
    assert "depth_decoder.layers.0.cross_attn.weight" in str(info.value)


def test_missing_k_projection_is_a_clear_error(transformers_moshi, tmp_path):
    bad = _copy_without(transformers_moshi, tmp_path / "bad",
                        drop="decoder.model.layers.1.self_attn.k_proj.linear.weight")
    with pytest.raises(WeightsError, match="lacks part of transformer.layers.1.self_attn.in_proj"):
        load_lm(bad)


def test_bundled_mimi_loads_with_its_audio_encoder_config(transformers_moshi):
    """kmhf/hf-moshiko has no separate Mimi file: load_mimi reads the `audio_encoder.*`
    tensors of the LM's folder, with the architecture of `audio_encoder_config`."""
    from moshi_mlx.loading.models import load_mimi

    mimi = load_mimi(transformers_moshi, num_codebooks=8)
    config = json.loads((transformers_moshi / "config.json").read_text())["audio_encoder_config"]
    assert (mimi.cfg.dim, mimi.cfg.seanet.n_filters, mimi.cfg.codebook_dim,
            mimi.cfg.max_codebooks) == (config["hidden_size"], config["num_filters"],
                                        config["codebook_dim"], config["num_quantizers"])
    # A tensor that keeps its values through the mapping: the first conv's bias.
    from mlx.utils import tree_flatten
    from transformers_layout import _bf16, tiny_mimi_value

    params = dict(tree_flatten(mimi.parameters()))
    bias = params["encoder.model.0.conv.conv.bias"]
    expected = _bf16(tiny_mimi_value("encoder.layers.0.conv.bias", tuple(bias.shape)))
    np.testing.assert_array_equal(np.array(bias.astype(mx.bfloat16).view(mx.uint16)), expected)
    pcm = np.random.default_rng(0).normal(0, 0.1, 3 * 1920).astype(np.float32)
    codes = mimi.encode(pcm)
    assert codes.shape == (1, 8, 3)
    assert mimi.decode(codes).shape == (1, 1, 3 * 1920)


def test_projections_without_the_linear_level_load_the_same(transformers_moshi, golden,
                                                           tmp_path):
    # Older conversions named the projections `self_attn.q_proj.weight` (no `.linear`).
    from moshi_mlx.loading.safetensors import read_safetensors

    tensors = {name.replace("_proj.linear.", "_proj."): array for name, array in
               read_safetensors(transformers_moshi / "model.safetensors").items()}
    assert not any(".linear." in name for name in tensors)
    _write(tmp_path / "model.safetensors", tensors)
    shutil.copy(transformers_moshi / "config.json", tmp_path / "config.json")
    result = run_greedy(load_lm(tmp_path, dtype=mx.float32), golden["user_codes"], steps=5)
    np.testing.assert_array_equal(result["text"], golden["torch_f32_text"][:5])
    np.testing.assert_array_equal(result["audio_raw"], golden["torch_f32_audio_raw"][:5])


# --------------------------------------------------------------------------- Kyutai STT
# The tiny STT in the layout of transformers' convert_kyutai_speech_to_text_to_hf.py
# (kyutai/stt-*-trfs): one embedding table, lm_head with a zero row, split q/k/v, no VAD heads
# (the script has none: they were left out before converting), a tiny Mimi as `codec_model`.


def _architecture(cfg: LmConfig) -> dict:
    """The fields that shape an STT model (the depformer ones are unused with dep_q 0)."""
    return {k: v for k, v in cfg.to_dict().items() if not k.startswith("depformer")}


def _official_stt_without_heads(fixtures_dir: Path) -> LmConfig:
    return read_lm_config(fixtures_dir / "stt" / "stt_config.json").with_overrides(
        extra_heads_num_heads=0)


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_stt_float32_tokens_and_vad_match_pytorch(transformers_stt, fixtures_dir, stt_golden,
                                                  version):
    from test_stt_lm import assert_matches, run_stt

    # The -trfs layout has no VAD heads: they come from the PyTorch (-candle-like) file.
    lm = load_lm(transformers_stt, dtype=mx.float32,
                 vad_weights=fixtures_dir / "stt" / "stt_pytorch.safetensors")
    result = run_stt(lm, stt_golden[f"codes_{version}"])
    assert result["text"].shape[1] == stt_golden[f"torch_f32_B_{version}_text"].size
    assert_matches(result, stt_golden, f"torch_f32_B_{version}")


def _stt_tokens(lm, codes: np.ndarray) -> np.ndarray:
    """Greedy text tokens of official steps 0..T on codes [32, T] (timing B)."""
    from moshi_mlx import SttGen

    gen = SttGen(lm, temp=0.0)
    tokens = [int(gen.initial_text[0])]
    for t in range(codes.shape[1]):
        tokens.append(int(gen.step(codes[None, :, t])[0][0]))
    return np.array(tokens)


def test_stt_without_vad_weights_has_no_heads_and_the_same_tokens(transformers_stt,
                                                                   fixtures_dir, stt_golden):
    lm = load_lm(transformers_stt, dtype=mx.float32)
    assert lm.extra_heads == []
    # config.json + preprocessor_config.json give the official architecture and stt_config.
    assert _architecture(lm.cfg) == _architecture(_official_stt_without_heads(fixtures_dir))
    assert lm.cfg.stt_config == SttConfig(audio_delay_seconds=0.5,
                                          audio_silence_prefix_seconds=0.0)
    np.testing.assert_array_equal(_stt_tokens(lm, stt_golden["codes_v1"]),
                                  stt_golden["torch_f32_B_v1_text"])


def test_stt_quantize_on_load_matches_the_q4_golden(transformers_stt, stt_golden):
    lm = load_lm(transformers_stt, quantize=4, dtype=mx.float32)
    np.testing.assert_array_equal(_stt_tokens(lm, stt_golden["codes_v1"]),
                                  stt_golden["torch_f32_deq_q4_B_v1_text"])


def _pytorch_stt_without_heads(fixtures_dir: Path, path: Path) -> Path:
    """The official PyTorch file as the -trfs repos were converted from (no extra heads)."""
    from moshi_mlx.loading.safetensors import read_safetensors

    tensors = read_safetensors(fixtures_dir / "stt" / "stt_pytorch.safetensors")
    _write(path, {k: v for k, v in tensors.items() if not k.startswith("extra_heads.")})
    return path


@pytest.mark.parametrize("bits", [None, 4])
def test_stt_converter_output_is_byte_identical_to_the_official_layout(
    transformers_stt, fixtures_dir, tmp_path, bits
):
    source = _pytorch_stt_without_heads(fixtures_dir, tmp_path / "stt_pytorch.safetensors")
    official = convert(tmp_path / "official", input_path=source,
                       config=fixtures_dir / "stt" / "stt_config.json", bits=bits)
    ours = convert(tmp_path / "transformers", hf_repo=str(transformers_stt), bits=bits)
    assert ours.model_file.name == official.model_file.name
    assert _sha256(ours.model_file) == _sha256(official.model_file)
    # The folder's config.json holds official keys (model_type stt, the stt_config of the
    # preprocessor_config.json), the same architecture as the official config.
    data = json.loads((tmp_path / "transformers" / "config.json").read_text())
    assert data["model_type"] == "stt"
    assert data["stt_config"] == {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0}
    written = LmConfig.from_dict({k: v for k, v in data.items() if k != "quantization"})
    assert _architecture(written) == _architecture(_official_stt_without_heads(fixtures_dir))


def test_stt_transformers_config_maps_to_ours(fixtures_dir, tmp_path):
    data = json.loads((fixtures_dir / "stt" / "stt_transformers_config.json").read_text())
    cfg = LmConfig.from_dict(data)  # no preprocessor_config.json beside a dict: no stt_config
    assert cfg.stt_config is None and cfg.is_stt and cfg.extra_heads_num_heads == 0
    expected = _official_stt_without_heads(fixtures_dir).with_overrides(stt_config=None)
    assert _architecture(cfg) == _architecture(expected)
    # stt-2.6b-en-trfs's feature extractor: 2.5 s delay, 1 s silence prefix.
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"audio_delay_seconds": 2.5, "audio_silence_prefix_seconds": 1.0,
         "feature_extractor_type": "KyutaiSpeechToTextFeatureExtractor"}))
    assert read_lm_config(tmp_path / "config.json").stt_config == SttConfig(2.5, 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads must equal num_attention_heads"),
        ({"audio_pad_token_id": 5}, "audio_pad_token_id must be 66569"),
        ({"rope_parameters": {"rope_type": "yarn"}}, "only the default RoPE"),
        ({"sliding_windows": 4}, "unknown transformers Kyutai STT config key.*sliding_windows"),
    ],
)
def test_unsupported_stt_transformers_config_is_a_clear_error(fixtures_dir, change, message):
    data = json.loads((fixtures_dir / "stt" / "stt_transformers_config.json").read_text())
    with pytest.raises(WeightsError, match=message) as info:
        LmConfig.from_dict({**data, **change}, "config.json")
    assert "\n" not in str(info.value) and "transformers Kyutai STT" in str(info.value)


def test_stt_unknown_tensor_names_the_transformers_stt_layout(transformers_stt, tmp_path):
    bad = _copy_without(transformers_stt, tmp_path / "bad", add="model.layers.0.cross_attn.weight")
    with pytest.raises(WeightsError, match="transformers-layout Kyutai STT") as info:
        load_lm(bad)
    assert "model.layers.0.cross_attn.weight" in str(info.value)


def test_stt_embedding_table_of_another_size_is_a_clear_error(transformers_stt, tmp_path):
    data = json.loads((transformers_stt / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_codebooks": 31,
                                                      "audio_pad_token_id": None}))
    shutil.copy(transformers_stt / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="does not have the 64521 rows"):
        load_lm(tmp_path)


def test_stt_bundled_mimi_loads_with_its_codec_config(transformers_stt):
    """The -trfs repos have no separate Mimi file: load_mimi reads the `codec_model.*`
    tensors of the LM's folder, with the architecture of `codec_config`."""
    from mlx.utils import tree_flatten
    from transformers_layout import tiny_mimi_value

    from moshi_mlx.loading.models import load_mimi

    mimi = load_mimi(transformers_stt, num_codebooks=32)
    config = json.loads((transformers_stt / "config.json").read_text())["codec_config"]
    assert (mimi.cfg.dim, mimi.cfg.seanet.n_filters, mimi.cfg.codebook_dim,
            mimi.cfg.max_codebooks) == (config["hidden_size"], config["num_filters"],
                                        config["codebook_dim"], config["num_quantizers"])
    bias = dict(tree_flatten(mimi.parameters()))["encoder.model.0.conv.conv.bias"]
    expected = tiny_mimi_value("encoder.layers.0.conv.bias", tuple(bias.shape))
    np.testing.assert_array_equal(np.array(bias), expected)  # stored float32, kept exactly
    pcm = np.random.default_rng(0).normal(0, 0.1, 3 * 1920).astype(np.float32)
    assert mimi.encode(pcm).shape == (1, 32, 3)


def test_stt_cli_on_the_transformers_folder_gives_the_official_words(transformers_stt,
                                                                      fixtures_dir, stt_golden,
                                                                      tmp_path, capsys):
    """python -m moshi_mlx.stt --hf-repo <a -trfs folder>: only the sentencepiece tokenizer is
    missing from such a repo; the words equal the official Rust word logic's."""
    import sentencepiece
    from references import rust_golden_words

    from moshi_mlx.stt import main

    codes = tmp_path / "codes.npy"
    np.save(codes, stt_golden["codes_v1"][:, :175].astype(np.int32))
    tokenizer = fixtures_dir / "stt" / "stt_tokenizer.model"
    code = main(["--hf-repo", str(transformers_stt), "--tokenizer", str(tokenizer),
                 "--codes", str(codes), "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    words = [(w["word"], w["start"], w["end"]) for w in json.loads(out)["words"]]
    decode = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).decode
    expected = rust_golden_words(stt_golden, decode)
    assert [w for w, _, _ in words[: len(expected)]] == [w for w, _, _ in expected]
    np.testing.assert_allclose([t for _, s, e in words[: len(expected)] for t in (s, e)],
                               [t for _, s, e in expected for t in (s, e)], atol=1e-3)


def test_stt_cli_reads_audio_through_the_bundled_codec(transformers_stt, fixtures_dir, capsys):
    """Without --mimi-weight the -trfs file's own codec (codec_model.*) encodes the audio:
    the same transcript as naming that file as the Mimi."""
    from moshi_mlx.stt import main

    args = ["--hf-repo", str(transformers_stt), "--tokenizer",
            str(fixtures_dir / "stt" / "stt_tokenizer.model"), str(fixtures_dir / "speech.wav")]
    assert main(args) == 0
    bundled = capsys.readouterr().out
    assert main([*args, "--mimi-weight", str(transformers_stt / "model.safetensors")]) == 0
    assert capsys.readouterr().out == bundled and bundled.strip()
