"""Where a command writes: the one rule for output paths of every command.

A path that ends in `/` (or names an existing folder) is a folder: it is created when missing
and the file inside it gets the command's default name. Any other path is a file, whose folder
must exist. Either way the answer comes before a model loads, not after.
"""

from __future__ import annotations

import os
from pathlib import Path

from moshi_mlx.errors import MoshiError


def names_folder(given: str | os.PathLike) -> bool:
    """Whether an output path means a folder: it ends in a separator or is an existing folder.
    (`Path` drops a trailing `/`, so this must see the text as the user typed it.)"""
    text = os.fspath(given)
    return text.endswith(("/", os.sep)) or Path(text).expanduser().is_dir()


def output_folder(given: str | os.PathLike) -> Path:
    """The folder `given` names, created (with its parents) when missing."""
    folder = Path(given).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MoshiError(f"cannot write into {folder}: it is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoshiError(f"cannot create folder {folder}: {exc.strerror or exc}") from None
    return folder


def output_file(given: str | os.PathLike, default_name: str) -> Path:
    """The file to write for an output option: `given` itself, or `given/default_name` when
    `given` names a folder (see `names_folder`; created when missing). Checked writable."""
    if names_folder(given):
        path = output_folder(given) / default_name
    else:
        path = Path(given).expanduser()
    check_writable(path)
    return path


def check_writable(path: Path) -> None:
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise MoshiError(f"cannot write {path}: no such folder {folder}")
    if path.is_dir():
        raise MoshiError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK):
        raise MoshiError(f"cannot write {path}: permission denied")
