"""Transformers-layout copies of our fixtures, made by transformers' own conversion scripts, and
the checks that our loaders read them as they read the official layouts.

Three steps, in two environments (the package never imports transformers or torch):

1. derive (a venv with CPU torch + transformers + safetensors + numpy, e.g. /work/trfs-venv):

       python tools/derive_transformers_layouts.py derive --scripts DIR --out OUT

   DIR holds the three conversion scripts of the transformers repository (they are not in the
   wheel): src/transformers/models/mimi/convert_mimi_checkpoint_to_pytorch.py (read at commit
   bd8ef8983d221a5b7af77f419211bd534028a606) and
   src/transformers/models/moshi/convert_moshi_transformers.py (commit
   2f856f50b4d248f8a4f8ccc72df3d0cfe85a6d16). Used with transformers 5.24.0 and torch 2.13
   (CPU). The Moshi script's `convert_checkpoint` runs as it is; the Mimi script's renaming
   (`_convert_model`, `convert_list`) fills a stand-in model (`_SavedLayout`), because
   transformers 5 nests MimiModel's modules differently in memory than in its checkpoints.
   They make
     - OUT/mimi: the tests' real-size random Mimi (tests/.cache, see tests/mimi_random.py) as a
       `MimiModel` folder (config.json + model.safetensors, like kyutai/mimi);
     - OUT/moshi: the tiny Moshi LM (tests/fixtures/lm_pytorch.safetensors + lm_config.json) as a
       `MoshiForConditionalGeneration` folder (like kmhf/hf-moshiko), bundling a tiny random
       `MimiModel` (OUT/tiny_mimi, values from `tiny_mimi_value`) as its audio encoder.
     - OUT/stt: the tiny STT (tests/fixtures/stt/stt_pytorch.safetensors + stt_config.json,
       its extra heads left out: the script has none) as a
       `KyutaiSpeechToTextForConditionalGeneration` folder (like kyutai/stt-1b-en_fr-trfs,
       with preprocessor_config.json), bundling a tiny random 32-codebook `MimiModel`
       (OUT/tiny_mimi32) as its codec. Script:
       src/transformers/models/kyutai_speech_to_text/convert_kyutai_speech_to_text_to_hf.py
       (commit 1e016c8bea7a635eae040d5bad0fc2ed2e3fe691); its `write_model` hard-codes the
       2.6b config, so its steps run here with the tiny config (`derive_stt`).
   With --fixtures it also writes tests/fixtures/lm_transformers.manifest.json (dtype, shape,
   sha256 of every tensor) and lm_transformers_config.json, and stt/stt_transformers.manifest.json,
   stt_transformers_config.json, stt_transformers_preprocessor_config.json: the tests rebuild
   the files from the PyTorch fixtures with their own code and check them against these.
   --skip mimi|moshi|stt leaves a model out.

2. reference (same venv): transformers' own MimiModel and MoshiForConditionalGeneration run on
   the derived folders: OUT/reference.npz (Mimi codes and decoded audio of the test speech;
   Moshi's teacher-forced greedy tokens and logits on the golden trajectory) and the agreement
   of Moshi with tests/fixtures/lm_golden.npz; transformers' KyutaiSpeechToText on the stored
   codes of tests/fixtures/stt/stt_golden.npz (teacher-forced, and greedy through its cache)
   and its agreement with the float32 STT goldens.

3. verify (our venv, with MLX and rustymimi):

       PYTHONPATH=$PWD python tools/derive_transformers_layouts.py verify --out OUT

   our load_mimi on OUT/mimi (folder, file, and a 3-shard copy) against load_mimi on the
   official file, rustymimi and transformers' MimiModel; prints JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import wave
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
STT_FIXTURES = FIXTURES / "stt"
RANDOM_MIMI = ROOT / "tests" / ".cache" / "mimi_random_v2.safetensors"
FRAME = 1920
CODEBOOKS = 8

# The tiny Mimi bundled into the tiny Moshi file: small, but with the card (2048 codes) and
# the number of codebooks (dep_q = 8) the LM needs.
TINY_MIMI = {
    "hidden_size": 32, "num_filters": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "codebook_dim": 16,
    "vector_quantization_hidden_dimension": 16, "num_quantizers": 8,
    "upsample_groups": 32,
}


def speech() -> np.ndarray:
    with wave.open(str(FIXTURES / "speech.wav")) as f:
        assert f.getframerate() == 24000 and f.getsampwidth() == 2 and f.getnchannels() == 1
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768


def tiny_mimi_value(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tiny Mimi's tensor `name`: float32 normal(0, 0.05) from a generator seeded by the
    name's CRC32 (the tests rebuild the same values without torch)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def _gating_hidden(dim: int, dim_feedforward: int) -> int:
    return 21 * dim // 8 if dim_feedforward == 4 * dim else 2 * dim_feedforward // 3


def moshi_transformers_config(lm: dict, mimi_config: dict) -> dict:
    """MoshiConfig keys for our official lm_config.json (hidden sizes by the official rule)."""
    hidden = _gating_hidden(lm["dim"], int(lm["hidden_scale"] * lm["dim"]))
    depth_hidden = _gating_hidden(lm["depformer_dim"], lm["depformer_dim_feedforward"])
    return {
        "model_type": "moshi",
        "vocab_size": lm["text_card"],
        "hidden_size": lm["dim"],
        "num_hidden_layers": lm["num_layers"],
        "num_attention_heads": lm["num_heads"],
        "ffn_dim": 2 * hidden,
        "num_codebooks": lm["dep_q"],
        "max_position_embeddings": lm["context"],
        "sliding_window": lm["context"],
        "rope_parameters": {"rope_theta": float(lm["max_period"]), "rope_type": "default"},
        "rms_norm_eps": 1e-8,
        "audio_encoder_config": mimi_config,
        "depth_decoder_config": {
            "hidden_size": lm["depformer_dim"],
            "num_hidden_layers": lm["depformer_num_layers"],
            "num_attention_heads": lm["depformer_num_heads"],
            "ffn_dim": 2 * depth_hidden,
            "sliding_window": lm["depformer_context"],
            "max_position_embeddings": lm["dep_q"] + 1,
            "rms_norm_eps": 1e-8,
        },
    }


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def manifest(path: Path) -> dict:
    """Per tensor: dtype, shape and sha256 of its raw bytes (read straight from the file)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: {"dtype": e["dtype"], "shape": e["shape"],
                   "sha256": hashlib.sha256(raw[base + e["data_offsets"][0]:
                                                base + e["data_offsets"][1]]).hexdigest()}
            for name, e in sorted(header.items())}


