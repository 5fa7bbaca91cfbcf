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
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moshi_mlx.cli.codes import load_codes
from moshi_mlx.cli.options import (
    ModelOptions,
    SamplingOptions,
    add_list_devices_arg,
    add_run_args,
    add_sampling_args,
    command_prog,
    print_blas_hint,
    show_devices,
)
from moshi_mlx.cli.outputs import names_folder, output_file, output_folder
from moshi_mlx.errors import MoshiError, WeightsError, cli_errors

if TYPE_CHECKING:
    from moshi_mlx.loading.resolve import ResolvedFiles

FORMATS = ("text", "json", "srt", "vtt")


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.loading.families import files_of

    releases = files_of("stt")
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
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(releases.repos), default="1b",
                   help="released model when --hf-repo is not given (default 1b)")
    g.add_argument("--hf-repo", default=None,
                   help=f"Hugging Face repo id or local folder (default {releases.default_repo()})")
    g.add_argument("--moshi-weight", default=None, help="STT LM weights (either layout)")
    g.add_argument("--config", default=None, help="the model's config.json")
    g.add_argument("--mimi-weight", default=None, help="Mimi weights")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--vad-weights", default=None,
                   help="checkpoint with the VAD heads (e.g. kyutai/stt-1b-en_fr-candle) when "
                        "the weights have none")
    add_run_args(g, "4 or 8 bits (a bf16 file is quantized on load)")
    add_sampling_args(parser.add_argument_group("sampling"), temp=0.0, top_k_default=50)
    o = parser.add_argument_group("output")
    o.add_argument("--format", choices=FORMATS, default="text")
    o.add_argument("-o", "--output", default=None,
                   help="output file, or a folder (ending in /: created when missing) holding "
                        "INPUT_NAME.FORMAT per input (several inputs need one); default stdout")
    o.add_argument("--eot-threshold", type=float, default=0.5,
                   help="end of turn when the no-voice probability exceeds this (default 0.5)")
    return parser


# --------------------------------------------------------------------------- files


def resolve_stt_files(args: argparse.Namespace, need_mimi: bool) -> ResolvedFiles:
    """The STT files the options name, through moshi_mlx.loading.resolve (a checkpoint of
    another family is refused there). Kyutai's STT repos hold bf16 weights only: -q then
    quantizes them on load."""
    from moshi_mlx.loading.resolve import resolve

    return resolve("moshi_mlx.stt", args.hf_repo, variant=args.model, quantize=args.quantize,
                   weights=args.moshi_weight, config=args.config, tokenizer=args.tokenizer,
                   codec=args.mimi_weight, need_codec=need_mimi)


def load_stt_codes(path: Path, n_q: int) -> np.ndarray:
    """Mimi codes [n_q, T] for the STT model (cli.load_codes, plus the codebook count)."""
    codes = load_codes(path)
    if codes.shape[0] != n_q:
        raise MoshiError(f"{path} holds {codes.shape[0]} codebooks; the STT model reads {n_q}")
    return codes


# --------------------------------------------------------------------------- output


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitle_cues(transcript, max_words: int = 12, max_seconds: float = 5.0,
                  max_gap: float = 1.0) -> list[tuple[float, float, str]]:
    """Words grouped into cues: a new cue after a pause, an end of turn, or a long line."""
    cues: list[tuple[float, float, str]] = []
    turns = sorted(transcript.end_of_turn)
    current: list = []

    def close() -> None:
        if current:
            cues.append((current[0].start, max(current[-1].end, current[0].start + 0.04),
                         " ".join(w.word for w in current)))
            current.clear()

    for word in transcript.words:
        if current and (len(current) >= max_words or word.end - current[0].start > max_seconds
                        or word.start - current[-1].end > max_gap
                        or any(current[-1].end <= t < word.start for t in turns)):
            close()
        current.append(word)
    close()
    return cues


