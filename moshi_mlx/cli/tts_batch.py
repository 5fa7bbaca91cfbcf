"""`python -m moshi_mlx.tts --batch requests.jsonl -o OUTDIR/`: many utterances, generated
speech.defaults.BATCH_SIZE at a time in one CSM batch (moshi_mlx.speech.batch).

One JSON object a line: `text` (required), `speaker` (default --speaker), `context` (a list of
turns as in a --context file, paths relative to the JSONL file), `out` (the file name, without
folder; default `lineN`), `max_frames` (default --max-frames / --max-seconds). Blank lines are
skipped. A line that cannot run (not JSON, no `text`, a bad value, too long) is reported with
its line number and the others still run; the exit status is then 1 (0 when every line ran).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moshi_mlx.audio.rates import FRAME_RATE
from moshi_mlx.errors import MoshiError
from moshi_mlx.speech import defaults
from moshi_mlx.speech.context import as_int, read_turn

LINE_KEYS = {"text", "speaker", "context", "out", "max_frames"}
OUT_SUFFIXES = (".wav", ".npy")


@dataclass
class BatchLine:
    number: int
    name: str
    text: str
    speaker: int
    context: list
    max_frames: int | None


def read_batch_file(path: Path, speaker: int, max_frames: int | None
                    ) -> tuple[list[BatchLine], list[str]]:
    """(lines that parse, one error message per line that does not)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MoshiError(f"{path}: cannot read the batch file ({exc})") from None
    lines: list[BatchLine] = []
    errors: list[str] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = parse_line(raw, number, path.parent, speaker, max_frames)
            if line.name in names:
                raise MoshiError(f"out {line.name!r} is already used by an earlier line")
            names.add(line.name)
            lines.append(line)
        except MoshiError as exc:
            errors.append(f"{path} line {number}: {exc}")
    return lines, errors