# ---------------------------------------------------------------------------- derive


class _SavedLayout:
    """Stands in for the `hf_model` of the Mimi script's `_convert_model`. The script renames
    to the layout that MimiModel checkpoints are saved in (kyutai/mimi's), while transformers
    5 nests its modules differently in memory and maps the names only in from_pretrained /
    save_pretrained. So: the names to check are those of a saved MimiModel; loading writes the
    renamed tensors as a checkpoint and reads it back with from_pretrained (strictly)."""

    def __init__(self, config, work: Path) -> None:
        from safetensors import safe_open
        from transformers import MimiModel

        self.config, self.work = config, work
        MimiModel(config).save_pretrained(str(work / "layout"))
        with safe_open(str(work / "layout" / "model.safetensors"), "pt") as f:
            self.names = set(f.keys())
        self.model = None

    def state_dict(self) -> dict:
        return dict.fromkeys(self.names)

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        from safetensors.torch import save_file
        from transformers import MimiModel

        folder = self.work / "renamed"
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.model, info = MimiModel.from_pretrained(str(folder), output_loading_info=True)
        problems = {k: v for k, v in info.items() if v}
        if problems:
            raise ValueError(f"transformers did not load every tensor: {problems}")

    def __getattr__(self, name: str):  # eval, to, named_parameters, save_pretrained
        return getattr(self.__dict__["model"], name)


