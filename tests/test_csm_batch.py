"""Batched CSM generation (moshi_mlx.speech.batch, `tts --batch`) against single runs and
transformers' batched `generate` (tests/fixtures/csm/csm_batch_golden.npz, made by
tools/derive_csm_batch_golden.py: three conversations with 0, 39 and 15 context frames in one
left-padded batch, float32 greedy; conversation a ends by the all-zero frame after 10 frames,
b and c run to the 16-frame limit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile
from csm_layouts import write_transformers_csm

from moshi_mlx.errors import MoshiError
from moshi_mlx.loading.models import load_csm
from moshi_mlx.modules.cache import LeftPaddedCache
from moshi_mlx.speech.batch import SpeechRequest, collect_batch, generate_batch, stream_batch
from moshi_mlx.speech.generate import (
    Segment,
    generate_speech,
    load_tokenizer,
    stream_decoded,
    stream_speech,
)
from moshi_mlx.speech.stopping import KEPT_PAUSE_FRAMES, StopRules
from moshi_mlx.tts import main

CSM = Path(__file__).parent / "fixtures" / "csm"
NAMES = ("a", "b", "c")
MODEL_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]
REFERENCE = dict(temperature=0, allow_non_codes=True, stop="eos")  # as transformers runs


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(CSM / "csm_batch_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    hf = write_transformers_csm(tmp_path_factory.mktemp("csm_hf"))
    return {"sesame": load_csm(CSM / "sesame", dtype=mx.float32),
            "hf": load_csm(hf, dtype=mx.float32)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(CSM / "tokenizer.json")


def request(golden, name: str, max_frames: int | None = None) -> SpeechRequest:
    codes = golden[f"{name}_context_codes"]
    context = [Segment(int(golden[f"{name}_context_speaker"]), str(golden[f"{name}_context_text"]),
                       codes=codes)] if codes.shape[1] else []
    return SpeechRequest(str(golden[f"{name}_text"]), int(golden[f"{name}_speaker"]), context,
                         max_frames or int(golden["max_new_tokens"]))


@pytest.mark.parametrize("layout", ["sesame", "hf"])
def test_batched_equals_single_runs_and_transformers_batched_generate(layout, models,
                                                                      tokenizer, golden):
    model = models[layout]
    requests = [request(golden, name) for name in NAMES]
    batched = generate_batch(model, tokenizer, requests, **REFERENCE, return_stop=True)
    assert [stop for _, stop in batched] == ["eos", "max", "max"]
    for name, req, (frames, stop) in zip(NAMES, requests, batched, strict=True):
        assert stop == str(golden[f"{name}_stop"]), name
        np.testing.assert_array_equal(frames, golden[f"{name}_frames"], err_msg=name)
        single, single_stop = generate_speech(model, tokenizer, req.text, req.speaker,
                                              req.context, max_frames=req.max_frames,
                                              return_stop=True, **REFERENCE)
        assert single_stop == stop
        np.testing.assert_array_equal(single, frames, err_msg=name)


def test_each_row_stops_on_its_own_and_leaves_the_batch(models, tokenizer, golden):
    limits = {"a": 16, "b": 5, "c": 12}  # a: the all-zero frame after 10; b, c: their own max
    stream = stream_batch(models["sesame"], tokenizer,
                          [request(golden, n, limits[n]) for n in NAMES], **REFERENCE)
    prompts = [len(golden[f"{n}_context_codes"].T) for n in NAMES]
    assert prompts == [0, 39, 15]
    widths, rows, got = [], [], {n: [] for n in NAMES}
    for step in stream:
        rows.append(stream.batch_size)
        widths.append(stream.caches[0].keys.shape[0])
        for index, frame in step.items():
            got[NAMES[index]].append(frame)
    assert stream.stop_reasons == ["eos", "max", "max"]
    for name in NAMES:
        expected = golden[f"{name}_frames"][: limits[name]]
        np.testing.assert_array_equal(np.stack(got[name]), expected, err_msg=name)
    # b leaves after its 5th frame, a at its all-zero 11th step, c runs alone to 12
    assert rows == [3] * 5 + [2] * 5 + [1] * 2
    assert widths == rows  # the caches hold only the rows still generating
    cache = stream.caches[0]
    # c alone: no padding left, the cache spans c's own prompt and frames
    assert cache.pads.tolist() == [0]
    assert cache.slots == int(golden["padded_lengths"][2]) + 11


def test_batched_default_stop_rules_equal_single_runs(models, tokenizer, golden):
    """Sampling over Mimi codes only (the default), every stop rule on, the text budget."""
    model = models["sesame"]
    requests = [SpeechRequest(r.text, r.speaker, r.context) for r in
                (request(golden, n) for n in NAMES)]
    batched = generate_batch(model, tokenizer, requests, temperature=0, return_stop=True)
    for req, (frames, stop) in zip(requests, batched, strict=True):
        single, single_stop = generate_speech(model, tokenizer, req.text, req.speaker,
                                              req.context, temperature=0, return_stop=True)
        assert (stop, len(frames)) == (single_stop, len(single))
        np.testing.assert_array_equal(frames, single)
        assert frames.max() < 2048


class PlantedMimi:
    """A stand-in decoder: the n-th stream it starts is loud (0.1) for loud[n] frames, then
    silent; every frame decodes to 1920 samples."""

    def __init__(self, loud: list[int]) -> None:
        self.loud = list(loud)

    def new_decoder_state(self) -> dict:
        return {"loud": self.loud.pop(0), "frames": 0}

    def decode_step(self, codes, state: dict) -> np.ndarray:
        state["frames"] += 1
        level = 0.1 if state["frames"] <= state["loud"] else 0.0
        return np.full((1, 1, 1920), level, np.float32)


def test_silence_stops_its_own_row_only(models, tokenizer, golden):
    model, rules = models["sesame"], StopRules("all", max_silence=0.4)  # 5 quiet frames
    requests = [request(golden, "b", 16), request(golden, "c", 16)]
    stream = stream_batch(model, tokenizer, requests, temperature=0, stop=rules)
    results = collect_batch(stream, PlantedMimi([2, 100]))
    quiet = 5
    assert [r.stop_reason for r in results] == ["silence", "max"]
    assert results[0].trimmed_frames == quiet - KEPT_PAUSE_FRAMES
    assert len(results[0].frames) == 2 + KEPT_PAUSE_FRAMES
    assert results[0].audio.shape == (len(results[0].frames) * 1920,)
    for req, result, loud in zip(requests, results, (2, 100), strict=True):
        single = stream_speech(model, tokenizer, req.text, req.speaker, req.context,
                               temperature=0, max_frames=16, stop=rules)
        kept = [frame for frame, _ in stream_decoded(PlantedMimi([loud]), single)]
        assert single.stop_reason == result.stop_reason
        np.testing.assert_array_equal(np.stack(kept), result.frames)


def test_bad_requests(models, tokenizer):
    with pytest.raises(MoshiError, match="no requests"):
        stream_batch(models["sesame"], tokenizer, [])
    with pytest.raises(MoshiError, match="SpeechRequests"):
        stream_batch(models["sesame"], tokenizer, ["Hello."])
    with pytest.raises(MoshiError, match="text is empty"):
        stream_batch(models["sesame"], tokenizer, [SpeechRequest("Hi."), SpeechRequest(" ")])


def test_left_padded_cache_masks_padding_and_drops_rows():
    cache = LeftPaddedCache([2, 0])
    assert cache.offset.tolist() == [-2, 0]
    k = mx.arange(2 * 1 * 3 * 2, dtype=mx.float32).reshape(2, 1, 3, 2)
    keys, values, mask = cache.update(k, k + 100)
    assert keys.shape == (2, 1, 3, 2) and mask.shape == (2, 1, 3, 3)
    # row 0: slots 0, 1 are padding (each sees only itself), slot 2 is its first real key
    assert np.asarray(mask[0, 0]).tolist() == [[True, False, False], [False, True, False],
                                               [False, False, True]]
    assert np.asarray(mask[1, 0]).tolist() == [[True, False, False], [True, True, False],
                                               [True, True, True]]
    assert cache.offset.tolist() == [1, 3]
    keys, _, mask = cache.update(k[:, :, :1], k[:, :, :1])
    assert np.asarray(mask[:, 0, 0]).tolist() == [[False, False, True, True], [True] * 4]
    cache.keep_rows([0])  # row 0's two padding slots are padding in every row left
    assert cache.pads.tolist() == [0] and cache.slots == 2 and cache.offset.tolist() == [2]
    np.testing.assert_array_equal(np.asarray(cache.keys[0, 0, :2]),
                                  np.asarray(mx.concatenate([k[0, 0, 2:], k[0, 0, :1]])))
    keys, _, mask = cache.update(k[:1, :, :1], k[:1, :, :1])
    assert mask is None and keys.shape == (1, 1, 3, 2)


def write_requests(folder: Path, golden) -> Path:
    ctx = folder / "ctx_codes.npy"
    np.save(ctx, golden["c_context_codes"])
    lines = [
        json.dumps({"text": str(golden["a_text"]), "speaker": 0, "out": "first.wav",
                    "max_frames": 6}),
        '{"text": "broken",',
        json.dumps({"speaker": 1}),
        "",
        json.dumps({"text": str(golden["c_text"]), "speaker": 0, "max_frames": 4,
                    "context": [{"speaker": 0, "text": str(golden["c_context_text"]),
                                 "codes": ctx.name}]}),
    ]
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_batch_codes_without_mimi(tmp_path, csm_library, golden):
    path = write_requests(tmp_path, golden)
    result = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.tts", "--batch", str(path), "--codes-out",
         str(tmp_path / "codes") + "/", *MODEL_ARGS, "--temperature", "0",
         "--mimi-weight", str(tmp_path / "no_such_mimi.safetensors")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # two lines failed, the others ran
    err = result.stderr.splitlines()
    assert f"error: {path} line 2: not valid JSON" in "\n".join(err)
    assert f"error: {path} line 3: no 'text'" in err
    assert any(line.startswith("[") and "line 1 -> first.npy: 6 frames" in line for line in err)
    assert any("line 5 -> line5.npy: 4 frames" in line for line in err)
    assert err[-1].startswith("done: 2 of 4 requests, 10 frames") and "2 lines failed" in err[-1]
    model, tokenizer = csm_library
    context = [Segment(0, str(golden["c_context_text"]), codes=golden["c_context_codes"])]
    for name, text, ctx, frames in (("first", golden["a_text"], [], 6),
                                    ("line5", golden["c_text"], context, 4)):
        expected = generate_speech(model, tokenizer, str(text), 0, ctx, temperature=0,
                                   max_frames=frames)
        np.testing.assert_array_equal(np.load(tmp_path / "codes" / f"{name}.npy").T, expected)


def test_cli_batch_wav(tmp_path, random_mimi_path, mimi32, csm_library, golden, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps({"text": str(golden[f"{n}_text"]), "max_frames": m})
                              for n, m in (("a", 3), ("c", 5))) + "\n")
    assert main(["--batch", str(path), "-o", str(tmp_path / "wavs") + "/", "--codes-out",
                 str(tmp_path / "codes") + "/", *MODEL_ARGS, "--temperature", "0",
                 "--mimi-weight", str(random_mimi_path), "--no-watermark"]) == 0
    for name, frames in (("line1", 3), ("line2", 5)):
        codes = np.load(tmp_path / "codes" / f"{name}.npy")
        pcm, rate = soundfile.read(str(tmp_path / "wavs" / f"{name}.wav"), dtype="float32")
        assert codes.shape == (32, frames) and rate == 24000 and pcm.shape == (frames * 1920,)
        from moshi_mlx.speech.generate import stream_audio

        expected = np.concatenate(list(stream_audio(mimi32, codes.T)))
        np.testing.assert_allclose(pcm, expected, atol=1e-5)
    assert "done: 2 of 2 requests, 8 frames" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["Hello."], "give no text argument"),
    (["--play"], "not with --batch"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_cli_batch_argument_errors(extra, message, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "Hi."}\n')
    result = subprocess.run(
        [sys.executable, "-m", "moshi_mlx.tts", "--batch", str(path), "--codes-out",
         str(tmp_path) + "/", *MODEL_ARGS, *extra], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
