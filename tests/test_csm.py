"""Sesame CSM against the reference goldens of tests/fixtures/csm (a tiny random csm-structured
model; frames and logits from transformers, agreeing with the Sesame recipe and mlx-audio).

The transformers-layout checkpoint is not shipped: `hf_dir` re-derives it from the Sesame file
with the documented convert_csm.py mapping (renames + rotate-half q/k permutation, written here
in numpy) and proves every tensor bit-identical to the original's sha256 manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from csm_layouts import write_mlx_audio_csm, write_transformers_csm
from mlx.utils import tree_flatten

from moshi_mlx.errors import MoshiError, WeightsError
from moshi_mlx.loading.models import load_csm, read_csm_config
from moshi_mlx.models.csm import (
    Csm,
    CsmConfig,
    quant_predicate,
    rope_inv_freq,
    sanitize,
)
from moshi_mlx.models.csm_layouts import SESAME_FLAVORS
from moshi_mlx.speech.generate import (
    ContextCache,
    Segment,
    build_prompt,
    generate_speech,
    load_tokenizer,
    split_sentences,
    stream_long_speech,
    stream_speech,
)

CSM = Path(__file__).parent / "fixtures" / "csm"
TEXT = {"a": "Hello from Sesame.", "b": "Numbers like seven and twelve are spoken slowly."}
SPEAKER = {"a": 0, "b": 1}
CONTEXT_TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(CSM / "csm_golden.npz") as z:
        return {k: z[k] for k in z.files}


def context_for(prompt: str, golden) -> list[Segment]:
    return [Segment(1, CONTEXT_TEXT, codes=golden["context_codes"])] if prompt == "b" else []


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    from safetensors.numpy import load_file, save_file

    folder = write_transformers_csm(tmp_path_factory.mktemp("csm_hf"))
    # The real file bundles its codec: a loader must skip those tensors.
    tensors = load_file(folder / "model.safetensors")
    tensors["codec_model.encoder.layers.0.conv.weight"] = np.ones((4, 1, 7), np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def models(hf_dir) -> dict[str, Csm]:
    return {"sesame": load_csm(CSM / "sesame", dtype=mx.float32),
            "hf": load_csm(hf_dir, dtype=mx.float32)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CSM / "tokenizer.json")


# ---------------------------------------------------------------- config, RoPE, layouts


@pytest.mark.parametrize("layout", ["sesame", "hf"])
def test_rope_frequencies_match_transformers(layout, golden):
    cfg = read_csm_config(CSM / layout / "config.json")
    for llama, key in ((cfg.backbone, "hf_backbone_inv_freq"), (cfg.decoder, "hf_depth_inv_freq")):
        got = rope_inv_freq(llama.head_dim, llama.rope_theta, llama.rope_scaling)
        np.testing.assert_allclose(got, golden[key], rtol=1e-6, atol=0)


def test_both_configs_describe_the_same_model():
    sesame = read_csm_config(CSM / "sesame" / "config.json")
    hf = read_csm_config(CSM / "hf" / "config.json")
    for a, b in ((sesame.backbone, hf.backbone), (sesame.decoder, hf.decoder)):
        assert (a.num_layers, a.dim, a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_dim) == (
            b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.head_dim, b.hidden_dim)
    assert (sesame.text_vocab_size, sesame.audio_vocab_size, sesame.num_codebooks) == (
        1024, 2051, 32)
    assert CsmConfig.from_dict(sesame.to_dict()) == sesame
    # our converter writes our form with the family's model_type (transformers' name too)
    written = {**hf.to_dict(), "model_type": "csm", "tokenizer_name": "tokenizer.json"}
    assert CsmConfig.from_dict(written) == hf


def test_real_flavors():
    cfg = CsmConfig.from_dict({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                               "text_vocab_size": 128256, "audio_vocab_size": 2051,
                               "audio_num_codebooks": 32})
    b, d = cfg.backbone, cfg.decoder
    assert (b.num_layers, b.dim, b.num_heads, b.num_kv_heads, b.head_dim, b.hidden_dim) == (
        16, 2048, 32, 8, 64, 8192)
    assert (d.num_layers, d.dim, d.num_heads, d.num_kv_heads, d.head_dim, d.hidden_dim) == (
        4, 1024, 8, 2, 128, 8192)
    assert set(SESAME_FLAVORS) == {"llama-1B", "llama-100M"}


def test_config_errors():
    with pytest.raises(WeightsError, match="Moshi/STT"):
        CsmConfig.from_dict({"dim": 4096, "text_card": 32000, "dep_q": 8})
    with pytest.raises(WeightsError, match="unknown CSM config keys"):
        CsmConfig.from_dict({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                             "text_vocab_size": 1, "audio_vocab_size": 1,
                             "audio_num_codebooks": 1, "surprise": 1})
    with pytest.raises(WeightsError, match="unknown backbone_flavor"):
        CsmConfig.from_dict({"backbone_flavor": "llama-7B", "decoder_flavor": "llama-100M",
                             "text_vocab_size": 1, "audio_vocab_size": 1,
                             "audio_num_codebooks": 1})


def test_transformers_layout_sanitizes_to_the_sesame_tensors(hf_dir):
    cfg = read_csm_config(CSM / "sesame" / "config.json")
    ours = sanitize(mx.load(str(CSM / "sesame" / "model.safetensors")), cfg)
    theirs = sanitize(mx.load(str(hf_dir / "model.safetensors")), cfg)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert np.array_equal(np.asarray(ours[key]), np.asarray(theirs[key])), key


def test_sanitize_rejects_other_checkpoints():
    cfg = read_csm_config(CSM / "sesame" / "config.json")
    with pytest.raises(WeightsError, match="Moshi/STT"):
        sanitize({"transformer.layers.0.self_attn.in_proj_weight": mx.zeros((3, 1))}, cfg)
    with pytest.raises(WeightsError, match="unknown tensors for the sesame"):
        sanitize({"backbone.layers.0.attn.output_proj.weight": mx.zeros((1, 1)),
                  "backbone.layers.0.attn.extra.weight": mx.zeros((1, 1))}, cfg)


def test_a_moshi_checkpoint_is_not_loaded_as_csm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dim": 64, "text_card": 10, "dep_q": 8}))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"x": mx.zeros((1,))})
    with pytest.raises(WeightsError, match="describes a Moshi model.*python -m moshi_mlx.local"):
        load_csm(tmp_path)


# ---------------------------------------------------------------- prompts and tokenizer


@pytest.mark.parametrize("tokenizer_file", ["tokenizer.json", "hf/tokenizer.json"])
@pytest.mark.parametrize("prompt", ["a", "b"])
def test_prompt_frames_match_the_references(prompt, tokenizer_file, golden):
    tok = load_tokenizer(CSM / tokenizer_file)
    tokens, mask = build_prompt(tok, context_for(prompt, golden), SPEAKER[prompt], TEXT[prompt])
    np.testing.assert_array_equal(tokens, golden[f"prompt_{prompt}_frames"])
    np.testing.assert_array_equal(mask, golden[f"prompt_{prompt}_mask"])


# ---------------------------------------------------------------- reference parity


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("layout", ["sesame", "hf"])
@pytest.mark.parametrize("prompt", ["a", "b"])
def test_greedy_frames_and_logits_match_the_references(prompt, layout, compiled, models,
                                                       tokenizer, golden):
    max_frames = int(golden["max_frames"][0 if prompt == "a" else 1])
    stream = stream_speech(models[layout], tokenizer, TEXT[prompt], SPEAKER[prompt],
                           context_for(prompt, golden), temperature=0, max_frames=max_frames,
                           allow_non_codes=True, record_logits=True, compiled=compiled,
                           stop="eos")
    frames = np.stack(list(stream))
    np.testing.assert_array_equal(frames, golden[f"hf_{prompt}_frames"])
    assert stream.stop_reason == str(golden[f"hf_{prompt}_stop"])
    c0 = np.stack(stream.c0_logits)  # includes the step that produced the EOS frame
    assert c0.shape == golden[f"hf_{prompt}_c0_logits"].shape
    np.testing.assert_allclose(c0, golden[f"hf_{prompt}_c0_logits"], rtol=1e-5, atol=1e-4)
    depth = np.stack(stream.depth_logits[:2])
    np.testing.assert_allclose(depth, golden[f"hf_{prompt}_depth_logits"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prompt", ["a", "b"])
def test_default_masks_ids_that_are_not_mimi_codes(prompt, models, tokenizer, golden):
    """The goldens hold one id >= 2048 per prompt: by default it is replaced by the best
    real code, and everything before it is unchanged."""
    reference = golden[f"hf_{prompt}_frames"]
    max_frames = int(golden["max_frames"][0 if prompt == "a" else 1])
    frames = generate_speech(models["sesame"], tokenizer, TEXT[prompt], SPEAKER[prompt],
                             context_for(prompt, golden), temperature=0, max_frames=max_frames,
                             stop="eos")
    assert frames.dtype == np.int32 and frames.shape[1] == 32
    assert frames.min() >= 0 and frames.max() < 2048
    first = np.argwhere(reference >= 2048)[0]
    cut = first[0] * 32 + first[1]
    np.testing.assert_array_equal(frames.reshape(-1)[:cut], reference.reshape(-1)[:cut])
    assert frames[first[0], first[1]] != reference[first[0], first[1]]


# ---------------------------------------------------------------- sampling and errors


def test_seeded_sampling_is_reproducible(models, tokenizer):
    def run(seed):
        return generate_speech(models["sesame"], tokenizer, TEXT["a"], 0, temperature=0.9,
                               top_k=50, max_frames=6, seed=seed)

    first, again, other = run(7), run(7), run(8)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (6, 32) or len(first) < 6  # may stop early on an all-zero frame
    assert not np.array_equal(first, other)
    assert first.min() >= 0 and first.max() < 2048


def test_streaming_yields_the_same_frames(models, tokenizer, golden):
    frames = generate_speech(models["sesame"], tokenizer, TEXT["b"], 1, context_for("b", golden),
                             temperature=0.9, max_frames=5, seed=3)
    streamed = list(stream_speech(models["sesame"], tokenizer, TEXT["b"], 1,
                                  context_for("b", golden), temperature=0.9, max_frames=5,
                                  seed=3))
    np.testing.assert_array_equal(np.stack(streamed), frames)


def test_bad_requests_are_one_line_errors(models, tokenizer, golden):
    model = models["sesame"]
    with pytest.raises(MoshiError, match="too long"):
        generate_speech(model, tokenizer, "word " * 2100, temperature=0, max_frames=10)
    prompt = len(golden["prompt_b_frames"])
    with pytest.raises(MoshiError, match="too long"):
        generate_speech(model, tokenizer, TEXT["b"], 1, context_for("b", golden),
                        temperature=0, max_frames=2048 - prompt)
    with pytest.raises(MoshiError, match="speaker"):
        generate_speech(model, tokenizer, "hi", speaker="alice")
    with pytest.raises(MoshiError, match="speaker"):
        Segment("1", "hi")
    with pytest.raises(MoshiError, match="needs its text"):
        Segment(0, "", codes=golden["context_codes"])
    with pytest.raises(MoshiError, match="pass mimi"):
        generate_speech(model, tokenizer, "hi", context=[Segment(0, "x", audio=np.zeros(100))])


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_models_load_and_run(bits, tokenizer):
    model = load_csm(CSM / "sesame", quantize=bits, dtype=mx.float32, float_decoder_on_cpu=False)
    quantized = [p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    # Tiny fixture widths: only the MLP down projections (input 128) are quantizable.
    assert sorted(quantized) == sorted(f"{part}.layers.{i}.mlp.down_proj"
                                       for part in ("backbone", "decoder") for i in range(2))
    assert all(m.bits == bits for p, m in model.named_modules() if p in quantized)
    frames = generate_speech(model, tokenizer, TEXT["a"], 0, temperature=0, max_frames=4)
    assert frames.ndim == 2 and frames.shape[1] == 32 and 1 <= len(frames) <= 4
    assert frames.min() >= 0 and frames.max() < 2048


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_float_decoder_is_the_quantized_decoder(bits, tokenizer, golden):
    """On the CPU the depth decoder may run from float copies of its dequantized weights: the
    same values (MLX's own dequantize), so the same frames and, up to summation order, the
    same logits as MLX's quantized kernel."""
    kernel = load_csm(CSM / "sesame", quantize=bits, dtype=mx.float32, float_decoder_on_cpu=False)
    with mx.stream(mx.cpu):
        floats = load_csm(CSM / "sesame", quantize=bits, dtype=mx.float32,
                          float_decoder_on_cpu=True)
    for i in range(2):
        name = f"decoder.layers.{i}.mlp.down_proj"
        q, f = kernel.decoder.layers[i].mlp.down_proj, floats.decoder.layers[i].mlp.down_proj
        assert isinstance(q, nn.QuantizedLinear) and type(f) is nn.Linear, name
        expected = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
        np.testing.assert_array_equal(np.asarray(f.weight), np.asarray(expected), err_msg=name)
        assert isinstance(floats.backbone.layers[i].mlp.down_proj, nn.QuantizedLinear)
    runs = []
    for model in (kernel, floats):
        stream = stream_speech(model, tokenizer, TEXT["b"], 1, context_for("b", golden),
                               temperature=0, max_frames=8, allow_non_codes=True,
                               record_logits=True)
        runs.append((np.stack(list(stream)), np.stack(stream.depth_logits)))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    scale = np.abs(runs[0][1]).max()
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=0, atol=1e-5 * scale)


