"""Where model files are found: the one table of the file names every family shares (a
family's own, such as Moshi's tokenizer or Mimi's file, are in its declaration:
moshi_mlx.loading.families.FamilyFiles) and the one file / folder / repo and `-q` policy, for
every model family and every command (moshi_mlx.loading.resolve puts them together).

A weights argument is a local file, a local model folder, or a Hugging Face repo id (through
the huggingface_hub cache, so offline use works once a file is cached). When the hub cannot be
reached and a file is not cached, the error comes at once (no retries) and names the repo,
the file and what to pass instead.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import urllib.request
from pathlib import Path

from moshi_mlx.errors import WeightsError

# ---------------------------------------------------------------------------- file names

CONFIG_NAME = "config.json"
# LM weights by quantization (None = bf16), in official repos and in our converter's folders.
MODEL_FILES: dict[int | None, str] = {
    None: "model.safetensors",
    8: "model.q8.safetensors",
    4: "model.q4.safetensors",
}
TOKENIZER_JSON_NAME = "tokenizer.json"  # a Hugging Face tokenizer (CSM's Llama-3 one)
MANIFEST_NAME = "manifest.json"
# A codec that weights_convert took out of a checkpoint bundling it (transformers layout).
EXTRACTED_CODEC_NAME = "mimi.safetensors"
# config.json keys naming a model folder's files (official STT configs, our converter's), and
# describing its codec when that is not Mimi as released (transformers' own key).
WEIGHTS_NAME_KEY = "moshi_name"
TOKENIZER_NAME_KEY = "tokenizer_name"
CODEC_NAME_KEY = "mimi_name"
CODEC_CONFIG_KEY = "codec_config"
# transformers checkpoints (save_pretrained): one file, or shards listed by an index.
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"
# Family-specific default names (Moshi's tokenizer, Mimi's file) are in each family's
# declaration (moshi_mlx.loading.families.FamilyFiles).

# Official repos name their quantization: kyutai/moshiko-mlx-q4, ...-q8, ...-bf16.
_REPO_SUFFIXES: dict[int | None, str] = {4: "-q4", 8: "-q8", None: "-bf16"}
HUB_PROBE_SECONDS = 2.0


def quantize_flag(bits: int | None) -> str:
    return "no -q" if bits is None else f"-q {bits}"


def check_repo_name(repo: str, quantize: int | None) -> None:
    """An official repo whose name states another quantization than -q is a clear error."""
    name = repo.rsplit("/", 1)[-1].lower()
    for bits, suffix in _REPO_SUFFIXES.items():
        if name.endswith(suffix) and bits != quantize:
            raise WeightsError(f"{repo} holds {MODEL_FILES[bits]}: use {quantize_flag(bits)} "
                               f"(got {quantize_flag(quantize)})")


def model_file(weights: str | os.PathLike, quantize: int | None) -> Path:
    """The LM weight file that `weights` (file, folder or repo id) and `-q` designate.

    - a file is taken as it is (its bits are checked against -q when it is read);
    - a folder must hold the file -q names; where it does not, a folder with exactly one
      weight file takes it when that file can serve -q (a bf16 file can be quantized on load;
      a quantized file only serves its own -q or no -q);
    - a repo id gives the file -q names, else (with -q) its bf16 model.safetensors, which is
      quantized on load; an official repo whose name states other bits is refused before
      anything is downloaded.
    """
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    wanted = MODEL_FILES[quantize]
    if path.is_dir():
        if (path / wanted).is_file():
            return path / wanted
        present = [bits for bits, name in MODEL_FILES.items() if (path / name).is_file()]
        if not present:
            names = ", ".join(MODEL_FILES.values())
            raise WeightsError(f"{path} holds no model weights (expected one of {names})")
        if len(present) == 1 and (present[0] is None or quantize is None):
            return path / MODEL_FILES[present[0]]
        have = ", ".join(MODEL_FILES[bits] for bits in present)
        raise WeightsError(f"{path} has {have}, not {wanted} ({quantize_flag(quantize)}); "
                           "fix -q")
    check_repo_name(str(weights), quantize)
    try:
        return resolve_file(weights, wanted)
    except WeightsError:
        # Repos with bf16 weights only (Kyutai's STT and PyTorch repos, Sesame's CSM): -q
        # quantizes their model.safetensors while loading.
        plain = optional_file(weights, MODEL_FILES[None]) if quantize is not None else None
        if plain is None:
            raise
        return plain


def transformers_weight_files(path_or_repo: str | os.PathLike) -> list[Path] | None:
    """The weight files of a transformers checkpoint folder or repo: model.safetensors, or
    the shards its model.safetensors.index.json lists (in order); None when it has neither."""
    single = optional_file(path_or_repo, TRANSFORMERS_WEIGHTS)
    if single is not None:
        return [single]
    index = optional_file(path_or_repo, TRANSFORMERS_INDEX)
    if index is None:
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise WeightsError(f"{index} is not a valid safetensors index") from None
    return [resolve_file(path_or_repo, shard) for shard in shards]


def mimi_files(path_or_repo: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """Mimi's weight file(s) and the config.json that describes them, if any.

    A file is taken as it is (with a config.json beside it). A folder or repo gives the
    official file (tokenizer-e351c8d8-checkpoint125.safetensors) when it has one, else (a local
    folder) the file its config.json names as `mimi_name`, else a transformers checkpoint:
    model.safetensors or its shards, with config.json (kyutai/mimi; a transformers Moshi
    checkpoint bundles its Mimi the same way)."""
    from moshi_mlx.loading.families import files_of

    path = Path(path_or_repo).expanduser()
    if path.is_file():
        beside = path.parent / CONFIG_NAME
        return [path], beside if beside.is_file() else None
    official = files_of("mimi").weight_names()[None]
    if (path.is_dir() and not (path / official).is_file()
            and (named := _named_in_folder(path, CODEC_NAME_KEY)) is not None):
        return [named], path / CONFIG_NAME
    try:
        return [resolve_file(path_or_repo, official)], None
    except WeightsError as official_error:
        files = transformers_weight_files(path_or_repo)
        if files is None:
            raise WeightsError(f"{official_error} (nor a transformers {TRANSFORMERS_WEIGHTS})"
                               ) from None
    return files, optional_file(path_or_repo, CONFIG_NAME)


def _named_in_folder(folder: Path, key: str) -> Path | None:
    """The file a folder's config.json names under `key`, when it is in the folder."""
    config = folder / CONFIG_NAME
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return folder / name if isinstance(name, str) and (folder / name).is_file() else None


