"""python -m moshi_mlx.finetune moshi end to end on the tiny Moshi fixture: LoRA training that
overfits one sample (then generated greedily by LmGen), --test --json against moshi_loss of one
batch, Ctrl-C, gradient checkpointing, and running the result: the adapter kept apart equals
the weights_convert fused folder, moshi-finetune's LoRA files fused or kept apart, the options
of local / serve."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from moshi_mlx import load_lm
from moshi_mlx.finetune import main

FIXTURES = Path(__file__).parent / "fixtures"
STEPS = 16  # frames of the sample: 1.28 s


def model_args(mimi: Path) -> list[str]:
    return ["--model", str(FIXTURES / "lm_pytorch.safetensors"), "--config",
            str(FIXTURES / "lm_config.json"), "--tokenizer", str(FIXTURES / "tokenizer.model"),
            "--mimi-weight", str(mimi), "--dtype", "f32"]


def base_lm():
    return load_lm(FIXTURES / "lm_pytorch.safetensors", config=FIXTURES / "lm_config.json",
                   dtype=mx.float32)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """One stereo file of 1.28 s (left: fixture speech, right: the speech after it) with three
    words of Moshi's: a data .jsonl of one 16-frame chunk."""
    import soundfile

    from moshi_mlx.audio.io import read_audio

    folder = tmp_path_factory.mktemp("one_sample")
    speech = read_audio(FIXTURES / "speech.wav")
    samples = STEPS * 1920
    soundfile.write(str(folder / "one.wav"),
                    np.stack([speech[:samples], speech[samples: 2 * samples]], axis=1), 24000,
                    subtype="FLOAT")
    words = [["hello", [0.1, 0.4], "SPEAKER_MAIN"], ["there", [0.5, 0.8], "SPEAKER_MAIN"],
             ["you", [0.9, 1.1], "SPEAKER_MAIN"], ["hi", [0.2, 0.3], "SPEAKER_OTHER"]]
    (folder / "one.json").write_text(json.dumps({"alignments": words}))
    (folder / "data.jsonl").write_text(json.dumps({"path": "one.wav", "duration": 1.28}) + "\n")
    return folder / "data.jsonl"


def chunks(data: Path, mimi: Path, duration: float) -> np.ndarray:
    """The data's chunks [N, 17, T] as moshi_data cuts them (the reference for the CLI)."""
    from moshi_mlx.loading.models import load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.training.moshi_data import MoshiDataset, mimi_encoder

    dataset = MoshiDataset(data, load_sentencepiece(FIXTURES / "tokenizer.model"),
                           mimi_encoder(load_mimi(mimi, num_codebooks=8)), duration,
                           notice=lambda line: None)
    return np.stack([dataset[i] for i in range(len(dataset))])


@pytest.fixture(scope="module")
def trained(sample, random_mimi_path, tmp_path_factory) -> tuple[Path, str]:
    """An adapter trained on the sample (every Linear, rank 8), and what training printed."""
    adapters = tmp_path_factory.mktemp("moshi_adapter") / "adapters"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["moshi", *model_args(random_mimi_path), "--data", str(sample),
                     "--duration-sec", "1.28", "--adapter-path", str(adapters), "--iters", "60",
                     "--batch-size", "1", "--learning-rate", "1e-4", "--steps-per-report",
                     "30", "--save-every", "40"]) == 0
    return adapters, out.getvalue()


def greedy(lm, user: np.ndarray) -> tuple[list[int], np.ndarray]:
    """LmGen at temperature 0 fed the user's codes (frame j at step j + 1): its text tokens
    and, per step, its audio tokens (step t: codebook 0 of frame t, the others of t - 1)."""
    from moshi_mlx.conversation.lm_gen import LmGen

    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    texts, audio = [], []
    for t in range(user.shape[1]):
        frame = user[:, t - 1] if t else np.zeros(user.shape[0], np.int64)
        token, _ = gen.step(mx.array(frame[None].astype(np.int32)))
        texts.append(int(token[0]))
        audio.append(np.array(gen.state.last_audio_tokens[0]))
    return texts, np.array(audio)


def speaks(lm, codes: np.ndarray) -> bool:
    """Does `lm` generate the chunk `codes` [17, T] greedily: its text, codebook 0, and the
    delayed codebooks 1..7?"""
    texts, audio = greedy(lm, codes[9:])
    return (texts == codes[0].tolist() and (audio[:, 0] == codes[1]).all()
            and (audio[1:, 1:].T == codes[2:9, : STEPS - 1]).all())