def test_quant_predicate_on_csm_1b():
    cfg = CsmConfig.from_dict({"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M",
                               "text_vocab_size": 128256, "audio_vocab_size": 2051,
                               "audio_num_codebooks": 32})
    model = Csm(cfg)  # parameters stay lazy: nothing is allocated
    chosen = {p for p, m in model.named_modules() if quant_predicate(p, m)}
    linears = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert chosen == {p for p in linears if ".layers." in p}
    assert len(chosen) == (16 + 4) * 5  # qkv (fused), out, gate, up, down
    assert "projection" not in chosen and "codebook0_head" not in chosen


# ---------------------------------------------------------------- conversation helpers


def test_context_cache_reuses_the_conversation_so_far(models, tokenizer, golden):
    model = models["sesame"]
    cache = ContextCache(model)
    first = generate_speech(model, tokenizer, TEXT["b"], 1, context_for("b", golden),
                            temperature=0, max_frames=6, cache=cache)
    assert len(first) == 6
    prompt = len(golden["prompt_b_frames"])
    assert len(cache) == prompt + 5  # the last frame is never fed back (max reached)
    history = [*context_for("b", golden), Segment(1, TEXT["b"], codes=first.T)]
    second = generate_speech(model, tokenizer, "And again.", 1, history, temperature=0,
                             max_frames=6, cache=cache)
    assert cache.reused == prompt + 5
    fresh = generate_speech(model, tokenizer, "And again.", 1, history, temperature=0,
                            max_frames=6)
    np.testing.assert_array_equal(second, fresh)


