"""Find weight files: a local path, a local model folder, or a Hugging Face repo (cached)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import WeightsError


def resolve_file(path_or_repo: str | os.PathLike, filename: str | None = None) -> Path:
    """Return a local path for `path_or_repo`.

    - an existing file: returned as is (`filename` is ignored);
    - an existing directory: `directory / filename`;
    - otherwise a Hugging Face repo id ("owner/name"): `filename` from that repo, through the
      huggingface_hub cache (offline use works when the file is cached).
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
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo, filename))
    # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: first.
    except LocalEntryNotFoundError:
        raise WeightsError(
            f"{filename} from {repo} is not in the local cache and cannot be downloaded "
            "(offline?); pass a local file instead"
        ) from None
    except EntryNotFoundError:
        raise WeightsError(f"{filename} is not in the Hugging Face repo {repo}") from None
    except HFValidationError:
        raise WeightsError(f"{repo}: no such file or folder, and not a valid repo id") from None
    except RepositoryNotFoundError:
        raise WeightsError(f"Hugging Face repo {repo} not found (or not accessible)") from None
    except OSError as exc:
        raise WeightsError(f"cannot fetch {filename} from {repo}: {exc}") from None
