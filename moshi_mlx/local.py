"""python -m moshi_mlx.local: talk with Moshi in real time, or run it on a recording.

    python -m moshi_mlx.local -q 4                       # microphone + speaker
    python -m moshi_mlx.local -q 4 --voice moshika --record talk.wav
    python -m moshi_mlx.local --input-file user.wav --output-file out.wav --transcript out.txt
    python -m moshi_mlx.local -q 4 --text-prompt "You are a ship's cook." --voice-prompt me.wav
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.cli.model_thread import load_on_model_thread, start_model_thread, stop_model_thread
from moshi_mlx.errors import MoshiError, cli_errors


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.cli.options import add_list_devices_arg, add_model_args, command_prog
    from moshi_mlx.cli.prompt_args import add_prompt_args

    parser = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.local", "moshi-local"),
        description="Full-duplex conversation with Moshi on this machine (MLX).",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    dev = parser.add_argument_group("sound devices")
    add_list_devices_arg(dev)
    dev.add_argument("--input-device", default=None, help="microphone (index or name)")
    dev.add_argument("--output-device", default=None, help="speaker (index or name)")
    dev.add_argument("--device-rate", type=int, default=None,
                     help="open the devices at this rate and resample (default: try "
                          f"{SAMPLE_RATE} Hz, "
                          "then the device's own rate)")
    dev.add_argument("--record", default=None,
                     help="record the conversation to this WAV (Moshi left, you right); a "
                          "folder (ending in /: created when missing) gets "
                          "moshi-DATE-TIME.wav")
    dev.add_argument("--duration", type=float, default=None,
                     help="stop after this many seconds (default: until Ctrl-C)")
    dev.add_argument("--max-backlog", type=int, default=2,
                     help="frames of microphone audio kept when lagging; older ones are skipped")
    files = parser.add_argument_group("file mode (no devices)")
    files.add_argument("--input-file", default=None, help="user audio to answer (any rate)")
    files.add_argument("--output-file", default=None,
                       help="write Moshi's audio here (WAV); a folder (ending in /: created "
                            "when missing) gets INPUT_NAME-moshi.wav")
    files.add_argument("--transcript", default=None,
                       help="write Moshi's text with timestamps (a folder gets "
                            "INPUT_NAME-moshi.txt)")
    files.add_argument("--stereo", action="store_true",
                       help="output file: Moshi left, the user right")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while loading (the loops handle their own)
        print("interrupted", file=sys.stderr)
        return 130


def _resolve_outputs(args: argparse.Namespace) -> None:
    """The output options as checked file paths (folders get default names), before the model
    loads, not after."""
    import time

    from moshi_mlx.cli.outputs import output_file

    if args.input_file:
        stem = f"{Path(args.input_file).stem}-moshi"
        if args.output_file:
            args.output_file = output_file(args.output_file, f"{stem}.wav")
        if args.transcript:
            args.transcript = output_file(args.transcript, f"{stem}.txt")
    if args.record:
        args.record = output_file(args.record, time.strftime("moshi-%Y%m%d-%H%M%S.wav"))


def _run(args: argparse.Namespace) -> int:
    if args.list_devices:
        from moshi_mlx.cli.options import show_devices

        return show_devices()
    if (args.output_file or args.transcript or args.stereo) and not args.input_file:
        raise MoshiError("--output-file, --transcript and --stereo need --input-file")
    if args.input_file and not (args.output_file or args.transcript):
        raise MoshiError("--input-file needs --output-file and/or --transcript")
    _resolve_outputs(args)
    from moshi_mlx.audio.display import TextDisplay
    from moshi_mlx.cli.options import build_engine
    from moshi_mlx.cli.prompt_args import apply_prompt, prompt_plan

    prompt = prompt_plan(args)  # bad prompt input fails before the model loads

    display = TextDisplay()
    if args.input_file:
        from moshi_mlx.audio.fileloop import run_file
        from moshi_mlx.audio.io import read_audio

        read_audio(args.input_file)  # a bad input file fails before the model loads
        engine = apply_prompt(build_engine(args), prompt)
        stats = run_file(engine, args.input_file, args.output_file, args.transcript,
                         stereo=args.stereo, display=display)
    else:
        from moshi_mlx.audio.devices import check_devices, parse_device
        from moshi_mlx.audio.duplex import DuplexLoop
        from moshi_mlx.audio.recorder import WavWriter

        input_device = parse_device(args.input_device)
        output_device = parse_device(args.output_device)
        check_devices(input_device, output_device)  # fail before the model loads
        # One model thread: MLX state is created, and used, on the same thread.
        model = start_model_thread()
        try:
            engine = load_on_model_thread(model,
                                          lambda: apply_prompt(build_engine(args), prompt))
            record = WavWriter(args.record, channels=2) if args.record else None
            loop = DuplexLoop(
                engine, display=display,
                input_device=input_device, output_device=output_device,
                record=record, device_rate=args.device_rate, max_backlog=args.max_backlog,
                executor=model,
            )
            print("listening: speak into the microphone, Ctrl-C to stop", file=sys.stderr)
            stats = loop.run(duration=args.duration)
        finally:
            stop_model_thread(model)
    print(stats.summary_line(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