def test_the_eos_frame_is_not_left_in_the_cache(models, tokenizer, golden):
    cache = ContextCache(models["sesame"])
    stream = stream_speech(models["sesame"], tokenizer, TEXT["a"], 0, temperature=0,
                           max_frames=24, allow_non_codes=True, cache=cache, stop="eos")
    frames = np.stack(list(stream))
    assert stream.stop_reason == "eos" and len(frames) == 10
    assert len(cache) == len(golden["prompt_a_frames"]) + 10
    np.testing.assert_array_equal(cache.tokens[-10:, :32], frames)


def test_split_sentences():
    assert split_sentences("Hi there. How are you?  Fine!\n\nNew part") == [
        "Hi there.", "How are you?", "Fine!", "New part"]
    assert split_sentences("  ") == []


def test_long_text_is_spoken_sentence_by_sentence(models, tokenizer):
    model = models["sesame"]
    one, two = "Hello from Sesame.", "Numbers are spoken slowly."
    frames = np.stack(list(stream_long_speech(model, tokenizer, f"{one} {two}", 0,
                                              temperature=0, max_frames=4)))
    first = generate_speech(model, tokenizer, one, 0, temperature=0, max_frames=4)
    second = generate_speech(model, tokenizer, two, 0, [Segment(0, one, codes=first.T)],
                             temperature=0, max_frames=4)
    np.testing.assert_array_equal(frames, np.concatenate([first, second]))


