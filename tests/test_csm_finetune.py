"""CSM fine-tuning: data -> rows and labels, transformers' loss and LoRA gradients
(csm_finetune_golden.npz, tools/derive_csm_finetune_golden.py), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx.errors import MoshiError
from moshi_mlx.training.csm_data import (
    example_of,
    make_batch,
    read_conversations,
)
from moshi_mlx.training.csm_loss import IGNORE, csm_loss
from moshi_mlx.training.lora import apply_lora

FIXTURES = Path(__file__).parent / "fixtures" / "csm"


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(FIXTURES / "csm_finetune_golden.npz") as data:
        return {k: data[k] for k in data.files}


def write_golden_data(golden: dict, folder: Path) -> Path:
    """The golden's conversations as a JSONL data file with .npy codes."""
    lines = []
    for c in range(2):
        turns = []
        t = 0
        while f"conv{c}_turn{t}_text" in golden:
            name = f"c{c}t{t}.npy"
            np.save(folder / name, golden[f"conv{c}_turn{t}_codes"])
            turns.append({"speaker": int(golden[f"conv{c}_turn{t}_speaker"]),
                          "text": str(golden[f"conv{c}_turn{t}_text"]), "codes": name})
            t += 1
        lines.append(json.dumps(turns))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def golden_examples(golden, csm_library, tmp_path_factory):
    _, tokenizer = csm_library
    path = write_golden_data(golden, tmp_path_factory.mktemp("csm_data"))
    conversations = read_conversations(path, None)
    return [example_of(tokenizer, c) for c in conversations]


def test_rows_and_labels_are_transformers_ones(golden, golden_examples):
    batch = make_batch(golden_examples, depth_dropped=golden["depth_dropped"])
    np.testing.assert_array_equal(np.array(batch.tokens), golden["tokens"])
    np.testing.assert_array_equal(np.array(batch.mask), golden["mask"])
    np.testing.assert_array_equal(np.array(batch.labels), golden["labels"])
    assert [len(e.tokens) for e in golden_examples] == list(golden["lengths"])


def _fresh_model():
    from moshi_mlx.loading.checkpoint import load_model

    model, _ = load_model(FIXTURES / "sesame", dtype=mx.float32, model_types=("csm",))
    return model


@pytest.mark.parametrize("checkpoint", [False, True])
def test_loss_and_lora_gradients_equal_transformers(golden, golden_examples, checkpoint):
    model = _fresh_model()
    paths = [str(p) for p in golden["lora_paths"]]
    apply_lora(model, paths, int(golden["lora_rank"]), float(golden["lora_scale"]))
    modules = dict(model.named_modules())
    for path in paths:
        modules[path].lora_a = mx.array(golden[f"{path}.lora_a"])
        modules[path].lora_b = mx.array(golden[f"{path}.lora_b"])
    batch = make_batch(golden_examples, depth_dropped=golden["depth_dropped"])

    def loss_fn(m):
        loss, _, parts = csm_loss(m, batch, checkpoint=checkpoint)
        return loss, parts

    (loss, parts), grads = nn.value_and_grad(model, loss_fn)(model)
    np.testing.assert_allclose(loss.item(), golden["loss"], rtol=1e-4)
    np.testing.assert_allclose(parts["backbone_loss"].item(), golden["backbone_loss"], rtol=1e-4)
    np.testing.assert_allclose(parts["depth_decoder_loss"].item(), golden["depth_decoder_loss"],
                               rtol=1e-4)
    flat = dict(tree_flatten(grads))
    assert len(flat) == 2 * len(paths)
    for path in paths:
        for leaf in ("lora_a", "lora_b"):
            ours, reference = np.array(flat[f"{path}.{leaf}"]), golden[f"{path}.grad_{leaf}"]
            assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max(), (
                f"{path}.{leaf}")


