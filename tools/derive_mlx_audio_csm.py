"""The CSM fixture in mlx-audio's own layout (mlx-community's `csm-1b` format): a per-tensor
manifest of the parameters mlx-audio 0.6.2's Sesame model holds after loading
tests/fixtures/csm/sesame through its own `sanitize`, as its converter saves them. Run once
with mlx-audio's interpreter (its own venv; never imported by moshi_mlx); tests/test_csm.py
checks its mlx-audio-layout copy of the fixture against the manifest it writes.

    /path/to/mlx-audio-venv/bin/python tools/derive_mlx_audio_csm.py \
        tests/fixtures/csm/mlx_audio_model.manifest.json [MIMI.safetensors]
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from derive_transformers_layouts import manifest  # noqa: E402
from mlxaudio_csm_worker import fixture_config, use_local_downloads  # noqa: E402


def main() -> None:
    import mlx_audio.tts.models.sesame.sesame as sesame

    folder = ROOT / "tests" / "fixtures" / "csm" / "sesame"
    # Mimi is only built, never used here: a random real-size one will do
    mimi = sys.argv[2] if len(sys.argv) > 2 else ROOT / "tests" / ".cache" / \
        "mimi_random_v2.safetensors"
    use_local_downloads(folder.parent / "tokenizer.json", mimi)
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
        tensors = manifest(path)
    record = {"source": f"mlx-audio {version('mlx-audio')} Sesame model loaded from "
                        "fixtures/csm/sesame through its sanitize, parameters saved with "
                        "mx.save_safetensors", "tensors": tensors}
    Path(sys.argv[1]).write_text(json.dumps(record, indent=1) + "\n")
    print(f"{len(tensors)} tensors -> {sys.argv[1]}")


if __name__ == "__main__":
    main()