def derive_mimi(mimi_script, out: Path) -> None:
    """The script's convert_checkpoint, with `_SavedLayout` as the model it fills."""
    import tempfile

    import safetensors.torch
    import torch
    from transformers import MimiConfig

    config = MimiConfig()  # kyutai/mimi's architecture, that of the official checkpoint
    with tempfile.TemporaryDirectory() as work, torch.no_grad():
        target = _SavedLayout(config, Path(work))
        state = safetensors.torch.load_file(str(RANDOM_MIMI))
        model = mimi_script._convert_model(state, target, mimi_script.convert_list,
                                           torch.device("cpu"), config)
        model.save_pretrained(str(out))


def derive(scripts: Path, out: Path, write_fixtures: bool, skip: set[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if "mimi" not in skip:
        if not RANDOM_MIMI.is_file():
            sys.exit(f"{RANDOM_MIMI} missing: run tests/test_mimi.py once (it generates it)")
        mimi_script = _load_script(scripts / "convert_mimi_checkpoint_to_pytorch.py")
        derive_mimi(mimi_script, out / "mimi")
    if "moshi" not in skip:
        derive_moshi(_load_script(scripts / "convert_moshi_transformers.py"), out,
                     write_fixtures)
    if "stt" not in skip:
        derive_stt(_load_script(scripts / "convert_kyutai_speech_to_text_to_hf.py"), out,
                   write_fixtures)
    print(f"derived into {out}")


def derive_moshi(moshi_script, out: Path, write_fixtures: bool) -> None:
    # The bundled tiny Mimi has the card (2048 codes) and codebooks (dep_q = 8) the LM needs.
    tiny_mimi(out / "tiny_mimi", CODEBOOKS)
    tiny_config = json.loads((out / "tiny_mimi" / "config.json").read_text())
    lm = json.loads((FIXTURES / "lm_config.json").read_text())
    config_dir = out / "moshi_config"
    config_dir.mkdir(exist_ok=True)
    (config_dir / "config.json").write_text(
        json.dumps(moshi_transformers_config(lm, tiny_config), indent=2))
    moshi_script.convert_checkpoint(str(FIXTURES / "lm_pytorch.safetensors"), str(out / "moshi"),
                                    str(out / "tiny_mimi"), str(config_dir))
    if write_fixtures:
        entries = manifest(out / "moshi" / "model.safetensors")
        (FIXTURES / "lm_transformers.manifest.json").write_text(
            json.dumps({"source": "convert_moshi_transformers.py on lm_pytorch.safetensors",
                        "tensors": entries}, indent=1) + "\n")
        shutil.copy(out / "moshi" / "config.json", FIXTURES / "lm_transformers_config.json")


def stt_transformers_config(lm: dict, mimi_config: dict) -> dict:
    """KyutaiSpeechToTextConfig keys for our official STT config.json. transformers' vocab
    holds the text_card output tokens plus the initial token (text_emb rows); its
    bos_token_id is that initial token (the class default, 48000, is outside the vocab)."""
    hidden = _gating_hidden(lm["dim"], int(lm["hidden_scale"] * lm["dim"]))
    vocab = lm["text_card"] + 1
    return {
        "vocab_size": vocab,
        "codebook_vocab_size": lm["card"] + 1,
        "num_codebooks": lm["n_q"],
        "hidden_size": lm["dim"],
        "num_hidden_layers": lm["num_layers"],
        "num_attention_heads": lm["num_heads"],
        "num_key_value_heads": lm["num_heads"],
        "ffn_dim": 2 * hidden,
        "sliding_window": lm["context"],
        "max_position_embeddings": lm["context"],
        "rope_parameters": {"rope_theta": float(lm["max_period"]), "rope_type": "default"},
        "rms_norm_eps": 1e-8,
        "audio_bos_token_id": lm["card"],
        "audio_pad_token_id": vocab + lm["n_q"] * (lm["card"] + 1),
        "pad_token_id": lm["existing_text_padding_id"],
        "bos_token_id": lm["text_card"],
        "codec_config": mimi_config,
    }


def tiny_mimi(folder: Path, num_quantizers: int):
    """A tiny random MimiModel (values from `tiny_mimi_value`, keyed by the names MimiModel
    saves, read back strictly), saved into `folder`."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import MimiConfig, MimiModel

    MimiModel(MimiConfig(**{**TINY_MIMI, "num_quantizers": num_quantizers})).save_pretrained(
        str(folder))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    save_file({name: torch.from_numpy(tiny_mimi_value(name, shape))
               for name, shape in shapes.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    model, info = MimiModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
    model.save_pretrained(str(folder))
    return model


def derive_stt(stt_script, out: Path, write_fixtures: bool) -> None:
    """The STT script's `write_model` steps with the tiny config instead of the 2.6b default
    it hard-codes: `convert_kyutai_speech_to_text_state_dict` on stt_pytorch.safetensors,
    `convert_mimi_state_dict` on the tiny Mimi's tensors, the three strict loads, the
    generation configs, save_pretrained, a strict reload; then `write_processor`'s feature
    extractor (the stt_config delay and prefix live in preprocessor_config.json, not in
    config.json). The extra (VAD) heads are left out: the script knows no `extra_heads`
    (its strict load refuses them), and the -trfs repos were converted from files without
    them."""
    import safetensors.torch
    import torch
    from transformers import (
        KyutaiSpeechToTextConfig,
        KyutaiSpeechToTextFeatureExtractor,
        KyutaiSpeechToTextForConditionalGeneration,
    )

    lm = json.loads((STT_FIXTURES / "stt_config.json").read_text())
    codec = tiny_mimi(out / "tiny_mimi32", lm["n_q"])
    codec_config = json.loads((out / "tiny_mimi32" / "config.json").read_text())
    config = KyutaiSpeechToTextConfig(**stt_transformers_config(lm, codec_config))
    config.use_cache = True
    config.codec_config.sliding_window = 250

    state_dict = safetensors.torch.load_file(str(STT_FIXTURES / "stt_pytorch.safetensors"))
    dropped = sorted(k for k in state_dict if k.startswith("extra_heads."))
    for key in dropped:
        del state_dict[key]
    state_dict = stt_script.convert_kyutai_speech_to_text_state_dict(state_dict, config)
    codec_state = stt_script.convert_mimi_state_dict(dict(codec.state_dict()),
                                                     config.codec_config)
    with torch.device("meta"):
        model = KyutaiSpeechToTextForConditionalGeneration(config)
    linear_weight = state_dict.pop("text_linear.weight")
    model.model.load_state_dict(state_dict, strict=True, assign=True)
    linear_weight = torch.cat([linear_weight, torch.zeros(1, config.hidden_size)])
    model.lm_head.load_state_dict({"weight": linear_weight}, strict=True, assign=True)
    model.codec_model.load_state_dict(codec_state, strict=True, assign=True)
    for attr in ("_name_or_path",):
        for part in (model.config, model.config.codec_config):
            if hasattr(part, attr):
                delattr(part, attr)
    model.generation_config._from_model_config = False
    model.generation_config.audio_window_size = 1
    model.generation_config.cache_implementation = "sliding_window"
    model.codec_model.generation_config._from_model_config = False
    model.codec_model.generation_config.cache_implementation = "sliding_window"
    model.codec_model.generation_config.use_cache = True
    folder = out / "stt"
    model.save_pretrained(str(folder))
    _, info = KyutaiSpeechToTextForConditionalGeneration.from_pretrained(
        str(folder), dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    stt = lm["stt_config"]
    KyutaiSpeechToTextFeatureExtractor(
        audio_delay_seconds=stt["audio_delay_seconds"],
        audio_silence_prefix_seconds=stt["audio_silence_prefix_seconds"],
    ).save_pretrained(str(folder))
    print(f"STT: left out {len(dropped)} extra_heads tensors; derived into {folder}")
    if write_fixtures:
        entries = manifest(folder / "model.safetensors")
        (STT_FIXTURES / "stt_transformers.manifest.json").write_text(
            json.dumps({"source": "convert_kyutai_speech_to_text_to_hf.py on "
                        "stt_pytorch.safetensors (extra_heads left out)",
                        "tensors": entries}, indent=1) + "\n")
        shutil.copy(folder / "config.json", STT_FIXTURES / "stt_transformers_config.json")
        shutil.copy(folder / "preprocessor_config.json",
                    STT_FIXTURES / "stt_transformers_preprocessor_config.json")


# ---------------------------------------------------------------------------- reference


def golden_inputs(golden: dict, delays: list[int], dep_q: int, text_card: int, card: int
                  ) -> np.ndarray:
    """The [steps, 1 + 2 dep_q] input tokens of each step of the golden greedy run (PyTorch
    LMGen timing, FIXTURES.md): stream s with delay d gets the initial token while t <= d;
    then text and Moshi's audio the token generated at step t - 1 (the depformer's raw tokens
    are already delay-shifted), user audio frame t - d."""
    text, audio = golden["torch_f32_text"], golden["torch_f32_audio_raw"]
    user = golden["user_codes"]
    steps = len(text)
    tokens = np.zeros((steps, 1 + 2 * dep_q), np.int64)
    for t in range(steps):
        for s, d in enumerate(delays):
            if t <= d:
                tokens[t, s] = text_card if s == 0 else card
            elif s == 0:
                tokens[t, s] = text[t - 1]
            elif s <= dep_q:
                tokens[t, s] = audio[t - 1, s - 1]
            else:
                tokens[t, s] = user[s - 1 - dep_q, t - d]
    return tokens


def reference(out: Path) -> None:
    import torch
    from transformers import MimiModel, MoshiForConditionalGeneration

    results: dict[str, np.ndarray] = {}
    report: dict[str, object] = {}
    torch.set_grad_enabled(False)

    if (out / "mimi").is_dir():
        mimi = MimiModel.from_pretrained(str(out / "mimi"), dtype=torch.float32).eval()
        pcm = torch.from_numpy(speech())[None, None]
        codes = mimi.encode(pcm, num_quantizers=CODEBOOKS).audio_codes
        results["mimi_codes"] = codes.numpy().astype(np.int32)
        results["mimi_decoded"] = mimi.decode(codes).audio_values.numpy()

    if (out / "stt").is_dir():
        reference_stt(out, results, report)
    if not (out / "moshi").is_dir():
        np.savez(out / "reference.npz", **results)
        print(json.dumps(report, indent=1))
        return
    golden = dict(np.load(FIXTURES / "lm_golden.npz"))
    lm = json.loads((FIXTURES / "lm_config.json").read_text())
    dep_q = lm["dep_q"]
    model = MoshiForConditionalGeneration.from_pretrained(str(out / "moshi"),
                                                          dtype=torch.float32).eval()
    tokens = torch.from_numpy(golden_inputs(golden, lm["delays"], dep_q, lm["text_card"],
                                            lm["card"]))[None]
    steps = tokens.shape[1]
    embeds = model.decoder.model.embed_tokens(tokens[:, :, 0])
    for k in range(2 * dep_q):
        embeds = embeds + model.embed_tokens[k](tokens[:, :, 1 + k])
    main = model.decoder(inputs_embeds=embeds,
                         attention_mask=torch.ones(1, steps, dtype=torch.long))
    text_logits = main.logits[0]
    audio_logits = []
    for t in range(steps):  # depth decoder on the golden text / audio tokens of step t
        forced = [int(golden["torch_f32_text"][t])] + [int(a) for a in
                                                       golden["torch_f32_audio_raw"][t, :-1]]
        depth = model.depth_decoder(input_ids=torch.tensor([forced]),
                                    last_hidden_state=main.last_hidden_state[:, t : t + 1],
                                    attention_mask=torch.ones(1, dep_q, dtype=torch.long))
        audio_logits.append(depth.logits[0])
    audio_logits = torch.stack(audio_logits)
    results["moshi_text_logits"] = text_logits.numpy()
    results["moshi_audio_logits"] = audio_logits.numpy()
    text = text_logits.argmax(-1).numpy()
    audio = audio_logits.argmax(-1).numpy()
    report["moshi_text_tokens_equal"] = f"{int((text == golden['torch_f32_text']).sum())}/{steps}"
    report["moshi_audio_steps_equal"] = (
        f"{int((audio == golden['torch_f32_audio_raw']).all(axis=1).sum())}/{steps}")
    report["moshi_text_logit_maxabs"] = float(
        np.abs(results["moshi_text_logits"] - golden["torch_f32_text_logits"]).max())
    report["moshi_audio_logit_maxabs"] = float(
        np.abs(results["moshi_audio_logits"] - golden["torch_f32_audio_logits"]).max())
    np.savez(out / "reference.npz", **results)
    print(json.dumps(report, indent=1))


def stt_inputs(text: np.ndarray, codes: np.ndarray, text_card: int, card: int) -> np.ndarray:
    """[steps, 33] input ids of the golden STT run (timing B, FIXTURES.md): step 0 the initial
    tokens (text_card, card on every codebook), step t >= 1 the text token of step t - 1 and
    audio frame t - 1."""
    steps = len(text)
    ids = np.empty((steps, 1 + codes.shape[0]), np.int64)
    ids[0, 0], ids[0, 1:] = text_card, card
    ids[1:, 0] = text[:-1]
    ids[1:, 1:] = codes[:, : steps - 1].T
    return ids


def reference_stt(out: Path, results: dict, report: dict) -> None:
    """transformers' KyutaiSpeechToTextForConditionalGeneration on the derived STT folder,
    on the stored Mimi codes (its own generate() encodes audio with the bundled tiny random
    Mimi, whose codes are not the goldens'): teacher-forced on the golden trajectory (one
    pass), and greedy step by step through its sliding-window cache (its own tokens fed
    back). Tokens are compared as argmax over the text_card real logits; transformers'
    lm_head has one more, a zero row for the initial token, counted separately. The one-pass
    teacher-forced forward attends to the whole past (without a cache its causal mask has no
    sliding window), so it leaves the goldens once the 40-step window is crossed; the cached
    step-by-step run is how its generate() runs."""
    import torch
    from transformers import KyutaiSpeechToTextForConditionalGeneration

    golden = dict(np.load(STT_FIXTURES / "stt_golden.npz"))
    lm = json.loads((STT_FIXTURES / "stt_config.json").read_text())
    text_card, card = lm["text_card"], lm["card"]
    model = KyutaiSpeechToTextForConditionalGeneration.from_pretrained(
        str(out / "stt"), dtype=torch.float32).eval()
    for version in ("v1", "v3"):
        expected = golden[f"torch_f32_B_{version}_text"]
        codes = golden[f"codes_{version}"]
        ids = torch.from_numpy(stt_inputs(expected, codes, text_card, card))[None]
        steps = ids.shape[1]
        logits = model(input_ids=ids, use_cache=False).logits[0]
        forced = logits[:, :text_card].argmax(-1).numpy()
        results[f"stt_{version}_forced_text"] = forced
        forced_diverged = np.flatnonzero(forced != expected)
        entry = {
            "steps": steps,
            "teacher_forced_tokens_equal": f"{int((forced == expected).sum())}/{steps}",
            "teacher_forced_first_divergence":
                int(forced_diverged[0]) if forced_diverged.size else None,
            "teacher_forced_argmax_incl_zero_row_equal":
                f"{int((logits.argmax(-1).numpy() == expected).sum())}/{steps}",
        }
        if version == "v1":
            reference = golden["torch_f32_B_v1_text_logits_first16"]
            entry["teacher_forced_logit_maxabs_first16"] = float(
                np.abs(logits[: len(reference), :text_card].numpy() - reference).max())
        cache, token, greedy, first_logits = None, text_card, [], []
        for t in range(steps):
            audio = [card] * codes.shape[0] if t == 0 else codes[:, t - 1].tolist()
            step_ids = torch.tensor([[[token] + audio]])
            output = model(input_ids=step_ids, cache=cache, use_cache=True)
            cache = output.cache
            token = int(output.logits[0, -1, :text_card].argmax())
            greedy.append(token)
            if t < 16:
                first_logits.append(output.logits[0, -1, :text_card].numpy())
        greedy = np.array(greedy)
        if version == "v1":
            entry["greedy_logit_maxabs_first16"] = float(
                np.abs(np.stack(first_logits) - golden["torch_f32_B_v1_text_logits_first16"]).max())
        results[f"stt_{version}_greedy_text"] = greedy
        diverged = np.flatnonzero(greedy != expected)
        entry["greedy_tokens_equal"] = f"{int((greedy == expected).sum())}/{steps}"
        entry["greedy_first_divergence"] = int(diverged[0]) if diverged.size else None
        report[f"stt_{version}"] = entry
    report["stt_vad"] = "no extra heads in the transformers layout (nothing to compare)"


# ---------------------------------------------------------------------------- verify


def _shard(folder: Path, dest: Path, parts: int) -> None:
    """A sharded copy of a transformers folder: model-0000i-of-0000N.safetensors + index."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "config.json", dest / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({n: tensors[n] for n in chunk}, str(dest / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in chunk})
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def verify(out: Path) -> None:
    import mlx.core as mx
    import rustymimi

    from moshi_mlx.loading.models import load_mimi

    pcm = speech()[None, None]
    report: dict[str, object] = {}
    official = load_mimi(RANDOM_MIMI, num_codebooks=CODEBOOKS)
    codes_official = np.asarray(official.encode(pcm))
    decoded_official = np.asarray(official.decode(mx.array(codes_official)))
    tok = rustymimi.Tokenizer(str(RANDOM_MIMI), num_codebooks=CODEBOOKS)
    rust_codes = tok.encode(pcm).astype(np.int32)
    tok.reset()
    rust_decoded = tok.decode(np.ascontiguousarray(rust_codes.astype(np.uint32)))
    ref = dict(np.load(out / "reference.npz")) if (out / "reference.npz").is_file() else {}
    _shard(out / "mimi", out / "mimi_sharded", 3)
    for label, source in (("folder", out / "mimi"), ("file", out / "mimi" / "model.safetensors"),
                          ("sharded", out / "mimi_sharded")):
        ours = load_mimi(source, num_codebooks=CODEBOOKS)
        codes = np.asarray(ours.encode(pcm))
        decoded = np.asarray(ours.decode(mx.array(codes)))
        state = ours.new_encoder_state()
        stream = np.concatenate([np.asarray(ours.encode_step(mx.array(pcm[..., i : i + FRAME]),
                                                             state))
                                 for i in range(0, pcm.shape[-1], FRAME)], axis=2)
        report[label] = {
            "codes_equal_official_layout": bool((codes == codes_official).all()),
            "decoded_maxabs_vs_official_layout": float(np.abs(decoded - decoded_official).max()),
            "stream_codes_equal_official_layout": bool((stream == codes_official).all()),
            "codes_agreement_rustymimi": float((codes == rust_codes).mean()),
            "decoded_maxabs_vs_rustymimi": float(np.abs(decoded - rust_decoded).max()),
        }
    if ref:
        report["transformers_MimiModel"] = {
            "codes_agreement_official_layout": float(
                (ref["mimi_codes"] == codes_official).mean()),
            "codes_agreement_rustymimi": float((ref["mimi_codes"] == rust_codes).mean()),
            "decoded_maxabs_vs_ours": float(np.abs(
                ref["mimi_decoded"][..., : decoded_official.shape[-1]]
                - np.asarray(official.decode(mx.array(ref["mimi_codes"])))).max()),
        }
    print(json.dumps(report, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["derive", "reference", "verify"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scripts", type=Path, help="folder of the two conversion scripts")
    parser.add_argument("--fixtures", action="store_true",
                        help="derive: write the manifest and config into tests/fixtures")
    parser.add_argument("--skip", action="append", default=[], choices=["mimi", "moshi", "stt"],
                        help="derive: leave this model out (repeatable)")
    args = parser.parse_args()
    if args.step == "derive":
        if args.scripts is None:
            parser.error("derive needs --scripts")
        derive(args.scripts, args.out, args.fixtures, set(args.skip))
    elif args.step == "reference":
        reference(args.out)
    else:
        verify(args.out)


if __name__ == "__main__":
    main()