def test_train_on_last_labels_only_the_last_turn(golden, csm_library, tmp_path):
    _, tokenizer = csm_library
    path = write_golden_data(golden, tmp_path)
    first = read_conversations(path, None)[0]
    every = example_of(tokenizer, first, "all")
    last = example_of(tokenizer, first, "last")
    np.testing.assert_array_equal(every.tokens, last.tokens)
    labelled_all = np.flatnonzero(every.labels[:, 0] != IGNORE)
    labelled_last = np.flatnonzero(last.labels[:, 0] != IGNORE)
    frames0 = golden["conv0_turn0_codes"].shape[1]
    frames1 = golden["conv0_turn1_codes"].shape[1]
    # 6 frames + EOS of turn 0 and 5 frames + EOS of turn 1; then only turn 1's
    assert len(labelled_all) == frames0 + 1 + frames1 + 1
    np.testing.assert_array_equal(labelled_last, labelled_all[frames0 + 1:])
    np.testing.assert_array_equal(last.labels[labelled_last[:-1]], golden["conv0_turn1_codes"].T)
    assert (last.labels[labelled_last[-1]] == 0).all()
    assert len(last.frame_rows) == frames1


def test_depth_ratio_draws_the_processors_share_of_frames(golden_examples):
    frames = sum(len(e.frame_rows) for e in golden_examples)  # 19 audio frames
    for ratio in (1.0, 0.5, 0.25, 0.0):
        batch = make_batch(golden_examples, ratio, np.random.default_rng(3))
        labels = np.array(batch.labels)
        dropped = ((labels[..., 0] != IGNORE) & (labels[..., 1:] == IGNORE).all(-1)).sum()
        assert dropped == int(frames * (1 - ratio))
        assert len(np.array(batch.depth_rows)) == frames + 3 - dropped  # + 3 EOS rows


@pytest.mark.parametrize("turn, message", [
    ({"speaker": 0, "text": "  ", "codes": "c.npy"}, "conversation 0, turn 0: empty text"),
    ({"speaker": 0, "text": "Hi", "audio": "missing.wav"},
     "conversation 0, turn 0: .*missing.wav: no such audio file"),
    ({"speaker": 0, "text": "Hi", "voice": "x"}, r"turn 0: unknown keys \['voice'\]"),
    ({"speaker": 0, "text": "Hi", "codes": "nope.npy"}, "turn 0: .*nope.npy: no such codes"),
])
def test_bad_turns_name_the_conversation_and_turn(tmp_path, turn, message):
    from moshi_mlx.training.csm_data import CodesCache

    np.save(tmp_path / "c.npy", np.zeros((32, 3), np.int32))
    path = tmp_path / "data.json"
    path.write_text(json.dumps([[turn]]))
    cache = CodesCache(path, "mimi", lambda pcm: np.zeros((32, 1), np.int32))
    with pytest.raises(MoshiError, match=message):
        read_conversations(path, cache.of)


def test_text_only_conversation_and_last_turn_without_audio_are_refused(csm_library, tmp_path):
    _, tokenizer = csm_library
    np.save(tmp_path / "c.npy", np.ones((32, 3), np.int32))
    path = tmp_path / "data.json"
    path.write_text(json.dumps([[{"speaker": 0, "text": "Hi"}],
                                [{"speaker": 0, "text": "Hi", "codes": "c.npy"},
                                 {"speaker": 1, "text": "Yes"}]]))
    text_only, trailing_text = read_conversations(path, None)
    with pytest.raises(MoshiError, match="conversation 0: no turn has audio"):
        example_of(tokenizer, text_only)
    assert (example_of(tokenizer, trailing_text, "all").labels[:, 0] != IGNORE).sum() == 4
    with pytest.raises(MoshiError, match="conversation 1: the last turn has no audio"):
        example_of(tokenizer, trailing_text, "last")


