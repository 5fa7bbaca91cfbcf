"""Where a PersonaPlex saved voice comes from (`--voice-prompt`): a .pt file, or one member
of NVIDIA's voices.tgz read straight from the archive (nothing is unpacked to disk).

Spellings: `NATF0.pt`; `voices.tgz:NATF0` (or `voices.tgz:NATF0.pt`, or the member's full
name `voices.tgz:voices/NATF0.pt`); `voices.tgz/NATF0.pt` (a path through the archive). Any
other path is not a saved voice (a recording: the caller reads it as audio).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.torch_pickle import read_personaplex_voice

VOICE_SUFFIX = ".pt"
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar")
SHOWN_NAMES = 8  # voices listed in a "no such voice" message


def archive_member(spec: str) -> tuple[Path, str] | None:
    """(archive, member name as given, "" when none) for a spelling that names a voice in a tar
    archive; None for any other path."""
    head, colon, tail = spec.rpartition(":")
    if colon and head.lower().endswith(ARCHIVE_SUFFIXES):
        return Path(head).expanduser(), tail
    path = Path(spec).expanduser()
    if spec.lower().endswith(ARCHIVE_SUFFIXES):
        return path, ""
    for parent in path.parents:
        if str(parent).lower().endswith(ARCHIVE_SUFFIXES) and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def is_saved_voice(spec: str) -> bool:
    """Whether `--voice-prompt spec` names a saved voice (a .pt, or a voice in an archive)."""
    return spec.lower().endswith(VOICE_SUFFIX) or archive_member(spec) is not None


def read_saved_voice(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(embeddings [N-1, dim], cache [17, C], its name) of the saved voice `spec` names
    (see `is_saved_voice`); WeightsError (one line) when it cannot be read."""
    member = archive_member(spec)
    if member is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: no such saved voice (.pt) file")
        embeddings, cache = read_personaplex_voice(path)
        return embeddings, cache, path.name
    archive, name = member
    data, found = _archive_voice(archive, name)
    embeddings, cache = read_personaplex_voice(io.BytesIO(data), found)
    return embeddings, cache, Path(found).name


def _archive_voice(archive: Path, name: str) -> tuple[bytes, str]:
    """The bytes and full member name of the voice `name` in the tar `archive`."""
    if not archive.is_file():
        raise WeightsError(f"{archive}: no such voices archive")
    try:
        with tarfile.open(archive, "r:*") as tar:
            voices = [m for m in tar.getmembers() if m.isfile()
                      and m.name.endswith(VOICE_SUFFIX) and not Path(m.name).name.startswith(".")]
            wanted = [m for m in voices if name in (m.name, Path(m.name).name,
                                                    Path(m.name).stem)]
            if not name or not wanted:
                names = sorted(Path(m.name).stem for m in voices)
                shown = ", ".join(names[:SHOWN_NAMES]) + (
                    f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else "")
                what = "name a voice in it" if not name else f"it holds no voice {name!r}"
                raise WeightsError(f"{archive}: {what} ({archive.name}:NAME; voices: "
                                   f"{shown or 'none'})")
            handle = tar.extractfile(wanted[0])
            if handle is None:
                raise WeightsError(f"{archive}: cannot read {wanted[0].name}")
            return handle.read(), wanted[0].name
    except (tarfile.TarError, EOFError):
        raise WeightsError(f"{archive} is not a readable tar archive") from None
    except OSError as exc:  # (a damaged gzip stream too)
        reason = " ".join(str(exc.strerror or exc).split())
        raise WeightsError(f"cannot read {archive}: {reason}") from None