def test_trained_adapter_makes_the_sample_spoken_back_greedily(trained, sample,
                                                              random_mimi_path):
    from moshi_mlx.training.lora import load_adapter

    adapters, printed = trained
    assert "iter 60: train loss" in printed and "text_loss" in printed and "frames/s" in printed
    assert (adapters / "0000040_adapters.safetensors").is_file()
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["family"] == "moshi" and config["num_layers"] == -1
    lm = base_lm()
    linears = {name for name, m in lm.named_modules() if isinstance(m, nn.Linear)}
    assert set(config["lora_paths"]) == linears  # every Linear, as moshi-finetune
    codes = chunks(sample, random_mimi_path, 1.28)[0]
    assert (codes != -1).all() and (codes[0] != 3).sum() >= 3  # real audio, words in the text
    assert not speaks(lm, codes)
    load_adapter(lm, adapters, family="moshi")
    assert speaks(lm, codes)


def test_test_json_over_batches_is_moshi_loss_of_one_batch(trained, sample, random_mimi_path,
                                                           capsys):
    """--test with the adapter, one chunk a batch, prints the loss of all chunks in one."""
    from moshi_mlx.training.lora import load_adapter
    from moshi_mlx.training.moshi_loss import moshi_loss

    adapters, _ = trained
    assert main(["moshi", *model_args(random_mimi_path), "--data", str(sample),
                 "--duration-sec", "0.5", "--adapter-path", str(adapters), "--test", "--json",
                 "--batch-size", "1", "--text-padding-weight", "0.3",
                 "--first-codebook-weight-multiplier", "10"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    everything = chunks(sample, random_mimi_path, 0.5)
    assert len(everything) == 3 and printed["batches"] == 3
    lm = base_lm()
    load_adapter(lm, adapters, family="moshi")
    loss, n_targets, parts = moshi_loss(lm, mx.array(everything), 0.3, 10.0)
    for key, want in (("loss", loss), ("text_loss", parts["text_loss"]),
                      ("audio_loss", parts["audio_loss"])):
        assert printed[key] == pytest.approx(want.item(), rel=1e-4), key
    assert printed["n_targets"] == n_targets.item()


def test_ctrl_c_during_moshi_training_saves_the_adapter(sample, random_mimi_path, tmp_path,
                                                        monkeypatch, capsys):
    import moshi_mlx.training.moshi_data as moshi_data

    real = moshi_data.training_batches

    def interrupted(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(moshi_data, "training_batches", interrupted)
    adapters = tmp_path / "interrupted"
    assert main(["moshi", *model_args(random_mimi_path), "--data", str(sample),
                 "--duration-sec", "1.28", "--adapter-path", str(adapters), "--iters", "50",
                 "--batch-size", "1", "--num-layers", "1",
                 "--target-modules", "self_attn.in_proj"]) == 130
    assert "interrupted after 1 steps: adapter saved to" in capsys.readouterr().err
    saved = mx.load(str(adapters / "adapters.safetensors"))
    # the last temporal layer and every depformer step's last layer, plus the 17 heads
    assert len(saved) == 2 * (1 + 8 + 17)


def test_grad_checkpoint_gives_the_same_loss_and_gradients(fixtures_dir):
    from moshi_mlx.training.lora import apply_lora
    from moshi_mlx.training.moshi_lora import moshi_lora_paths
    from moshi_mlx.training.moshi_loss import moshi_loss

    with np.load(fixtures_dir / "moshi_finetune_golden.npz") as golden:
        codes = mx.array(golden["codes"])
    lm = base_lm()
    mx.random.seed(0)
    apply_lora(lm, moshi_lora_paths(lm, 1), rank=4)
    for _, layer in lm.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
    results = []
    for checkpoint in (False, True):
        loss, grads = nn.value_and_grad(lm, lambda m, c=checkpoint: moshi_loss(
            m, codes, checkpoint=c)[0])(lm)
        results.append((loss.item(), dict(tree_flatten(grads))))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 0
    for name, grad in results[0][1].items():
        np.testing.assert_allclose(np.array(results[1][1][name]), np.array(grad), rtol=1e-4,
                                   atol=1e-7, err_msg=name)


def convert(out: Path, adapter: Path) -> Path:
    from weights_convert.__main__ import main as weights_convert

    assert weights_convert(["--input", str(FIXTURES / "lm_pytorch.safetensors"), "--config",
                            str(FIXTURES / "lm_config.json"), "--tokenizer",
                            str(FIXTURES / "tokenizer.model"), "--adapter-path", str(adapter),
                            "--out", str(out)]) == 0
    return out


def teacher_forced(lm, codes: np.ndarray) -> list[np.ndarray]:
    """The text and audio logits of `lm` on the chunk `codes` [17, T], as training sees it."""
    from moshi_mlx.training.moshi_loss import forward_logits

    return [np.array(x) for x in forward_logits(lm, mx.array(codes[None]))]


def assert_within(got: list[np.ndarray], want: list[np.ndarray], base: list[np.ndarray],
                  share: float) -> None:
    """Per stream, `got` is off `want` by at most `share` of how far the adapter moved `want`
    from the base model's logits: an absolute bound that scales with the logits."""
    for name, g, w, b in zip(("text", "audio"), got, want, base, strict=True):
        moved = np.abs(w - b).max()
        assert moved > 5.0, f"{name}: the adapter barely moved the logits ({moved})"
        assert np.abs(g - w).max() <= share * moved, (name, np.abs(g - w).max(), moved)


# The fixture model is bf16, and so is a converted folder: fusing rounds W + scale * B @ A to
# bf16 (as moshi-finetune's consolidated files do), which moves logits by about 0.5% of what
# the adapter did. Greedy tokens can flip at a near tie on another CPU; logits cannot.
BF16_FUSE_SHARE = 0.02


def test_the_fused_folder_computes_what_the_adapter_does(trained, sample, random_mimi_path,
                                                        tmp_path):
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    adapters, _ = trained
    fused = convert(tmp_path / "fused", adapters)
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["adapter"]["path"] == str(adapters)
    codes = chunks(sample, random_mimi_path, 1.28)[0]
    kept = base_lm()
    LmAdapterOptions(adapter_path=str(adapters)).apply(kept)
    assert any(type(m).__name__ == "LoRALinear" for _, m in kept.named_modules())
    assert_within(teacher_forced(load_lm(fused, dtype=mx.float32), codes),
                  teacher_forced(kept, codes), teacher_forced(base_lm(), codes),
                  BF16_FUSE_SHARE)


@pytest.fixture(scope="module")
def kyutai_lora(trained, tmp_path_factory) -> Path:
    """The trained adapter written as moshi-finetune writes its LoRA (Kyutai's module names,
    A = lora_a.T, B = lora_b.T, bf16, config.json with lora_rank / lora_scaling)."""
    adapters, _ = trained
    config = json.loads((adapters / "adapter_config.json").read_text())
    ours = mx.load(str(adapters / "adapters.safetensors"))
    kyutai_names = {
        r"depformer.slices.(\d+).linear_in": r"depformer_in.\1",
        r"depformer.slices.(\d+).linear_out": r"linears.\1",
        r"depformer.slices.(\d+).transformer.layers.(\d+).self_attn.(in|out)_proj":
            r"depformer.layers.\2.self_attn.\3_projs.\1",
        r"depformer.slices.(\d+).transformer.layers.(\d+).gating.(linear_in|linear_out)":
            r"depformer.layers.\2.gating.\1.\3",
    }
    tensors = {}
    for path in config["lora_paths"]:
        name = path
        for pattern, target in kyutai_names.items():
            if re.fullmatch(pattern, path):
                name = re.sub(pattern, target, path)
        tensors[f"{name}.lora_A.weight"] = ours[f"{path}.lora_a"].T.astype(mx.bfloat16)
        tensors[f"{name}.lora_B.weight"] = ours[f"{path}.lora_b"].T.astype(mx.bfloat16)
    folder = tmp_path_factory.mktemp("consolidated")
    mx.save_safetensors(str(folder / "lora.safetensors"), tensors)
    (folder / "config.json").write_text(json.dumps({
        "lora": True, "lora_rank": config["lora_parameters"]["rank"],
        "lora_scaling": config["lora_parameters"]["scale"]}))
    return folder


def test_kyutai_lora_files_fused_kept_apart_and_converted_compute_alike(
        trained, kyutai_lora, sample, random_mimi_path, tmp_path):
    """--lora-weight (fused, the default), --no-fuse-lora, and weights_convert --adapter-path
    of moshi-finetune's files compute the adapter they were written from."""
    from moshi_mlx.training.lora import load_adapter
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    codes = chunks(sample, random_mimi_path, 1.28)[0]
    base = teacher_forced(base_lm(), codes)
    ours = base_lm()
    load_adapter(ours, trained[0], family="moshi")
    want = teacher_forced(ours, codes)
    weight = str(kyutai_lora / "lora.safetensors")
    runs = []
    for fuse in (True, False):
        lm = base_lm()
        LmAdapterOptions(lora_weight=weight, fuse=fuse).apply(lm)
        kinds = {type(m).__name__ for _, m in lm.named_modules()}
        assert ("LoRALinear" in kinds) == (not fuse)
        runs.append(teacher_forced(lm, codes))
    for fused, apart in zip(*runs, strict=True):  # float32 both: only the sum order differs
        np.testing.assert_allclose(fused, apart, rtol=0, atol=1e-4 * np.abs(apart).max())
    # moshi-finetune's files hold A and B in bf16
    assert_within(runs[1], want, base, BF16_FUSE_SHARE)
    converted = load_lm(convert(tmp_path / "fused", kyutai_lora), dtype=mx.float32)
    assert_within(teacher_forced(converted, codes), want, base, BF16_FUSE_SHARE)


def test_an_adapter_for_another_model_is_one_line(trained, tmp_path, capsys):
    from moshi_mlx.errors import WeightsError
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    adapters, _ = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters / "adapter_config.json").read_text())
    tensors = mx.load(str(adapters / "adapters.safetensors"))
    name = "transformer.layers.1.gating.linear_in.lora_a"
    tensors[name] = mx.zeros((512, 8))
    mx.save_safetensors(str(broken / "adapters.safetensors"), tensors)
    with pytest.raises(WeightsError, match=f"tensor {name} has shape \\(512, 8\\), this model "
                                           "needs \\(256, 8\\)"):
        LmAdapterOptions(adapter_path=str(broken)).apply(base_lm())
    csm_adapter = json.loads((adapters / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps(csm_adapter | {"family": "csm"}))
    with pytest.raises(WeightsError, match="the adapter is for csm, not moshi"):
        LmAdapterOptions(adapter_path=str(broken)).apply(base_lm())
    with pytest.raises(WeightsError, match="missing.safetensors: no such LoRA file"):
        LmAdapterOptions(lora_weight=str(tmp_path / "missing.safetensors")).apply(base_lm())
    with pytest.raises(WeightsError, match="no adapter_config.json"):
        LmAdapterOptions(adapter_path=str(tmp_path)).apply(base_lm())


def test_local_and_serve_options_make_the_adapter(trained, kyutai_lora, capsys):
    from moshi_mlx.cli.options import engine_options
    from moshi_mlx.local import build_parser as local_parser
    from moshi_mlx.serve import build_parser as serve_parser
    from moshi_mlx.serve import main as serve
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    adapters, _ = trained
    weight = str(kyutai_lora / "lora.safetensors")
    args = local_parser().parse_args(["--adapter-path", str(adapters)])
    assert engine_options(args).adapter == LmAdapterOptions(adapter_path=str(adapters))
    args = local_parser().parse_args(["--lora-weight", weight, "--no-fuse-lora"])
    assert engine_options(args).adapter == LmAdapterOptions(lora_weight=weight, fuse=False)
    assert engine_options(local_parser().parse_args([])).adapter is None
    args = serve_parser().parse_args(["--moshi", "--moshi-lora-weight", weight,
                                      "--tts", "--tts-adapter-path", "csm_adapter"])
    assert args.tts_adapter_path == "csm_adapter" and args.moshi_lora_weight == weight
    for argv, message in ((["--stt", "--tts-adapter-path", "x"], "--tts-adapter-path goes with "
                                                                  "--tts"),
                          (["--moshi", "--moshi-lora-config", "c.json"],
                           "--moshi-lora-config goes with --moshi-lora-weight"),
                          (["--moshi", "--moshi-adapter-path", "a", "--moshi-lora-weight", "w"],
                           "give --moshi-adapter-path or --moshi-lora-weight, not both")):
        with pytest.raises(SystemExit):
            serve(argv)
        assert message in capsys.readouterr().err


def test_qlora_on_a_4_bit_base_lowers_its_test_loss(sample, random_mimi_path, tmp_path, capsys):
    """-q 4: the base is quantized on load, LoRA trains over its QuantizedLinear layers, and
    the adapter then lowers the loss of that same 4-bit base."""
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    common = [*model_args(random_mimi_path), "-q", "4", "--data", str(sample),
              "--duration-sec", "1.28", "--adapter-path", str(tmp_path / "qlora")]
    assert main(["moshi", *common, "--test", "--json"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["moshi", *common, "--iters", "20", "--batch-size", "1", "--learning-rate",
                 "1e-4", "--steps-per-report", "20"]) == 0
    assert "iter 20: train loss" in capsys.readouterr().out
    assert main(["moshi", *common, "--test", "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tuned["n_targets"] == base["n_targets"]
    assert tuned["loss"] < 0.5 * base["loss"], (base, tuned)
    lm = load_lm(FIXTURES / "lm_pytorch.safetensors", config=FIXTURES / "lm_config.json",
                 quantize=4, dtype=mx.float32)
    LmAdapterOptions(adapter_path=str(tmp_path / "qlora")).apply(lm)
    bases = [m.linear for _, m in lm.named_modules() if hasattr(m, "lora_a")]
    assert len(bases) == 89 and all(isinstance(b, nn.QuantizedLinear) for b in bases)


def test_a_data_folder_validates_on_valid_jsonl(sample, random_mimi_path, tmp_path, capsys):
    """A folder with train.jsonl and valid.jsonl: validation runs every --steps-per-eval and
    its loss is the --test loss of the saved adapter on the same file."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for name in ("one.wav", "one.json"):
        shutil.copy(sample.parent / name, data / name)
    for split in ("train", "valid", "test"):
        shutil.copy(sample, data / f"{split}.jsonl")
    common = [*model_args(random_mimi_path), "--data", str(data), "--duration-sec", "0.5",
              "--adapter-path", str(tmp_path / "adapters"), "--batch-size", "2"]
    assert main(["moshi", *common, "--iters", "2", "--learning-rate", "1e-4",
                 "--steps-per-eval", "2", "--num-layers", "1"]) == 0
    val_line = [line for line in capsys.readouterr().out.splitlines() if "val loss" in line]
    assert len(val_line) == 1 and val_line[0].startswith("iter 2: val loss ")
    assert main(["moshi", *common, "--test", "--json"]) == 0
    tested = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert val_line[0].split("val loss ")[1].split(",")[0] == f"{tested['loss']:.3f}"


def test_a_prompt_state_records_the_adapter(trained, kyutai_lora, fixtures_dir, tmp_path):
    """A prompt state saved with an adapter is refused by the base model and by another
    adapter, and accepted with the same adapter, fused or kept apart (one digest of its
    files)."""
    import sentencepiece

    from moshi_mlx.conversation.engine import Engine
    from moshi_mlx.conversation.lm_gen import LmGen
    from moshi_mlx.conversation.prompts import MoshiPrompt
    from moshi_mlx.errors import PromptError
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    class SilentCodec:
        def encode(self, pcm: np.ndarray) -> np.ndarray:
            return np.zeros(8, np.int64)

        def decode(self, codes: np.ndarray) -> np.ndarray:
            return np.zeros(1920, np.float32)

        def reset(self) -> None:
            pass

    tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(fixtures_dir /
                                                                    "tokenizer.model"))

    def engine(adapter: LmAdapterOptions | None) -> Engine:
        lm = base_lm()
        if adapter is not None:
            adapter.apply(lm)
        return Engine(SilentCodec(), LmGen(lm, text_temp=0.0, audio_temp=0.0), tokenizer)

    adapters, _ = trained
    tuned = engine(LmAdapterOptions(adapter_path=str(adapters)))
    tuned.set_prompt(MoshiPrompt(text="Talk about boats."))
    state = tmp_path / "tuned.safetensors"
    tuned.save_prompt_state(state)
    with pytest.raises(PromptError, match="saved with other weights"):
        engine(None).load_prompt_state(state)
    with pytest.raises(PromptError, match="saved with other weights"):
        engine(LmAdapterOptions(lora_weight=str(kyutai_lora / "lora.safetensors"))
               ).load_prompt_state(state)
    engine(LmAdapterOptions(adapter_path=str(adapters))).load_prompt_state(state)
    kyutai = engine(LmAdapterOptions(lora_weight=str(kyutai_lora / "lora.safetensors")))
    kyutai.set_prompt(MoshiPrompt(text="Talk about boats."))
    kyutai.save_prompt_state(tmp_path / "kyutai.safetensors")
    engine(LmAdapterOptions(lora_weight=str(kyutai_lora / "lora.safetensors"), fuse=False)
           ).load_prompt_state(tmp_path / "kyutai.safetensors")