def render(transcript, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(transcript.to_json_dict(), ensure_ascii=False, indent=2) + "\n"
    if fmt == "text":
        return transcript.text + "\n"
    cues = subtitle_cues(transcript)
    if fmt == "srt":
        return "".join(f"{i}\n{_clock(a, ',')} --> {_clock(b, ',')}\n{text}\n\n"
                       for i, (a, b, text) in enumerate(cues, 1))
    return "WEBVTT\n\n" + "".join(f"{_clock(a, '.')} --> {_clock(b, '.')}\n{text}\n\n"
                                  for a, b, text in cues)


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


class _Progress:
    """Progress with the real-time factor on stderr (redrawn in place on a terminal)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def __call__(self, done: float, total: float) -> None:
        if not self.tty:
            return
        spent = time.perf_counter() - self.start
        sys.stderr.write(f"\r{100 * done / total:5.1f}%  {done:.1f}/{total:.1f} s of audio, "
                         f"{done / max(spent, 1e-9):.2f}x real time")
        sys.stderr.flush()

    def finish(self, audio_seconds: float, streams: int) -> None:
        spent = time.perf_counter() - self.start
        if self.tty:
            sys.stderr.write("\n")
        sys.stderr.write(
            f"{streams} stream(s), {audio_seconds:.1f} s of audio each at most, in {spent:.1f} s: "
            f"real-time factor {spent / max(audio_seconds, 1e-9):.3f} "
            f"({audio_seconds / max(spent, 1e-9):.2f}x real time)\n")


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
        _check_input(args.input_device)
    outputs = _outputs(args, names)
    files = resolve_stt_files(args, need_mimi=args.codes is None)
    transcriber = _load(args, files)
    print_blas_hint()
    if args.codes is not None:
        codes = load_stt_codes(args.codes, transcriber.lm.cfg.n_q)
        transcripts = [_transcribe_codes(transcriber, codes)]
    elif args.mic:
        transcripts = [_transcribe_mic(transcriber, args)]
    else:
        transcripts = _transcribe_files(transcriber, pcms, args, outputs)
    for name, transcript, output in zip(names, transcripts, outputs, strict=True):
        if args.format == "text" and output is None and len(names) == 1 and not args.codes:
            continue  # already streamed (files and --mic)
        text = render(transcript, args.format)
        if output is None and len(names) > 1:
            text = f"== {name}\n{text}"
        _write(output, text)
    return 0


def _load(args: argparse.Namespace, files: ResolvedFiles):
    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.transcription.transcriber import Transcriber

    model = ModelOptions.from_args(args)
    sampling = SamplingOptions.from_args(args)
    lm = load_lm(files.weight, config=files.config, vad_weights=args.vad_weights,
                 **model.load_kwargs())
    tokenizer = load_sentencepiece(files.tokenizer)
    if tokenizer.get_piece_size() < lm.cfg.text_card:
        raise WeightsError(f"{files.tokenizer} has {tokenizer.get_piece_size()} pieces, the "
                           f"model {lm.cfg.text_card}: not this model's tokenizer")
    mimi = None if files.codec is None else load_mimi(files.codec, num_codebooks=lm.cfg.n_q)
    if not lm.extra_heads:
        print("note: these weights have no VAD heads: no end of turn (--vad-weights adds them)",
              file=sys.stderr)
    return Transcriber(lm, tokenizer, mimi, temp=sampling.temp, top_k=sampling.top_k,
                       seed=model.seed, eot_threshold=args.eot_threshold)


def _transcribe_codes(transcriber, codes: np.ndarray):
    from moshi_mlx.transcription.transcriber import transcript_from_events

    transcriber.reset(1)
    events = transcriber.feed_codes(codes) + transcriber.flush()
    return transcript_from_events(events, transcriber.stream_text(0), codes.shape[1] / 12.5,
                                  transcriber.text_time)


def _transcribe_files(transcriber, pcms: list[np.ndarray], args, outputs):
    from moshi_mlx.transcription.transcriber import TextPiece

    progress = _Progress()
    on_events = None
    live = args.format == "text" and len(pcms) == 1 and outputs[0] is None
    if live:  # one file to the terminal: the text is printed as it is transcribed

        def on_events(events) -> None:
            pieces = "".join(e.text for e in events if isinstance(e, TextPiece))
            if pieces:
                sys.stdout.write(pieces)
                sys.stdout.flush()

        progress.tty = False  # the text is the progress
    transcripts = transcriber.transcribe_pcm(pcms, chunk_frames=4, progress=progress,
                                             on_events=on_events)
    if live:
        sys.stdout.write("\n")
    progress.finish(max(len(p) for p in pcms) / 24000, len(pcms))
    return transcripts


def _check_input(device) -> None:
    from moshi_mlx.audio.devices import _device_info, sounddevice

    _device_info(sounddevice(), device, "input")  # AudioError (one line) before loading


def _print_live(events, stream=None) -> None:
    from moshi_mlx.transcription.transcriber import EndOfTurn, TextPiece

    out = []
    for event in events:
        if isinstance(event, TextPiece):
            out.append(event.text)
        elif isinstance(event, EndOfTurn):
            out.append(" [end of turn]\n")
    if out:
        stream = stream or sys.stdout
        stream.write("".join(out))
        stream.flush()


def _transcribe_mic(transcriber, args, opener=None):
    """Live: capture -> Mimi -> LM as the audio comes; Ctrl-C stops, then the flush pushes the
    silence at once so the last words come out without waiting for them to be spoken."""
    from moshi_mlx.audio.capture import MicCapture
    from moshi_mlx.transcription.transcriber import transcript_from_events

    capture = MicCapture(args.input_device, **({} if opener is None else {"opener": opener}))
    transcriber.reset(1)
    events = []
    fed = 0
    worst_backlog = 0.0
    # The live text goes to stdout when it is the output, else to the terminal (stderr).
    live = sys.stdout if args.format == "text" and args.output is None else sys.stderr
    capture.start()
    print(f"listening on {capture.name} (Ctrl-C to stop)", file=sys.stderr)
    started = time.perf_counter()
    try:
        while args.duration is None or fed < args.duration * 24000:
            pcm = capture.read(timeout=0.5)
            if args.duration is not None:
                pcm = pcm[: max(0, int(args.duration * 24000) - fed)]
            if pcm.size:
                fed += pcm.size
                new = transcriber.feed(pcm)
                events += new
                _print_live(new, live)
                worst_backlog = max(worst_backlog, capture.backlog_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        capture.close()
    new = transcriber.flush()
    events += new
    _print_live(new, live)
    live.write("\n")
    spent = time.perf_counter() - started
    print(f"{fed / 24000:.1f} s of audio; worst backlog {worst_backlog:.2f} s, dropped "
          f"{capture.dropped_seconds:.2f} s; compute {spent:.1f} s", file=sys.stderr)
    return transcript_from_events(events, transcriber.stream_text(0), fed / 24000,
                                  transcriber.text_time)


if __name__ == "__main__":
    sys.exit(main())
