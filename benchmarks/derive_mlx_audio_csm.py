"""The CSM fixture in mlx-audio's own layout (mlx-community's `csm-1b` format): a per-tensor
manifest of the parameters mlx-audio 0.6.2's Sesame model holds after loading
tests/fixtures/csm/sesame through its own `sanitize`, as its converter saves them. Run once
with mlx-audio's interpreter (its own venv; never imported by moshi_mlx); tests/test_csm.py
checks its mlx-audio-layout copy of the fixture against the manifest it writes.

    /path/to/mlx-audio-venv/bin/python benchmarks/derive_mlx_audio_csm.py \
        tests/fixtures/csm/mlx_audio_model.manifest.json [MIMI.safetensors]
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from mlxaudio_csm_worker import fixture_config  # noqa: E402


def main() -> None:
    import mlx_audio.codec.models.mimi.mimi as mimi_module
    import mlx_audio.tts.models.sesame.sesame as sesame

    # its Mimi download, pointed at a random real-size Mimi (only built, never used here)
    mimi = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "tests" / ".cache" /
                                                     "mimi_random_v2.safetensors")
    mimi_module.hf_hub_download = lambda repo_id, filename, **kw: mimi

    folder = ROOT / "tests" / "fixtures" / "csm" / "sesame"
    # its tokenizer download, pointed at the fixture's tokenizer (as the benchmark worker does)
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="mlxaudio-tokenizer-"))
    (tokenizer_dir / "tokenizer.json").write_bytes((folder.parent / "tokenizer.json").read_bytes())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    sesame.TOKENIZER_REPO = str(tokenizer_dir)
    config = fixture_config(json.loads((folder / "config.json").read_text()),
                            json.loads((folder / "flavors.json").read_text()))
    model = sesame.Model(config)
    model.load_weights(list(model.sanitize(mx.load(str(folder / "model.safetensors"))).items()),
                       strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        # the CSM's own tensors ("model." + ...): the codec is Mimi's, not the checkpoint's
        mx.save_safetensors(str(path), {k: v for k, v in tree_flatten(model.parameters())
                                        if k.startswith("model.")})
        data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    tensors = {}
    for name in sorted(header):
        entry = header[name]
        start, end = (8 + header_len + offset for offset in entry["data_offsets"])
        tensors[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                         "sha256": hashlib.sha256(data[start:end]).hexdigest()}
    manifest = {"source": f"mlx-audio {version('mlx-audio')} Sesame model loaded from "
                          "fixtures/csm/sesame through its sanitize, parameters saved with "
                          "mx.save_safetensors", "tensors": tensors}
    Path(sys.argv[1]).write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(tensors)} tensors -> {sys.argv[1]}")


if __name__ == "__main__":
    main()
