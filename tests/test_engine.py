"""moshi_mlx.conversation.engine: the
frame loop (Mimi encode -> one Moshi step -> Mimi decode) and the
model-file resolution shared by the terminal and web front ends."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece
import soundfile

from moshi_mlx.cli.options import add_model_args, build_engine, resolve_model_files
from moshi_mlx.conversation.engine import Engine, EngineOptions, FrameOutput
from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.checkpoint import inspect_checkpoint


def detect_quantization(path: Path) -> int | None:
    """Bits of a Moshi LM file from its header alone (None: not quantized)."""
    quantization = inspect_checkpoint(path, FIXTURES / "lm_config.json").quantization
    return None if quantization is None else quantization.bits

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).parent.parent


def _speech() -> np.ndarray:
    pcm, rate = soundfile.read(str(FIXTURES / "speech.wav"), dtype="float32")
    assert rate == 24000
    return pcm


def _fixture_engine(mimi_path: Path, options: EngineOptions | None = None) -> Engine:
    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", mimi_path, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json", options=options,
    )


class _StubCodec:
    """Feeds fixed user codes to the engine and records the codes it is asked to decode."""

    def __init__(self, user_codes: np.ndarray):
        self.user_codes = user_codes  # [8, T]
        self.t = 0
        self.decoded: list[np.ndarray] = []

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        codes = self.user_codes[:, self.t]
        self.t += 1
        return codes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        self.decoded.append(np.array(codes))
        return np.full(1920, 0.25, dtype=np.float32)

    def reset(self) -> None:
        self.t = 0
        self.decoded.clear()


def test_engine_steps_reproduce_the_official_pytorch_generation():
    """The engine feeds user frame t to step t and routes Moshi's frames to the decoder exactly
    as the official PyTorch LMGen does: greedy float32 run vs `torch_f32` goldens."""
    import mlx.core as mx

    from moshi_mlx import LmGen, load_lm

    golden = np.load(FIXTURES / "lm_golden.npz")
    lm = load_lm(str(FIXTURES / "lm_pytorch.safetensors"),
                 config=str(FIXTURES / "lm_config.json"), dtype=mx.float32)
    gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
    codec = _StubCodec(golden["user_codes"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    engine = Engine(codec, gen, sp)
    engine.warm_up()  # as from_files does: must leave no trace in what follows

    steps = 40
    outs = [engine.process(np.zeros(1920, np.float32)) for _ in range(steps)]
    text = golden["torch_f32_text"]
    expected_text = [
        None if t in (0, 3) else sp.id_to_piece(int(t)).replace("\u2581", " ") for t in text
    ]
    assert [o.text for o in outs] == expected_text
    # nothing decoded at step 0 (zeros out), then exactly the frame PyTorch returns at step t
    assert np.array_equal(outs[0].pcm, np.zeros(1920, np.float32))
    assert all(np.all(o.pcm == 0.25) for o in outs[1:])
    np.testing.assert_array_equal(np.stack(codec.decoded), golden["torch_f32_out"][1:steps, 1:])
    for o in outs:
        assert isinstance(o, FrameOutput) and o.pcm.dtype == np.float32
        assert set(o.timings) == {"encode", "step", "decode"}
        assert all(v >= 0 for v in o.timings.values())


def test_sampling_switched_to_greedy_per_conversation_reproduces_pytorch():
    """A sampling engine switched to greedy between conversations (as the web server does for
    a client's query parameters) generates the official greedy goldens; switched back, it
    samples with its own settings again."""
    import mlx.core as mx

    from moshi_mlx import LmGen, load_lm
    from moshi_mlx.modules.sampling import SamplingSettings

    golden = np.load(FIXTURES / "lm_golden.npz")
    lm = load_lm(str(FIXTURES / "lm_pytorch.safetensors"),
                 config=str(FIXTURES / "lm_config.json"), dtype=mx.float32)
    codec = _StubCodec(golden["user_codes"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))
    engine = Engine(codec, LmGen(lm, seed=5), sp)
    engine.warm_up()
    defaults = engine.sampling
    assert defaults == SamplingSettings(0.7, 25, 0.8, 250)
    engine.set_sampling(SamplingSettings(0.0, 25, 0.0, 250))
    engine.reset()
    steps = 20
    for _ in range(steps):
        engine.process(np.zeros(1920, np.float32))
    np.testing.assert_array_equal(np.stack(codec.decoded), golden["torch_f32_out"][1:steps, 1:])
    engine.set_sampling(defaults)
    engine.reset()
    assert engine.sampling == defaults
    for _ in range(steps):
        engine.process(np.zeros(1920, np.float32))
    assert not np.array_equal(np.stack(codec.decoded), golden["torch_f32_out"][1:steps, 1:])


def test_layers_split_on_the_model_thread_still_reproduce_pytorch():
    """As the CLIs run a CPU model: loaded, split over CPU streams and stepped on the model
    thread (the streams belong to that thread), greedy output still equals the goldens."""
    import mlx.core as mx

    from moshi_mlx import LmGen, load_lm
    from moshi_mlx.cli.model_thread import (
        load_on_model_thread,
        start_model_thread,
        stop_model_thread,
    )

    golden = np.load(FIXTURES / "lm_golden.npz")
    codec = _StubCodec(golden["user_codes"])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(FIXTURES / "tokenizer.model"))

    def build() -> Engine:
        lm = load_lm(str(FIXTURES / "lm_pytorch.safetensors"),
                     config=str(FIXTURES / "lm_config.json"), dtype=mx.float32, cpu_threads=1)
        assert lm.use_cpu_threads(2, min_weights=0) > 0  # the fixture is below the threshold
        return Engine(codec, LmGen(lm, text_temp=0.0, audio_temp=0.0), sp)

    executor = start_model_thread()
    try:
        engine = load_on_model_thread(executor, build)
        for _ in range(40):
            executor.submit(engine.process, np.zeros(1920, np.float32)).result()
    finally:
        stop_model_thread(executor)
    np.testing.assert_array_equal(np.stack(codec.decoded), golden["torch_f32_out"][1:40, 1:])


def test_engine_with_mlx_mimi_agrees_with_rustymimi(random_mimi_path):
    """Real-size random Mimi + tiny LM, default MLX Mimi: the user's codes the LM sees are the
    ones rustymimi (Kyutai's Rust Mimi) computes, and the audio out is rustymimi's decoding
    of the codes the LM produced; reset() restarts the same conversation."""
    import rustymimi

    from moshi_mlx.modules.sampling import SamplingSettings

    greedy = SamplingSettings(text_temp=0.0, audio_temp=0.0)
    engine = _fixture_engine(random_mimi_path, EngineOptions(sampling=greedy))
    seen: list[tuple[np.ndarray, np.ndarray | None]] = []
    step = engine.lm_gen.step

    def spy(user_codes):
        text, audio = step(user_codes)
        seen.append((np.array(user_codes)[0], None if audio is None else np.array(audio)[0]))
        return text, audio

    engine.lm_gen.step = spy
    speech = _speech()
    frames = [speech[i * 1920 : (i + 1) * 1920] for i in range(20, 26)]
    outs = [engine.process(f) for f in frames]

    ref = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=8)
    ref_codes = np.stack(
        [np.asarray(ref.encode_step(f.reshape(1, 1, -1)))[0, :, 0] for f in frames]
    )
    lm_codes = np.stack([u for u, _ in seen])
    assert (lm_codes == ref_codes).mean() >= 0.9

    decoder = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=8)
    assert seen[0][1] is None and np.all(outs[0].pcm == 0)
    for (_, audio), out in zip(seen[1:], outs[1:], strict=True):
        expected = np.asarray(
            decoder.decode_step(audio.reshape(1, 8, 1).astype(np.uint32)), dtype=np.float32
        ).reshape(-1)
        assert np.abs(expected).max() > 0.01  # the random decoder does make sound
        assert np.abs(out.pcm - expected).max() < 0.02

    engine.reset()
    seen.clear()
    again = [engine.process(f) for f in frames]
    for a, b in zip(outs, again, strict=True):
        assert a.text == b.text
        np.testing.assert_array_equal(a.pcm, b.pcm)


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "repo", "model_file"),
    [
        (["-q", "4"], "kyutai/moshiko-mlx-q4", "model.q4.safetensors"),
        (["-q", "8"], "kyutai/moshiko-mlx-q8", "model.q8.safetensors"),
        ([], "kyutai/moshiko-mlx-bf16", "model.safetensors"),
        (["-q", "4", "--voice", "moshika"], "kyutai/moshika-mlx-q4", "model.q4.safetensors"),
        (["--voice", "moshika"], "kyutai/moshika-mlx-bf16", "model.safetensors"),
    ],
)
def test_default_repo_follows_q_and_voice(monkeypatch, tmp_path, argv, repo, model_file):
    fetched: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str) -> Path:
        fetched.append((repo_id, filename))
        if filename == "config.json":
            raise WeightsError("not there")
        path = tmp_path / filename
        path.write_bytes(b"")
        return path

    import moshi_mlx.loading.hub

    monkeypatch.setattr(moshi_mlx.loading.hub, "_hub_download", fake_download)
    monkeypatch.setattr("moshi_mlx.loading.checkpoint.inspect_checkpoint",
                        lambda path, config, model_types: SimpleNamespace(
                            model_type="moshi", files=SimpleNamespace(owner={})))
    monkeypatch.setattr("moshi_mlx.loading.checkpoint.check_requested_bits",
                        lambda checkpoint, bits: None)
    files = resolve_model_files(_args(argv))
    assert (repo, model_file) in fetched
    assert (repo, "tokenizer_spm_32k_3.model") in fetched
    assert (repo, "tokenizer-e351c8d8-checkpoint125.safetensors") in fetched
    assert files.weight.name == model_file
    assert files.config is None  # config.json is optional


def test_detect_quantization_on_the_official_files(official_mlx_files):
    assert detect_quantization(official_mlx_files["q4"]) == 4
    assert detect_quantization(official_mlx_files["q8"]) == 8
    assert detect_quantization(official_mlx_files["bf16"]) is None
    assert detect_quantization(FIXTURES / "lm_pytorch.safetensors") is None


def _converted_folder(tmp_path: Path, model_file: Path, mimi: Path) -> Path:
    """A folder as `python -m weights_convert --out DIR` makes it (model, config, tokenizers)."""
    folder = tmp_path / "converted"
    folder.mkdir()
    os.symlink(model_file, folder / model_file.name)
    os.symlink(model_file.parent / "config.json", folder / "config.json")
    os.symlink(FIXTURES / "tokenizer.model", folder / "tokenizer_spm_32k_3.model")
    os.symlink(mimi, folder / "tokenizer-e351c8d8-checkpoint125.safetensors")
    return folder


def test_converted_folder_and_wrong_q(official_mlx_files, random_mimi_path, tmp_path):
    folder = _converted_folder(tmp_path, official_mlx_files["q4"], random_mimi_path)
    files = resolve_model_files(_args(["--hf-repo", str(folder)]))
    assert files.weight.name == "model.q4.safetensors"
    assert files.config == folder / "config.json"
    assert resolve_model_files(_args(["--hf-repo", str(folder), "-q", "4"])).quantize == 4
    with pytest.raises(WeightsError, match="-q"):
        resolve_model_files(_args(["--hf-repo", str(folder), "-q", "8"]))
    with pytest.raises(WeightsError, match="4-bit"):
        resolve_model_files(_args(["--moshi-weight", str(official_mlx_files["q4"]), "-q", "8",
                                   "--hf-repo", str(folder)]))
    with pytest.raises(WeightsError, match="-q 8"):
        resolve_model_files(_args(["--hf-repo", "kyutai/moshiko-mlx-q8", "-q", "4"]))

    # the q4 folder really loads and runs (4-bit Linear layers in the LM)
    import mlx.nn as nn

    engine = build_engine(_args(["--hf-repo", str(folder), "--mimi-backend", "rustymimi",
                                 "--text-temp", "0", "--audio-temp", "0"]))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in engine.lm_gen.lm.named_modules())
    out = engine.process(_speech()[:1920])
    assert out.pcm.shape == (1920,)


def test_missing_weights_offline_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.local", "-q", "4", "--input-file",
         str(FIXTURES / "speech.wav"), "--output-file", str(tmp_path / "out.wav")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "kyutai/moshiko-mlx-q4" in lines[0] and "model.q4.safetensors" in lines[0]
    assert "cache" in lines[0]  # says why: not downloaded yet and offline, not "no such file"
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.parametrize("command", [
    ["moshi_mlx.local", "-q", "4", "--input-file", str(FIXTURES / "speech.wav"),
     "--output-file", "{tmp}/out.wav"],
    ["moshi_mlx.mimi", "encode", str(FIXTURES / "speech.wav"), "{tmp}/codes.npy"],
    ["weights_convert", "--hf-repo", "kyutai/moshika-pytorch-bf16", "--out", "{tmp}/out"],
])
def test_unreachable_hub_fails_at_once_with_one_line(tmp_path, command):
    """No HF_HUB_OFFLINE, but nothing answers at the hub's address: no retries (huggingface_hub
    alone takes ~23 s), one line naming the repo, the file and what to pass instead."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    args = [part.replace("{tmp}", str(tmp_path)) for part in command]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "cannot be reached" in lines[0] and "pass a local file or folder" in lines[0]
    assert elapsed < 10, elapsed  # the probe gives up after 2 s; the rest is Python start-up
    assert not list(tmp_path.glob("out*")) and not (tmp_path / "codes.npy").exists()