def model_files(weights: str | os.PathLike, quantize: int | None) -> list[Path]:
    """[`model_file`], or else the shards of a transformers checkpoint (a folder or repo with
    model.safetensors.index.json; bf16, which -q quantizes while loading)."""
    try:
        return [model_file(weights, quantize)]
    except WeightsError:
        if Path(weights).expanduser().is_file():
            raise
        files = (transformers_weight_files(weights)
                 if optional_file(weights, TRANSFORMERS_INDEX) is not None else None)
        if not files:
            raise
        return files


def cached_repo(path: str | os.PathLike) -> str | None:
    """The repo id whose huggingface_hub cache folder holds `path` (".../models--owner--name/
    snapshots/..."), or None."""
    for part in Path(path).parts:
        if part.startswith("models--") and part.count("--") == 2:
            return part[len("models--"):].replace("--", "/")
    return None


def optional_file(path_or_repo: str | os.PathLike, filename: str) -> Path | None:
    """`filename` from a folder or repo when it has one (or can have it now), else None."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return None
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    try:
        return resolve_file(path_or_repo, filename)
    except WeightsError:  # not in the repo, or offline and not cached: go without it
        return None


def resolve_file(path_or_repo: str | os.PathLike, filename: str | None = None) -> Path:
    """Return a local path for `path_or_repo`.

    - an existing file: returned as is (`filename` is ignored);
    - an existing directory: `directory / filename`;
    - otherwise a Hugging Face repo id ("owner/name"): `filename` from that repo, through the
      huggingface_hub cache.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if filename is None:
            raise WeightsError(f"{path} is a folder; name the file to use in it")
        candidate = path / filename
        if not candidate.is_file():
            raise WeightsError(f"{candidate} not found")
        return candidate
    repo = str(path_or_repo)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise WeightsError(f"{repo}: no such file or folder, and not a Hugging Face repo id")
    if filename is None:
        raise WeightsError(f"{repo} is a repo id; name the file to fetch from it")
    return _hub_download(repo, filename)


def _hub_download(repo: str, filename: str) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    offline_hint = (f"{filename} of {repo} is not in the local Hugging Face cache and the hub "
                    "cannot be reached{why}; pass a local file or folder instead")
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: download below
    except HFValidationError:
        raise WeightsError(f"{repo}: no such file or folder, and not a valid repo id") from None
    if constants.HF_HUB_OFFLINE:
        raise WeightsError(offline_hint.format(why=" (HF_HUB_OFFLINE is set)"))
    if not hub_reachable(constants.ENDPOINT):
        raise WeightsError(offline_hint.format(why=" (offline?)"))
    try:
        return Path(hf_hub_download(repo, filename))
    # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: first.
    except LocalEntryNotFoundError:
        raise WeightsError(offline_hint.format(why="")) from None
    except EntryNotFoundError:
        raise WeightsError(f"{filename} is not in the Hugging Face repo {repo}") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"Hugging Face repo {repo} not found (or not accessible)") from None
    except OSError as exc:
        raise WeightsError(f"cannot fetch {filename} from {repo}: {exc}") from None


@functools.lru_cache(maxsize=4)
def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One HEAD request to the hub (honouring proxy settings), given at most `timeout`
    seconds including name resolution: huggingface_hub itself retries for ~20 s."""
    answered = threading.Event()

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                                   timeout=timeout)
            answered.set()
        except urllib.error.HTTPError:
            answered.set()  # the server answered, even if not with 200
        except Exception:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answered.is_set()