def test_dtype_follows_the_device_and_bf16_runs(tokenizer):
    model = load_csm(CSM / "sesame")
    want = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    assert model.audio_head.dtype == want
    half = load_csm(CSM / "sesame", dtype=mx.bfloat16, quantize=8)
    assert half.backbone.layers[0].mlp.gate_proj.weight.dtype == mx.bfloat16
    frames = generate_speech(half, tokenizer, TEXT["a"], 0, temperature=0.9, max_frames=3,
                             seed=1)
    assert frames.shape[1] == 32 and frames.min() >= 0 and frames.max() < 2048


def test_missing_config_is_a_one_line_error(tmp_path):
    shutil.copy(CSM / "sesame" / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="no such CSM config"):
        load_csm(tmp_path / "model.safetensors")


def test_a_hub_repo_gives_weights_config_and_tokenizer(monkeypatch, hf_dir, tokenizer, golden):
    """A repo id resolves model.safetensors, config.json and tokenizer.json through the hub
    (here a stand-in serving the transformers-layout files)."""
    import moshi_mlx.loading.hub

    fetched = []

    def fake_download(repo: str, filename: str) -> Path:
        fetched.append((repo, filename))
        return hf_dir / filename

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", fake_download)
    model = load_csm("sesame/csm-1b", dtype=mx.float32)
    tok = load_tokenizer("sesame/csm-1b")
    assert sorted(fetched) == [("sesame/csm-1b", name) for name in
                               ("config.json", "model.safetensors", "tokenizer.json")]
    frames = generate_speech(model, tok, TEXT["a"], 0, temperature=0, max_frames=24,
                             allow_non_codes=True, stop="eos")
    np.testing.assert_array_equal(frames, golden["hf_a_frames"])


