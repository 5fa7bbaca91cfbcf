"""python -m moshi_mlx.finetune csm: overfitting one sample, --test --json against transformers'
loss, adapters for another model, Ctrl-C saving the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from moshi_mlx.finetune import main
from moshi_mlx.training.lora import LoraSettings, apply_lora, save_adapter

CSM = Path(__file__).parent / "fixtures" / "csm"
MODEL_ARGS = ["--model", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]


def _base():
    from moshi_mlx.loading.models import load_csm

    return load_csm(CSM / "sesame", dtype=mx.float32)


def test_a_tiny_model_trained_on_one_sample_speaks_it_back(tmp_path, csm_library, capsys):
    from moshi_mlx.speech.generate import generate_speech
    from moshi_mlx.training.lora import load_adapter

    _, tokenizer = csm_library
    with np.load(CSM / "csm_golden.npz") as golden:
        # frames the fixture model itself speaks for another prompt (its heads can reach
        # them), ending on the all-zero frame
        target = golden["hf_a_frames"][:3].astype(np.int32)
    np.save(tmp_path / "target.npy", target.T)
    text, speaker = "Numbers like seven.", 1
    (tmp_path / "one.json").write_text(json.dumps(
        [[{"speaker": speaker, "text": text, "codes": "target.npy"}]]))
    before = generate_speech(_base(), tokenizer, text, speaker, temperature=0, max_frames=8,
                             stop="eos")
    assert not np.array_equal(before[:3], target)

    adapters = tmp_path / "adapters"
    assert main(["csm", *MODEL_ARGS, "--data", str(tmp_path / "one.json"), "--adapter-path",
                 str(adapters), "--iters", "200", "--batch-size", "1", "--learning-rate",
                 "1e-3", "--num-layers", "-1", "--steps-per-report", "100",
                 "--save-every", "150"]) == 0
    out = capsys.readouterr().out
    assert "iter 200: train loss" in out and "frames/s" in out and "peak memory" in out
    assert (adapters / "0000150_adapters.safetensors").is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["family"] == "csm" and config["lora_parameters"]["rank"] == 8
    assert len(config["lora_paths"]) == 20  # 5 linears x (2 backbone + 2 decoder layers)

    tuned = _base()
    load_adapter(tuned, adapters, family="csm")
    after, stop = generate_speech(tuned, tokenizer, text, speaker, temperature=0, max_frames=8,
                                  stop="eos", return_stop=True)
    np.testing.assert_array_equal(after, target)
    assert stop == "eos"


@pytest.fixture()
def golden_adapter(tmp_path) -> Path:
    """The golden's LoRA (tools/derive_csm_finetune_golden.py) as an adapter folder, and its
    conversations as data."""
    from test_csm_finetune import write_golden_data

    with np.load(CSM / "csm_finetune_golden.npz") as data:
        golden = {k: data[k] for k in data.files}
    model = _base()
    paths = [str(p) for p in golden["lora_paths"]]
    apply_lora(model, paths, int(golden["lora_rank"]), float(golden["lora_scale"]))
    modules = dict(model.named_modules())
    for path in paths:
        modules[path].lora_a = mx.array(golden[f"{path}.lora_a"])
        modules[path].lora_b = mx.array(golden[f"{path}.lora_b"])
    save_adapter(model, tmp_path / "adapter", LoraSettings(
        int(golden["lora_rank"]), float(golden["lora_scale"]), paths=tuple(paths),
        family="csm"))
    write_golden_data(golden, tmp_path)
    return tmp_path


@pytest.mark.parametrize("batch_size", [1, 2])
def test_test_json_is_transformers_loss_over_all_the_data(golden_adapter, capsys, batch_size):
    with np.load(CSM / "csm_finetune_golden.npz") as golden:
        expected = {k: float(golden[f"full_{k}"])
                    for k in ("loss", "backbone_loss", "depth_decoder_loss")}
        frames = int((golden["labels"][..., 0] != -100).sum())
    assert main(["csm", *MODEL_ARGS, "--data", str(golden_adapter / "train.jsonl"),
                 "--adapter-path", str(golden_adapter / "adapter"), "--test", "--json",
                 "--batch-size", str(batch_size)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-4), key
    assert result["targets"] == frames


def test_an_adapter_for_another_model_is_one_line(golden_adapter, capsys):
    folder = golden_adapter / "adapter"
    tensors = mx.load(str(folder / "adapters.safetensors"))
    name = "backbone.layers.0.attn.qkv_proj.lora_a"
    tensors[name] = mx.zeros((48, 4))
    mx.save_safetensors(str(folder / "adapters.safetensors"), tensors)
    with pytest.raises(SystemExit) as exit_info:
        main(["csm", *MODEL_ARGS, "--data", str(golden_adapter / "train.jsonl"),
              "--adapter-path", str(folder), "--test"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"tensor {name} has shape (48, 4), this model needs (32, 4)" in err


def test_ctrl_c_saves_the_adapter_and_says_so():
    import mlx.nn as nn

    from moshi_mlx.training.trainer import TrainingSettings, train

    model = nn.Linear(4, 2)
    saved = []

    def batches():
        yield mx.ones((1, 4))
        yield mx.ones((1, 4))
        raise KeyboardInterrupt

    def loss_fn(m, batch):
        loss = (m(batch) ** 2).mean()
        return loss, mx.array(1), {}

    result = train(model, loss_fn, batches(), TrainingSettings(iters=10, learning_rate=0.1),
                   saved.append, report=lambda line: None)
    assert result.interrupted and result.steps == 2 and saved == [None]


def test_moshi_and_annotate_are_wired_and_refuse_missing_data_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    for argv in (["moshi", "--data", str(missing)], ["annotate", str(missing)]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "missing.jsonl" in err, err


def test_tts_with_the_adapter_equals_the_fused_folder(golden_adapter, csm_library, tmp_path):
    from moshi_mlx.speech.generate import generate_speech
    from moshi_mlx.training.lora import load_adapter
    from moshi_mlx.tts import main as tts
    from weights_convert.__main__ import main as convert

    text, speaker = "Numbers like seven.", 1
    adapter = golden_adapter / "adapter"
    generation = ["--speaker", str(speaker), "--temperature", "0", "--max-frames", "6",
                  "--stop", "eos"]
    kept = tmp_path / "kept.npy"
    assert tts([text, "--codes-out", str(kept), "--weights", str(CSM / "sesame"),
                "--tokenizer", str(CSM / "tokenizer.json"), "--adapter-path", str(adapter),
                *generation]) == 0
    assert convert(["--input", str(CSM / "sesame" / "model.safetensors"), "--config",
                    str(CSM / "sesame" / "config.json"), "--tokenizer",
                    str(CSM / "tokenizer.json"), "--adapter-path", str(adapter), "--out",
                    str(tmp_path / "fused")]) == 0
    manifest = json.loads((tmp_path / "fused" / "manifest.json").read_text())
    assert manifest["adapter"]["path"] == str(adapter)
    fused = tmp_path / "fused.npy"
    assert tts([text, "--codes-out", str(fused), "--weights", str(tmp_path / "fused"),
                *generation]) == 0
    model, tokenizer = _base(), csm_library[1]
    base = generate_speech(model, tokenizer, text, speaker, temperature=0, max_frames=6,
                           stop="eos")
    load_adapter(model, adapter, family="csm")
    library = generate_speech(model, tokenizer, text, speaker, temperature=0, max_frames=6,
                              stop="eos")
    assert len(library) > 0 and not np.array_equal(library, base[: len(library)])
    np.testing.assert_array_equal(np.load(kept).T, library)
    np.testing.assert_array_equal(np.load(fused).T, library)


def test_convert_refuses_an_adapter_for_another_model(golden_adapter, tmp_path, capsys):
    from weights_convert.__main__ import main as convert

    config = json.loads((golden_adapter / "adapter" / "adapter_config.json").read_text())
    config["lora_paths"].append("backbone.layers.7.mlp.up_proj")
    (golden_adapter / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        convert(["--input", str(CSM / "sesame" / "model.safetensors"), "--config",
                 str(CSM / "sesame" / "config.json"), "--adapter-path",
                 str(golden_adapter / "adapter"), "--out", str(tmp_path / "fused")])
    assert "adapts backbone.layers.7.mlp.up_proj, which this model lacks" in (
        capsys.readouterr().err)
    assert not (tmp_path / "fused").exists()


def test_a_data_folder_validates_on_valid_jsonl(golden_adapter, capsys):
    import shutil

    data = golden_adapter / "folder"
    data.mkdir()
    for name in golden_adapter.glob("*.npy"):
        shutil.copy(name, data / name.name)
    lines = (golden_adapter / "train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text(lines[0] + "\n")
    (data / "valid.jsonl").write_text(lines[1] + "\n")
    (data / "test.jsonl").write_text(lines[1] + "\n")
    adapters = golden_adapter / "trained"
    assert main(["csm", *MODEL_ARGS, "--data", str(data), "--adapter-path", str(adapters),
                 "--iters", "2", "--batch-size", "1", "--learning-rate", "1e-3",
                 "--steps-per-eval", "2", "--num-layers", "1"]) == 0
    val_line = [line for line in capsys.readouterr().out.splitlines() if "val loss" in line]
    assert len(val_line) == 1 and val_line[0].startswith("iter 2: val loss ")
    # the validation loss is the test loss of the saved adapter on the same conversation
    assert main(["csm", *MODEL_ARGS, "--data", str(data), "--adapter-path", str(adapters),
                 "--test", "--json"]) == 0
    tested = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert val_line[0].split("val loss ")[1].split(",")[0] == f"{tested['loss']:.3f}"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert all(".layers.1." in path for path in config["lora_paths"])  # the last layer only


def test_resume_adapter_file_starts_from_its_weights(golden_adapter, capsys):
    resumed = golden_adapter / "resumed"
    common = [*MODEL_ARGS, "--data", str(golden_adapter / "train.jsonl"), "--iters", "1",
              "--batch-size", "1", "--num-layers", "-1", "--learning-rate", "1e-12"]
    # the golden's adapter has rank 4 on 7 linears; this run puts rank 8 on 20
    with pytest.raises(SystemExit):
        main(["csm", *common, "--adapter-path", str(resumed), "--resume-adapter-file",
              str(golden_adapter / "adapter" / "adapters.safetensors")])
    assert "this model needs" in capsys.readouterr().err
    assert main(["csm", *common, "--adapter-path", str(resumed), "--seed", "1"]) == 0
    first = mx.load(str(resumed / "adapters.safetensors"))
    # another seed draws other lora_a: equal leaves prove the resumed ones were used
    assert main(["csm", *common, "--adapter-path", str(golden_adapter / "again"), "--seed", "2",
                 "--resume-adapter-file", str(resumed / "adapters.safetensors")]) == 0
    again = mx.load(str(golden_adapter / "again" / "adapters.safetensors"))
    assert sorted(again) == sorted(first) and len(first) == 40
    for name, value in first.items():
        np.testing.assert_allclose(np.array(again[name]), np.array(value), atol=1e-9)
    assert main(["csm", *common, "--adapter-path", str(golden_adapter / "fresh"),
                 "--seed", "2"]) == 0
    fresh = mx.load(str(golden_adapter / "fresh" / "adapters.safetensors"))
    name = "backbone.layers.0.attn.qkv_proj.lora_a"
    assert not np.allclose(np.array(fresh[name]), np.array(first[name]))


def test_ctrl_c_during_csm_training_saves_the_adapter(golden_adapter, monkeypatch, capsys):
    import moshi_mlx.training.csm_data as csm_data

    real = csm_data.training_batches

    def interrupted(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(csm_data, "training_batches", interrupted)
    adapters = golden_adapter / "interrupted"
    assert main(["csm", *MODEL_ARGS, "--data", str(golden_adapter / "train.jsonl"),
                 "--adapter-path", str(adapters), "--iters", "50", "--batch-size", "1"]) == 130
    assert "interrupted after 1 steps: adapter saved to" in capsys.readouterr().err
    assert len(mx.load(str(adapters / "adapters.safetensors"))) == 40
