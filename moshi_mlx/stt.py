"""Kyutai speech-to-text from the command line.

    python -m moshi_mlx.stt talk.wav                       # prints the text as it comes
    python -m moshi_mlx.stt a.wav b.mp3 --format json      # several files in one LM batch
    python -m moshi_mlx.stt talk.wav --format srt -o talk.srt
    python -m moshi_mlx.stt --codes codes.npy              # Mimi codes [32, T] instead of audio
    python -m moshi_mlx.stt --model 2.6b -q 4 talk.wav

Greedy decoding by default (the checkpoints' lm_gen_config; --temp to sample). The input
gets the checkpoint's silence prefix and, at its end, the flush silence at once (see
moshi_mlx.transcription.transcriber).
Word times are seconds of the input. End of turn needs the VAD heads:
the official MLX files have none; --vad-weights kyutai/stt-1b-en_fr-candle adds them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moshi_mlx.audio.devices import check_input_device
from moshi_mlx.cli.options import (
    ModelOptions,
    SamplingOptions,
    add_list_devices_arg,
    add_sampling_args,
    add_stt_model_args,
    command_prog,
    print_blas_hint,
    resolve_stt_files,
    show_devices,
)
from moshi_mlx.cli.outputs import names_folder, output_file, output_folder
from moshi_mlx.errors import MoshiError, cli_errors
from moshi_mlx.transcription.formats import FORMATS, render

if TYPE_CHECKING:
    from moshi_mlx.loading.resolve import ResolvedFiles


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.stt", "moshi-stt"),
        description="Transcribe speech with Kyutai STT (streaming, word timestamps, end of turn).")
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT",
                        help="audio files (any format soundfile reads); several are batched")
    parser.add_argument("--codes", type=Path, default=None, metavar="FILE.npy",
                        help="Mimi codes [32, T] or [1, 32, T] (.npy) instead of audio: no Mimi, "
                             "no prefix or flush silence is added")
    parser.add_argument("--mic", action="store_true",
                        help="transcribe a microphone live; Ctrl-C (or --duration) ends it, "
                             "flushes the last words and writes the transcript")
    parser.add_argument("--input-device", default=None,
                        help="microphone: device name or index (default: the system's)")
    parser.add_argument("--duration", type=float, default=None,
                        help="with --mic: stop after this many seconds of audio")
    add_list_devices_arg(parser)
    add_stt_model_args(parser)
    add_sampling_args(parser.add_argument_group("sampling"), temp=0.0, top_k_default=50)
    o = parser.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default="text")
    o.add_argument("-o", "--output", default=None,
                   help="output file, or a folder (ending in /: created when missing) holding "
                        "INPUT_NAME.FORMAT per input (several inputs need one); default stdout")
    o.add_argument("--eot-threshold", type=float, default=0.5,
                   help="end of turn when the no-voice probability exceeds this (default 0.5)")
    return parser


# --------------------------------------------------------------------------- output


def _write(path: Path | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MoshiError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _outputs(args: argparse.Namespace, names: list[str]) -> list[Path | None]:
    """Where each transcript goes (None: stdout), decided and checked before loading."""
    if args.output is None:
        return [None] * len(names)
    suffix = "txt" if args.format == "text" else args.format
    if names_folder(args.output):
        folder = output_folder(args.output)
        return [output_file(folder, f"{Path(name).stem}.{suffix}") for name in names]
    if len(names) > 1:
        raise MoshiError(f"{args.output}: with several inputs, --output must be a folder "
                         "(end it with / to have it created)")
    return [output_file(args.output, f"{Path(names[0]).stem}.{suffix}")]


# --------------------------------------------------------------------------- main


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_devices:
        return show_devices()
    if sum([bool(args.inputs), args.codes is not None, args.mic]) != 1:
        raise MoshiError("give audio file(s), --codes FILE.npy or --mic (exactly one of them)")
    if args.duration is not None and (not args.mic or args.duration <= 0):
        raise MoshiError("--duration takes a positive number of seconds, with --mic")
    if not 0 < args.eot_threshold < 1:
        raise MoshiError(f"--eot-threshold must be between 0 and 1, got {args.eot_threshold}")
    from moshi_mlx.audio.io import read_audio

    pcms = [read_audio(path) for path in args.inputs]  # bad audio fails before loading
    names = [str(p) for p in args.inputs] or [str(args.codes or "mic")]
    if args.mic:
        from moshi_mlx.audio.devices import parse_device

        args.input_device = parse_device(args.input_device)
        check_input_device(args.input_device)  # before loading the model
    outputs = _outputs(args, names)
    files = resolve_stt_files(args, need_mimi=args.codes is None)
    transcriber = _load(args, files)
    print_blas_hint()
    if args.codes is not None:
        from moshi_mlx.transcription.files import load_stt_codes, transcribe_codes

        codes = load_stt_codes(args.codes, transcriber.lm.cfg.n_q)
        transcripts = [transcribe_codes(transcriber, codes)]
    elif args.mic:
        from moshi_mlx.transcription.live import transcribe_mic

        # The live text goes to stdout when it is the output, else to the terminal (stderr).
        text_stream = sys.stdout if args.format == "text" and args.output is None else sys.stderr
        transcripts = [transcribe_mic(transcriber, args.input_device, args.duration,
                                      text_stream)]
    else:
        from moshi_mlx.transcription.files import transcribe_files

        # One file to the terminal: the text is printed as it is transcribed.
        print_text = args.format == "text" and len(pcms) == 1 and outputs[0] is None
        transcripts = transcribe_files(transcriber, pcms, print_text)
    for name, transcript, output in zip(names, transcripts, outputs, strict=True):
        if args.format == "text" and output is None and len(names) == 1 and not args.codes:
            continue  # already streamed (files and --mic)
        text = render(transcript, args.format)
        if output is None and len(names) > 1:
            text = f"== {name}\n{text}"
        _write(output, text)
    return 0


def _load(args: argparse.Namespace, files: ResolvedFiles):
    from moshi_mlx.transcription.loader import transcriber_from_files

    sampling = SamplingOptions.from_args(args)
    transcriber = transcriber_from_files(
        files, ModelOptions.from_args(args), vad_weights=args.vad_weights, temp=sampling.temp,
        top_k=sampling.top_k, eot_threshold=args.eot_threshold)
    if not transcriber.lm.extra_heads:
        print("note: these weights have no VAD heads: no end of turn (--vad-weights adds them)",
              file=sys.stderr)
    return transcriber


if __name__ == "__main__":
    sys.exit(main())