def test_audio_is_encoded_once_and_cached_beside_the_data(tmp_path):
    import soundfile

    from moshi_mlx.training.csm_data import CodesCache

    rate = 16000
    soundfile.write(tmp_path / "a.wav", np.zeros(rate // 2, np.float32), rate)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([[{"speaker": 0, "text": "Hi", "audio": "a.wav"}]]))
    calls = []

    def encode(pcm):
        calls.append(pcm.size)
        return np.full((32, 6), 7, np.int32)

    cache = CodesCache(path, "mimi-a", encode)
    (conversation,) = read_conversations(path, cache.of)
    assert calls == [12000] and cache.resampled == {rate}  # read at 24 kHz
    cache.save()
    assert (tmp_path / "data.json.mimi-codes.npz").is_file()
    again = CodesCache(path, "mimi-a", encode)
    read_conversations(path, again.of)
    assert calls == [12000]  # from the cache
    other = CodesCache(path, "mimi-b", encode)
    read_conversations(path, other.of)
    assert calls == [12000, 12000]  # another Mimi encodes anew
    np.testing.assert_array_equal(conversation.turns[0].codes, np.full((32, 6), 7))


@pytest.mark.parametrize("kernel", ["quantized_matmul", "dequantized"])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 64)])
def test_qlora_loss_and_gradients_equal_lora_on_the_dequantized_weights(
        golden_examples, bits, group_size, kernel, monkeypatch):
    """QLoRA on a q4 / q8 base (MLX's quantized matmul, or the dequantized product the CPU
    uses for long inputs) computes what float LoRA computes on the same, dequantized,
    weights."""
    import moshi_mlx.models.csm as csm_module

    if kernel == "quantized_matmul":
        monkeypatch.setattr(csm_module, "DEQUANTIZED_ROWS", 1 << 30)
    from moshi_mlx.loading.quantization import dequantize_linears
    from moshi_mlx.models.csm import Csm, CsmConfig, LlamaConfig, quant_predicate
    from moshi_mlx.training.csm_lora import csm_lora_paths

    def llama(layers: int, seq: int) -> LlamaConfig:
        return LlamaConfig(num_layers=layers, dim=64, num_heads=2, num_kv_heads=1,
                           head_dim=32, hidden_dim=128, max_seq_len=seq)

    cfg = CsmConfig(llama(2, 256), llama(1, 32), text_vocab_size=1024)
    mx.random.seed(0)
    quantized = Csm(cfg)
    nn.quantize(quantized, group_size=group_size, bits=bits, class_predicate=quant_predicate)
    mx.eval(quantized.parameters())
    assert sum(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules()) == 15
    floating = Csm(cfg)
    nn.quantize(floating, group_size=group_size, bits=bits, class_predicate=quant_predicate)
    floating.update(quantized.parameters())
    dequantize_linears(floating)
    batch = make_batch(golden_examples, depth_ratio=1.0)
    results = []
    for model in (quantized, floating):
        mx.random.seed(1)  # the same lora_a draws
        paths = apply_lora(model, csm_lora_paths(model), rank=4, scale=2.0)
        rng = np.random.default_rng(2)
        for path in paths:
            layer = dict(model.named_modules())[path]
            layer.lora_b = mx.array(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))

        def loss_fn(m):
            return csm_loss(m, batch)[0]

        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        results.append((loss.item(), dict(tree_flatten(grads))))
    (q_loss, q_grads), (f_loss, f_grads) = results
    np.testing.assert_allclose(q_loss, f_loss, rtol=1e-5)
    assert sorted(q_grads) == sorted(f_grads) and len(q_grads) == 30
    for name, value in q_grads.items():
        reference = np.array(f_grads[name])
        assert np.abs(np.array(value) - reference).max() <= 1e-4 * np.abs(reference).max(), name


def test_too_long_conversations_and_too_large_batches_are_refused(golden, golden_examples,
                                                                  csm_library, tmp_path):
    from moshi_mlx.training.csm_data import training_batches

    _, tokenizer = csm_library
    path = write_golden_data(golden, tmp_path)
    first = read_conversations(path, None)[0]
    rows = len(example_of(tokenizer, first).tokens)
    assert len(example_of(tokenizer, first, max_rows=rows).tokens) == rows
    with pytest.raises(MoshiError, match=f"conversation 0: {rows} rows, more than the "
                                         f"model's context of {rows - 1}"):
        example_of(tokenizer, first, max_rows=rows - 1)
    with pytest.raises(MoshiError, match="--batch-size 3 is more than the 2 training"):
        next(training_batches(golden_examples, 3, np.random.default_rng(0)))
    batches = training_batches(golden_examples, 2, np.random.default_rng(0))
    for _ in range(3):  # every pass holds both conversations
        assert np.array(next(batches).tokens).shape[0] == 2
