"""The loader may import the models, never the other way round: `moshi_mlx.models` and
`moshi_mlx.modules` hold architectures and other people's layouts, and read no files."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "modules")
LOADER = "moshi_mlx.loading"


def _module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / "moshi_mlx" / package).glob("*.py")):
            stem = "" if path.stem == "__init__" else f".{path.stem}"
            names.append(f"moshi_mlx.{package}{stem}")
    return names


def _imported_names(path: Path) -> list[str]:
    """Every module an `import` statement in the file names, at any depth (inside functions
    too, where an import would hide a dependency until the function runs)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_models_and_modules_import_no_loader_module_at_run_time():
    modules = _module_names()
    assert "moshi_mlx.models.lm" in modules and "moshi_mlx.modules.norm" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('moshi_mlx'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=True)
    imported = json.loads(result.stdout.splitlines()[-1])
    assert set(modules) <= set(imported)
    assert [name for name in imported if name.startswith(LOADER)] == []


def test_no_import_statement_in_models_or_modules_names_the_loader():
    offending = {}
    for package in PACKAGES:
        for path in sorted((ROOT / "moshi_mlx" / package).glob("*.py")):
            found = [name for name in _imported_names(path)
                     if name == LOADER or name.startswith(LOADER + ".")]
            if found:
                offending[str(path.relative_to(ROOT))] = found
    assert offending == {}


# Rooms by kind, lowest first: a module may import its own room and the rooms below it, never
# one above (README "Layout"). audio/ (the clock, files, devices) and errors are leaves that
# every room may use; cli/ and web/ are the front ends the entry points stand on.
LAYERS = (
    {"errors", "audio"},
    {"modules"},
    {"models"},
    {"loading"},
    {"conversation", "transcription", "speech", "training"},
    {"cli", "web"},
    {"entry"},
)
ENTRY_POINTS = {"local", "local_web", "stt", "tts", "mimi", "run_inference", "serve",
                "text"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moshi_mlx" or len(parts) < 2:
        return None
    return "entry" if parts[1] in ENTRY_POINTS else parts[1]


def _layer(room: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room in rooms)


def test_rooms_import_only_their_own_layer_and_those_below():
    upward = {}
    for path in sorted((ROOT / "moshi_mlx").rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name == "moshi_mlx":
            continue  # the public API names every room, lazily
        source = _room(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in _imported_names(path):
            target = _room(name)
            if target is None and name == "moshi_mlx":
                target = "the package root"
            if target == "the package root":
                upward.setdefault(str(path.relative_to(ROOT)), []).append(name)
            elif target is not None and _layer(target) > _layer(source):
                upward.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert upward == {}
