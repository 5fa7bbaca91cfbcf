"""The README's examples as data: its command lines and Python blocks, and a Hugging Face cache
that holds the test fixtures under the official repo names, so that the examples run as
written (tests/test_readme.py)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Our commands; other programs in the README (pip, Kyutai's client) are not ours to run.
OURS = re.compile(r"^python -m (moshi_mlx\.\w+|weights_convert)\b")


@dataclass(frozen=True)
class Command:
    module: str  # "moshi_mlx.stt", "weights_convert"
    argv: list[str]
    line: str  # as written, for messages


def blocks(language: str, path: Path = README) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == language]


def commands(path: Path = README) -> list[Command]:
    """Every `python -m ...` line of our own commands in the README's bash blocks (line
    continuations joined, comments dropped), in README order."""
    found: list[Command] = []
    for block in blocks("bash", path):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s*&&\s*", line):
                words = shlex.split(part, comments=True)
                text = shlex.join(words)
                match = OURS.match(text)
                if match:
                    found.append(Command(match.group(1), words[3:], part.strip()))
    return found


# ------------------------------------------------------------------------ a fixture hub cache

REVISION = "0" * 40


def add_repo(cache: Path, repo: str, files: dict[str, Path]) -> None:
    """`repo` in huggingface_hub's cache layout (refs/main -> a snapshot whose files link to
    `files`), as `hf_hub_download` finds it offline."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(REVISION)
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        link = snapshot / name
        if not link.exists():
            link.symlink_to(Path(source).resolve())
