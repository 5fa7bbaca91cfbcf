"""The prompt options of every Moshi front end (`local`, `local_web`, `serve --moshi`), issue 19:
--text-prompt / --text-prompt-file, --voice-prompt, --save-prompt-state, --prompt-state.

`add_prompt_args` adds them; `prompt_plan` reads and checks everything they name (the text
file, the voice recording, the state file, the output path) into a `PromptPlan` BEFORE the
model loads, so that bad input costs one line and no load; `apply_prompt` applies the plan to
the loaded engine (on the model thread) and prints one line of what ran and how long it took.
The phases themselves are the engine's (`moshi_mlx.conversation.prompts`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.conversation.prompts import MoshiPrompt, voice_frames
from moshi_mlx.errors import MoshiError, PromptError

DEFAULT_STATE_NAME = "prompt-state.safetensors"  # --save-prompt-state given a folder

TEXT_FLAGS = ("--text-prompt", "--text-prompt-file")
PROMPT_FLAGS = (*TEXT_FLAGS, "--voice-prompt")
STATE_FLAGS = ("--save-prompt-state", "--prompt-state")


PROMPT_GROUP = "prompt (run before every conversation: a voice, then a text such as a role)"


def add_prompt_args(parser: argparse.ArgumentParser, title: str = PROMPT_GROUP) -> None:
    g = parser.add_argument_group(title)
    g.add_argument("--text-prompt", default=None, metavar="TEXT",
                   help="a text prompt, e.g. a role (in the model's system tags when it uses "
                        "them)")
    g.add_argument("--text-prompt-file", default=None, metavar="FILE",
                   help="the text prompt from a UTF-8 text file")
    g.add_argument("--voice-prompt", default=None, metavar="WAV",
                   help="a recording of the voice Moshi should speak in (any rate; "
                        "loudness-normalized)")
    g.add_argument("--save-prompt-state", default=None, metavar="FILE",
                   help="after the prompt phases, save the model's state here (safetensors; "
                        f"a folder gets {DEFAULT_STATE_NAME}) for --prompt-state")
    g.add_argument("--prompt-state", default=None, metavar="FILE",
                   help="start from a state saved by --save-prompt-state instead of running "
                        "the prompt phases again")


def given_prompt_flags(args: argparse.Namespace) -> list[str]:
    """The prompt options present on this command line, as spelled there."""
    return [flag for flag in (*PROMPT_FLAGS, *STATE_FLAGS)
            if getattr(args, _dest(flag), None) is not None]


def _dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


@dataclass(frozen=True)
class PromptPlan:
    """What the prompt options ask for, every input read and checked.

    prompt: the phases to run (empty: none).
    state: a saved state to load instead of running phases.
    save: where to save the state after the phases.
    """

    prompt: MoshiPrompt = MoshiPrompt()
    state: Path | None = None
    save: Path | None = None

    @property
    def empty(self) -> bool:
        return self.prompt.empty and self.state is None

    def with_text(self, text: str) -> PromptPlan:
        """This plan's voice with another text prompt (a web client's own), no state file:
        the phases run."""
        return PromptPlan(dataclasses.replace(self.prompt, text=text))

    def apply(self, engine: Any) -> str | None:
        """Put the prompt in `engine` (on its model thread) and save the state when asked;
        the caller resets the engine before a conversation. Returns a line of what ran and how
        long it took; None when the plan is empty."""
        if self.empty:
            return None
        started = time.perf_counter()
        if self.state is not None:
            engine.load_prompt_state(self.state)
            what = f"prompt state loaded from {self.state}"
        else:
            engine.set_prompt(self.prompt)
            what = f"prompt phases ran ({describe_prompt(self.prompt)})"
        line = f"{what} in {time.perf_counter() - started:.2f} s"
        if self.save is not None:
            started = time.perf_counter()
            engine.save_prompt_state(self.save)
            line += f"; state saved to {self.save} in {time.perf_counter() - started:.2f} s"
        return line

    def restore(self, engine: Any) -> str:
        """Put this plan's prompt back after another one (a web client's): from its state file
        when there is one (given or saved: no phases to run), else by running the phases; an
        empty plan clears the prompt."""
        state = self.state or self.save
        if state is not None:
            return PromptPlan(state=state).apply(engine) or ""
        if self.empty:
            engine.set_prompt(MoshiPrompt())
            return "prompt cleared"
        return PromptPlan(self.prompt).apply(engine) or ""


def describe_prompt(prompt: MoshiPrompt) -> str:
    parts = []
    if prompt.voice_pcm is not None:
        parts.append(f"voice {len(prompt.voice_pcm) / SAMPLE_RATE:.1f} s")
    if prompt.voice_codes is not None:
        parts.append(f"voice {np.shape(prompt.voice_codes)[-1]} frames")
    if prompt.text:
        parts.append(f"text {len(prompt.text)} characters")
    return ", ".join(parts) or "empty"


def prompt_plan(args: argparse.Namespace) -> PromptPlan:
    """The prompt options as a checked plan: conflicts, the text file, the voice recording,
    the state file and the output path, each a PromptError line; call it before the model
    loads."""
    _check_conflicts(args)
    save = None
    if args.save_prompt_state is not None:
        from moshi_mlx.cli.outputs import output_file

        try:
            save = output_file(args.save_prompt_state, DEFAULT_STATE_NAME)
        except MoshiError as exc:
            raise PromptError(f"--save-prompt-state: {exc}") from None
    if args.prompt_state is not None:
        return PromptPlan(state=_checked_state(args.prompt_state))
    text = _text_prompt(args)
    voice = None if args.voice_prompt is None else read_voice_prompt(args.voice_prompt)
    return PromptPlan(MoshiPrompt(text=text, voice_pcm=voice), save=save)


def _check_conflicts(args: argparse.Namespace) -> None:
    if args.text_prompt is not None and args.text_prompt_file is not None:
        raise PromptError("give --text-prompt or --text-prompt-file, not both")
    prompts = [flag for flag in PROMPT_FLAGS if getattr(args, _dest(flag)) is not None]
    if args.prompt_state is not None and prompts:
        raise PromptError(f"--prompt-state replaces the prompt phases: drop {' and '.join(prompts)}"
                          " (or drop --prompt-state to run them)")
    if args.prompt_state is not None and args.save_prompt_state is not None:
        raise PromptError("--save-prompt-state with --prompt-state: that state is saved already")
    if args.save_prompt_state is not None and not prompts:
        raise PromptError(f"--save-prompt-state needs a prompt to save: {', '.join(PROMPT_FLAGS)}")


def _text_prompt(args: argparse.Namespace) -> str | None:
    if args.text_prompt is not None:
        text = args.text_prompt.strip()
        if not text:
            raise PromptError("--text-prompt is empty")
        return text
    if args.text_prompt_file is None:
        return None
    path = Path(args.text_prompt_file).expanduser()
    if path.is_dir():
        raise PromptError(f"--text-prompt-file {path} is a folder, not a text file")
    if not path.is_file():
        raise PromptError(f"--text-prompt-file {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise PromptError(f"--text-prompt-file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise PromptError(f"--text-prompt-file {path}: cannot read ({exc.strerror or exc})"
                          ) from None
    if not text:
        raise PromptError(f"--text-prompt-file {path} is empty")
    return text


def read_voice_prompt(given: str) -> np.ndarray:
    """A voice prompt recording as 24 kHz mono float32 (any rate and channels in); not audio,
    empty or silent: a PromptError line."""
    from moshi_mlx.audio.io import read_audio

    path = Path(given).expanduser()
    try:
        pcm = read_audio(path)
    except MoshiError as exc:
        raise PromptError(f"--voice-prompt {exc}") from None
    if pcm.size == 0:
        raise PromptError(f"--voice-prompt {path}: the audio file holds no samples")
    try:
        voice_frames(pcm)  # the phases' own checks (length, loudness gate), before the load
    except PromptError as exc:
        raise PromptError(f"--voice-prompt {path}: {exc}") from None
    return pcm


def _checked_state(given: str) -> Path:
    from moshi_mlx.loading.safetensors import read_safetensors_header

    path = Path(given).expanduser()
    try:
        read_safetensors_header(path)
    except MoshiError as exc:
        raise PromptError(f"--prompt-state {exc}") from None
    return path


def apply_prompt(engine: Any, plan: PromptPlan) -> Any:
    """`plan.apply(engine)` with its line on stderr, then a reset (the conversation starts
    from the prompted state, whichever way it came); returns the engine (for load lambdas)."""
    line = plan.apply(engine)
    if line:
        engine.reset()
        print(line, file=sys.stderr, flush=True)
    return engine
