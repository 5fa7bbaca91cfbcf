"""Saved voices: one context turn each (a speaker, its text and its audio or Mimi codes), kept
in a folder as NAME.json {"speaker": int, "text": str, "codes": "NAME.npy"} (or "audio":
"NAME.wav"), the file beside it. Speaking "in a voice" is speaking as its speaker with the
turn as context. `tts --voice` and the server's `voice` read the same folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from moshi_mlx.errors import MoshiError

if TYPE_CHECKING:
    from moshi_mlx.speech.generate import Segment

# A letter or digit first, then letters, digits, "_", "-", "."; no path separator, never
# hidden, and never a plain number: a number names a speaker id wherever a voice is asked.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_voices_folder() -> Path:
    """`moshi_mlx/voices` under the user's cache ($XDG_CACHE_HOME, else ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "moshi_mlx" / "voices"


def check_voice_name(name: object) -> str:
    """The name, when it may name a voice file (MoshiError saying the rule otherwise)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.isdigit():
        raise MoshiError(f"bad voice name {name!r}: use 1 to 64 letters, digits, '_', '-' or "
                         "'.', starting with a letter or digit, and not only digits")
    return name


def list_voices(folder: Path) -> list[str]:
    """The names of the voices saved in `folder`, sorted (none when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.json")
                  if _NAME.fullmatch(path.stem) and not path.stem.isdigit())


def load_voice(folder: Path, name: str) -> Segment:
    """The turn saved as `name` (MoshiError naming the saved voices when there is none)."""
    from moshi_mlx.speech.context import read_turn

    folder = Path(folder)
    path = folder / f"{check_voice_name(name)}.json"
    if not path.is_file():
        saved = list_voices(folder)
        have = f"saved voices: {', '.join(saved)}" if saved else f"no voice is saved in {folder}"
        raise MoshiError(f"unknown voice {name!r} ({have})")
    try:
        turn = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoshiError(f"{path}: cannot read the voice ({exc})") from None
    return read_turn(turn, folder, f"voice {path}")


def save_voice(folder: Path, name: str, segment: Segment) -> Path:
    """Save `segment` (with its codes or its audio) as voice `name` in `folder` (created when
    missing); an existing voice of that name is replaced. Returns the JSON file's path."""
    from moshi_mlx.audio.codes import save_npy
    from moshi_mlx.audio.io import write_audio

    check_voice_name(name)
    if segment.codes is None and segment.audio is None:
        raise MoshiError(f"voice {name!r} needs audio or codes, not only text")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoshiError(f"{folder}: cannot create the voices folder ({exc})") from None
    turn: dict[str, object] = {"speaker": int(segment.speaker), "text": segment.text}
    if segment.codes is not None:
        turn["codes"] = f"{name}.npy"
        save_npy(folder / f"{name}.npy", segment.codes.astype("int32"))
    else:
        turn["audio"] = f"{name}.wav"
        write_audio(folder / f"{name}.wav", segment.audio)
    path = folder / f"{name}.json"
    try:
        path.write_text(json.dumps(turn, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MoshiError(f"{path}: cannot write ({exc})") from None
    return path