def test_long_text_drops_the_oldest_sentences_when_the_budget_runs_short(tokenizer):
    import dataclasses

    full = read_csm_config(CSM / "sesame" / "config.json")
    small = dataclasses.replace(full, backbone=dataclasses.replace(full.backbone,
                                                                   max_seq_len=64))
    model = load_csm(CSM / "sesame", config=small, dtype=mx.float32)
    sentences = ["Hello from Sesame.", "Numbers are spoken.", "Seven and twelve.",
                 "Slowly now."]
    frames = np.stack(list(stream_long_speech(model, tokenizer, " ".join(sentences), 0,
                                              temperature=0, max_frames=4)))
    done, turns = [], []
    for sentence in sentences:
        context = list(turns)
        while context and len(build_prompt(tokenizer, context, 0, sentence)[0]) + 4 >= 64:
            context.pop(0)
        part = generate_speech(model, tokenizer, sentence, 0, context, temperature=0,
                               max_frames=4)
        done.append(part)
        turns.append(Segment(0, sentence, codes=part.T))
    # The premise: the last sentence cannot see the first one.
    assert len(build_prompt(tokenizer, turns[:3], 0, sentences[3])[0]) + 4 >= 64
    np.testing.assert_array_equal(frames, np.concatenate(done))


def test_cpu_prompt_through_dequantized_weights_matches_the_quantized_kernel(
        monkeypatch, tokenizer, golden):
    import moshi_mlx.models.csm as csm

    model = load_csm(CSM / "sesame", quantize=8, dtype=mx.float32)

    def first_logits() -> np.ndarray:
        stream = stream_speech(model, tokenizer, TEXT["b"], 1, context_for("b", golden),
                               temperature=0, max_frames=1, record_logits=True)
        list(stream)
        return stream.c0_logits[0]

    calls = []
    real_dequantize = mx.dequantize

    def counting_dequantize(*args, **kwargs):
        calls.append(args[0].shape)
        return real_dequantize(*args, **kwargs)

    monkeypatch.setattr(csm.mx, "default_device", lambda: mx.cpu)
    monkeypatch.setattr(csm.mx, "dequantize", counting_dequantize)
    dequantized = first_logits()
    assert len(calls) == 2  # the backbone's two quantized layers, for the 101-row prompt
    monkeypatch.setattr(csm, "DEQUANTIZED_ROWS", 10**9)  # every row through the kernel
    kernel = first_logits()
    assert len(calls) == 2
    np.testing.assert_allclose(dequantized, kernel, rtol=1e-5, atol=1e-4)


