"""Transformers-layout copies of our fixtures, made by transformers' own conversion scripts, and
the checks that our loaders read them as they read the official layouts.

Three steps, in two environments (the package never imports transformers or torch):

1. derive (a venv with CPU torch + transformers + safetensors + numpy, e.g. /work/trfs-venv):

       python benchmarks/derive_transformers_layouts.py derive --scripts DIR --out OUT

   DIR holds the two conversion scripts of the transformers repository (they are not in the
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
   With --fixtures it also writes tests/fixtures/lm_transformers.manifest.json (dtype, shape,
   sha256 of every tensor) and lm_transformers_config.json: the tests rebuild the file from
   lm_pytorch.safetensors with their own code and check it against this manifest.

2. reference (same venv): transformers' own MimiModel and MoshiForConditionalGeneration run on
   the derived folders: OUT/reference.npz (Mimi codes and decoded audio of the test speech;
   Moshi's teacher-forced greedy tokens and logits on the golden trajectory) and the agreement
   of Moshi with tests/fixtures/lm_golden.npz.

3. verify (our venv, with MLX and rustymimi):

       PYTHONPATH=$PWD python benchmarks/derive_transformers_layouts.py verify --out OUT

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


def derive(scripts: Path, out: Path, write_fixtures: bool, skip_mimi: bool) -> None:
    import torch
    from transformers import MimiConfig, MimiModel

    out.mkdir(parents=True, exist_ok=True)
    mimi_script = _load_script(scripts / "convert_mimi_checkpoint_to_pytorch.py")
    moshi_script = _load_script(scripts / "convert_moshi_transformers.py")

    if not skip_mimi:
        if not RANDOM_MIMI.is_file():
            sys.exit(f"{RANDOM_MIMI} missing: run tests/test_mimi.py once (it generates it)")
        derive_mimi(mimi_script, out / "mimi")

    # Values keyed by the names MimiModel saves (its checkpoint layout), read back strictly.
    from safetensors import safe_open
    from safetensors.torch import save_file

    tiny_dir = out / "tiny_mimi"
    MimiModel(MimiConfig(**TINY_MIMI)).save_pretrained(str(tiny_dir))
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    save_file({name: torch.from_numpy(tiny_mimi_value(name, shape))
               for name, shape in shapes.items()}, str(tiny_dir / "model.safetensors"),
              metadata={"format": "pt"})
    tiny, info = MimiModel.from_pretrained(str(tiny_dir), output_loading_info=True)
    assert not any(info.values()), info
    tiny.save_pretrained(str(tiny_dir))
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
    print(f"derived into {out}")


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

    from moshi_mlx.models.mimi import load_mimi

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
        ours.reset()
        stream = np.concatenate([np.asarray(ours.encode_step(mx.array(pcm[..., i : i + FRAME])))
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
    parser.add_argument("--skip-mimi", action="store_true", help="derive: only the tiny Moshi")
    args = parser.parse_args()
    if args.step == "derive":
        if args.scripts is None:
            parser.error("derive needs --scripts")
        derive(args.scripts, args.out, args.fixtures, args.skip_mimi)
    elif args.step == "reference":
        reference(args.out)
    else:
        verify(args.out)


if __name__ == "__main__":
    main()