def parse_line(raw: str, number: int, folder: Path, speaker: int, max_frames: int | None
               ) -> BatchLine:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MoshiError(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(item, dict):
        raise MoshiError("expected a JSON object")
    if "text" not in item:
        raise MoshiError("no 'text'")
    unknown = set(item) - LINE_KEYS
    if unknown:
        raise MoshiError(f"unknown keys {sorted(unknown)} (known: {sorted(LINE_KEYS)})")
    if not isinstance(item["text"], str) or not item["text"].strip():
        raise MoshiError("'text' must be a non-empty string")
    if "speaker" in item:
        speaker = as_int(item["speaker"], "speaker")
    turns = item.get("context", [])
    if not isinstance(turns, list):
        raise MoshiError("'context' must be a list of turns")
    context = [read_turn(turn, folder, f"context turn {i}") for i, turn in enumerate(turns)]
    if "max_frames" in item:
        max_frames = item["max_frames"]
        if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
            raise MoshiError(f"'max_frames' must be a positive int, got {max_frames!r}")
    return BatchLine(number, out_name(item.get("out"), number), item["text"], speaker, context,
                     max_frames)


def out_name(given: object, number: int) -> str:
    """The file name stem of a line's outputs (its .wav / .npy suffix dropped)."""
    if given is None:
        return f"line{number}"
    if not isinstance(given, str) or not given.strip() or given in (".", "..") \
            or "/" in given or "\\" in given:
        raise MoshiError(f"'out' must be a file name without folders, got {given!r}")
    for suffix in OUT_SUFFIXES:
        if given.endswith(suffix) and len(given) > len(suffix):
            return given[: -len(suffix)]
    return given


def run_batch(args, sampling, seed: int | None, stop, max_frames: int | None,
              load: Callable[[bool], tuple]) -> int:
    """The --batch command; `load(needs_mimi)` -> (model, tokenizer, mimi or None)."""
    from moshi_mlx.cli.outputs import output_folder

    if args.text is not None:
        raise MoshiError("--batch reads the texts from its file: give no text argument")
    if args.play or args.stream:
        raise MoshiError("--play and --stream speak one text: not with --batch")
    if args.context or args.context_audio or args.context_text:
        raise MoshiError("--context / --context-audio apply to one text: give each batch line "
                         "its own 'context'")
    if args.output is None and args.codes_out is None:
        raise MoshiError("nothing to do: give -o OUTDIR/ and/or --codes-out OUTDIR/")
    batch_size = defaults.BATCH_SIZE if args.batch_size is None else args.batch_size
    if batch_size < 1:
        raise MoshiError(f"--batch-size must be >= 1, got {batch_size}")
    wav_dir = output_folder(args.output) if args.output is not None else None
    codes_dir = output_folder(args.codes_out) if args.codes_out is not None else None
    speaker = defaults.SPEAKER if args.speaker is None else as_int(args.speaker, "--speaker")
    lines, errors = read_batch_file(args.batch, speaker, max_frames)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    needs_mimi = wav_dir is not None or any(turn.audio is not None for line in lines
                                            for turn in line.context)
    model, tokenizer, mimi = load(needs_mimi) if lines else (None, None, None)
    runner = _Runner(args.batch, model, tokenizer, mimi, sampling, seed, stop, wav_dir,
                     codes_dir, not args.no_watermark, total=len(lines))
    started = time.perf_counter()
    prepared = runner.prepare(lines)
    for first in range(0, len(prepared), batch_size):
        runner.run(prepared[first : first + batch_size])
    failed = len(errors) + runner.failed
    print(f"done: {runner.done} of {len(lines) + len(errors)} requests, {runner.frames} frames "
          f"({runner.frames / FRAME_RATE:.2f} s of audio) in {time.perf_counter() - started:.1f} s"
          + (f"; {failed} lines failed" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


class _Runner:
    def __init__(self, path: Path, model, tokenizer, mimi, sampling, seed, stop,
                 wav_dir: Path | None, codes_dir: Path | None, watermark: bool,
                 total: int) -> None:
        self.path, self.model, self.tokenizer, self.mimi = path, model, tokenizer, mimi
        self.sampling, self.seed, self.stop = sampling, seed, stop
        self.wav_dir, self.codes_dir, self.watermark = wav_dir, codes_dir, watermark
        self.total, self.done, self.failed, self.frames = total, 0, 0, 0

    def prepare(self, lines: list[BatchLine]) -> list[tuple[BatchLine, object]]:
        """Each line's prompt and stop policy; a line that cannot run is reported alone."""
        from moshi_mlx.speech.batch import SpeechRequest, prepare

        prepared = []
        for line in lines:
            try:
                request = SpeechRequest(line.text, line.speaker, line.context, line.max_frames)
                prepared.append((line, prepare(self.model, self.tokenizer, request, self.mimi,
                                               self.stop)))
            except MoshiError as exc:
                print(f"error: {self.path} line {line.number}: {exc}", file=sys.stderr)
                self.failed += 1
        return prepared

    def run(self, chunk: list[tuple[BatchLine, object]]) -> None:
        from moshi_mlx.speech.batch import BatchSpeechStream, collect_batch
        from moshi_mlx.speech.generate import make_sampler

        sampler = make_sampler(self.sampling.temp, self.sampling.top_k)
        stream = BatchSpeechStream(self.model, [p for _, p in chunk], sampler, self.seed)
        collect_batch(stream, self.mimi if self.wav_dir is not None else None,
                      lambda index, result: self.write(chunk[index][0], result))

    def write(self, line: BatchLine, result) -> None:
        from moshi_mlx.audio.codes import save_npy

        written = []
        if self.codes_dir is not None:
            save_npy(self.codes_dir / f"{line.name}.npy", result.frames.T.copy())
            written.append(f"{line.name}.npy")
        if self.wav_dir is not None:
            from moshi_mlx.speech.output import write_clip

            write_clip(self.wav_dir / f"{line.name}.wav", result.audio, self.watermark)
            written.append(f"{line.name}.wav")
        self.done += 1
        self.frames += len(result.frames)
        trimmed = f", trimmed {result.trimmed_frames / FRAME_RATE:.2f} s" \
            if result.trimmed_frames else ""
        print(f"[{self.done}/{self.total}] line {line.number} -> {', '.join(written)}: "
              f"{len(result.frames)} frames, {len(result.frames) / FRAME_RATE:.2f} s, "
              f"stopped: {result.stop_reason}{trimmed}", file=sys.stderr)


def add_batch_args(p: argparse.ArgumentParser) -> None:
    batch = p.add_argument_group("batch")
    batch.add_argument("--batch", type=Path, default=None,
                       help="JSONL file, one request a line: {\"text\", \"speaker\", "
                            "\"context\" (turns as in --context), \"out\" (file name), "
                            "\"max_frames\"}; -o and --codes-out name folders")
    batch.add_argument("--batch-size", type=int, default=None,
                       help=f"requests generated together (default {defaults.BATCH_SIZE})")