def test_converted_folder_carries_the_tokenizer_and_speaks_the_same(tokenizer, tmp_path):
    """weights_convert on a Sesame folder with its tokenizer.json: the q4 folder holds
    tokenizer.json (not Moshi's SentencePiece name) and, loaded as a folder, gives the frames of
    quantize-on-load from the source."""
    from weights_convert import convert

    source = tmp_path / "source"
    shutil.copytree(CSM / "sesame", source)
    shutil.copy(CSM / "tokenizer.json", source / "tokenizer.json")
    result = convert(tmp_path / "q4", hf_repo=str(source), bits=4)
    assert (tmp_path / "q4" / "tokenizer.json").read_bytes() == \
        (CSM / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["tokenizer_name"] == \
        "tokenizer.json"
    assert not any("tokenizer.json" in note or "spm" in note for note in result.notes), \
        result.notes
    frames = [generate_speech(model, tok, TEXT["a"], 0, temperature=0, max_frames=6)
              for model, tok in ((load_csm(tmp_path / "q4"), load_tokenizer(tmp_path / "q4")),
                                 (load_csm(source, quantize=4), tokenizer))]
    np.testing.assert_array_equal(frames[0], frames[1])


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_dropping_the_model_frees_it_without_a_garbage_collection(tokenizer, compiled):
    """The compiled frame graphs the model keeps hold it only weakly: the last `del` frees the
    weights at once (a cycle would keep them until Python's next GC pass)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = load_csm(CSM / "sesame", dtype=mx.float32)
        frames = list(stream_speech(model, tokenizer, TEXT["a"], 0, temperature=0.9, top_k=50,
                                    max_frames=3, seed=0, compiled=compiled))
        assert len(frames) == 3
        alive = weakref.ref(model)
        del model
        assert alive() is None
    finally:
        gc.enable()


def test_mlx_audio_layout_loads_as_the_sesame_model(tokenizer, golden, tmp_path):
    folder = write_mlx_audio_csm(tmp_path / "mlx-community-csm")
    theirs, ours = load_csm(folder, dtype=mx.float32), load_csm(CSM / "sesame", dtype=mx.float32)
    flat = dict(tree_flatten(ours.parameters()))
    for key, value in tree_flatten(theirs.parameters()):
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat.pop(key)), err_msg=key)
    assert not flat
    frames = generate_speech(theirs, tokenizer, TEXT["b"], SPEAKER["b"], context_for("b", golden),
                             temperature=0, max_frames=int(golden["max_frames"][1]),
                             allow_non_codes=True, stop="eos")
    np.testing.assert_array_equal(frames, golden["hf_b_frames"])


def test_mlx_audio_quantized_embeddings_are_a_clear_error():
    cfg = read_csm_config(CSM / "sesame" / "config.json")
    with pytest.raises(WeightsError, match="quantized embeddings or heads"):
        sanitize({"model.text_embeddings.scales": mx.zeros((1, 1))}, cfg)
