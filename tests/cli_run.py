"""Running a command's main() in process: its exit code and what it printed."""

from __future__ import annotations

from collections.abc import Callable


def run_main(main: Callable[[list[str]], int], argv: list[str], capsys
             ) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`; argparse's SystemExit gives its code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
