"""Text to speech with Sesame CSM.

    python -m moshi_mlx.tts "Hello there." -o out.wav
    python -m moshi_mlx.tts "Hello there." -o out.wav -q 8 --speaker 0 --seed 1
    python -m moshi_mlx.tts "Go on." -o out.wav --context-audio me.wav --context-text "Hi." \
        --context-speaker 0
    python -m moshi_mlx.tts "Hello." --codes-out codes.npy        # no audio: Mimi not loaded
    python -m moshi_mlx.tts "Hello there." --play                 # to the speaker, as it comes
    python -m moshi_mlx.tts "Hello there." -o out.wav --stop eos  # Sesame's stop rule only
    python -m moshi_mlx.tts --batch requests.jsonl -o wavs/ --codes-out codes/  # in batches
    python -m moshi_mlx.tts "Go on." -o out.wav --context-audio me.wav   # transcribed by STT
    python -m moshi_mlx.tts --context-audio me.wav --save-voice me       # a voice, encoded once
    python -m moshi_mlx.tts "Hello there." -o out.wav --voice me

A context file (--context) is a JSON list of turns {"speaker": 0, "text": "...", "audio":
"turn.wav"} or {..., "codes": "turn.npy"} (paths relative to the JSON file). Long text is
spoken sentence by sentence, each conditioned on the context and the sentences before it.
--codes-out writes int32 codes [32, frames], the layout `python -m moshi_mlx.mimi decode` reads.
Each sentence stops on the first of moshi_mlx.speech.stopping's rules (eos, repeat, silence,
budget, max, context); the reason is printed at the end. The silence rule hears the audio, so
it applies when Mimi decodes (-o, --stream, --play), and its trimmed tail is not written.
--batch: one JSON request a line, generated several at a time (moshi_mlx.cli.tts_batch).

A --context-audio given without --context-text is transcribed by Kyutai STT (--stt; one line
on stderr gives the text used); a recording without speech is refused (see
moshi_mlx.speech.recordings). --save-voice stores the one context turn, Mimi-encoded, in the
voices folder; --voice speaks as a saved voice's speaker with its turn as the whole context
(so it is refused beside --speaker and the context options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moshi_mlx.audio.rates import FRAME_RATE
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
from moshi_mlx.cli.outputs import output_file
from moshi_mlx.cli.tts_batch import add_batch_args
from moshi_mlx.cli.tts_context import (
    add_voice_args,
    check_one_recorded_turn,
    save_voice_turn,
    speaker_and_context,
)
from moshi_mlx.errors import MoshiError, cli_errors
from moshi_mlx.speech import defaults
from moshi_mlx.speech.context import as_int
from moshi_mlx.speech.stopping import DEFAULT_MAX_SILENCE, RULES, StopRules

if TYPE_CHECKING:
    pass

OUTPUT_NAME = "speech"  # the file name -o / --codes-out give inside a folder


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.loading.families import files_of

    default_repo, default_mimi = files_of("csm").default_repo(), files_of("mimi").default_repo()
    default_stt = files_of("stt").default_repo()
    p = argparse.ArgumentParser(prog=command_prog("moshi_mlx.tts", "moshi-tts"),
                                description="Speak text with Sesame CSM (MLX).")
    p.add_argument("text", nargs="?", help="what to say")
    p.add_argument("-o", "--output", default=None,
                   help=f"WAV file to write (24 kHz); a folder (ending in /: created when "
                        f"missing) gets {OUTPUT_NAME}.wav")
    p.add_argument("--codes-out", default=None,
                   help="also (or only) write the Mimi codes [32, frames] as .npy (a folder "
                        f"gets {OUTPUT_NAME}.npy)")
    p.add_argument("--stream", action="store_true",
                   help="write the WAV frame by frame (Ctrl-C leaves a valid file)")
    p.add_argument("--play", action="store_true",
                   help="play on the speaker as frames come (streaming Mimi decoder)")
    p.add_argument("--prebuffer", type=float, default=0.5,
                   help="seconds of audio queued before playback starts (default 0.5; raise "
                   "it when underruns are reported)")
    p.add_argument("--no-watermark", action="store_true",
                   help="do not mark -o audio with Sesame's silentcipher watermark (applied "
                        "when silentcipher is installed; never to streamed or played audio)")
    p.add_argument("--output-device", default=None,
                   help="speaker for --play: index or name (see --list-devices)")
    add_list_devices_arg(p)
    add_batch_args(p)
    model = p.add_argument_group("model")
    model.add_argument("--hf-repo", default=None,
                       help=f"Hugging Face repo of weights, config, tokenizer ({default_repo})")
    model.add_argument("--weights", default=None, help="CSM .safetensors file or folder")
    model.add_argument("--config", default=None, help="CSM config.json (default: beside "
                       "the weights)")
    model.add_argument("--tokenizer", default=None, help="tokenizer.json (file, folder or repo)")
    model.add_argument("--mimi-weight", default=None,
                       help="Mimi checkpoint: file, folder or repo (default: the model's "
                            f"own, in its folder or bundled in its file, else {default_mimi})")
    model.add_argument("--adapter-path", default=None, type=Path,
                       help="LoRA adapter folder (python -m moshi_mlx.finetune csm) applied "
                            "over the model")
    add_run_args(model, "quantize on load: 4 or 8 bits")
    gen = p.add_argument_group("generation")
    gen.add_argument("--speaker", default=None, help="speaker id (int, default 0)")
    add_sampling_args(gen, temp=defaults.TEMPERATURE, top_k_default=defaults.TOP_K)
    gen.add_argument("--max-seconds", type=float, default=None,
                     help="longest audio per sentence (default: Sesame's 90 s within budget)")
    gen.add_argument("--max-frames", type=int, default=None,
                     help="longest audio per sentence in 80 ms frames (overrides --max-seconds)")
    gen.add_argument("--stop", choices=RULES, default="all",
                     help="all: Sesame's all-zero frame, repeats, silence, a frame budget from "
                          "the text length, the context limit; eos: Sesame's frame and the "
                          "explicit limits only, as the references (default all)")
    gen.add_argument("--max-silence", type=float, default=DEFAULT_MAX_SILENCE,
                     help="seconds of quiet audio after speech that end a sentence, trimmed "
                          f"(--stop all, with audio out; default {DEFAULT_MAX_SILENCE:g})")
    ctx = p.add_argument_group("conversation context")
    ctx.add_argument("--context", type=Path, default=None, help="JSON list of earlier turns")
    ctx.add_argument("--context-audio", action="append", default=[], type=Path,
                     help="audio of an earlier turn (repeatable; a recording of speech)")
    ctx.add_argument("--context-text", action="append", default=[],
                     help="transcript of each --context-audio (none: each is transcribed "
                          "with --stt)")
    ctx.add_argument("--context-speaker", action="append", default=[],
                     help="speaker of each --context-audio (default: --speaker)")
    ctx.add_argument("--stt", default=None, metavar="SRC",
                     help="Kyutai STT model (repo id or folder) that transcribes a "
                          f"--context-audio given without text (default {default_stt}; "
                          "-q, --dtype, --cpu-threads apply)")
    add_voice_args(p)
    return p


def _max_frames(args: argparse.Namespace) -> int | None:
    if args.max_frames is not None:
        if args.max_frames < 1:
            raise MoshiError(f"--max-frames must be >= 1, got {args.max_frames}")
        return args.max_frames
    if args.max_seconds is not None:
        if args.max_seconds <= 0:
            raise MoshiError(f"--max-seconds must be > 0, got {args.max_seconds}")
        return max(1, round(args.max_seconds * FRAME_RATE))
    return None


def _load(args: argparse.Namespace, options: ModelOptions, needs_mimi: bool):
    """CSM, its tokenizer and (when needed) its Mimi: the files through
    moshi_mlx.loading.resolve (a weights_convert folder brings its own tokenizer and Mimi)."""
    from moshi_mlx.loading.resolve import resolve
    from moshi_mlx.speech.loader import speech_parts_from_files

    files = resolve("moshi_mlx.tts", args.hf_repo, quantize=options.quantize,
                    weights=args.weights, config=args.config, tokenizer=args.tokenizer,
                    codec=args.mimi_weight, need_codec=needs_mimi)
    return speech_parts_from_files(files, options, needs_mimi, args.adapter_path,
                                   batched=args.batch is not None)


def _streamed_watermark_note(args: argparse.Namespace) -> None:
    if not args.no_watermark:
        what = "the --stream WAV" if args.stream else "the played audio"
        print(f"note: {what} is not watermarked (silentcipher marks whole clips: -o without "
              "--stream is)", file=sys.stderr)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_devices:
        return show_devices()
    from moshi_mlx.speech.generate import frames_to_audio, stream_long_speech

    if args.speaker is not None:
        as_int(args.speaker, "--speaker")  # checked before anything else is read
    if args.save_voice is not None:
        from moshi_mlx.speech.voices import check_voice_name

        check_voice_name(args.save_voice)
    save_only = args.text is None and args.save_voice is not None
    if args.text is None and args.batch is None and (
            not save_only or args.output or args.codes_out or args.play):
        raise MoshiError("nothing to say: give the text, e.g. moshi-tts \"Hello.\" -o out.wav")
    options = ModelOptions.from_args(args)
    sampling = SamplingOptions.from_args(args)
    max_frames = _max_frames(args)
    if not args.max_silence > 0:
        raise MoshiError(f"--max-silence must be > 0 seconds, got {args.max_silence}")
    stop = StopRules(args.stop, max_silence=args.max_silence)
    if args.batch is not None:
        if args.voice is not None or args.save_voice is not None:
            raise MoshiError("--voice / --save-voice apply to one text: not with --batch")
        from moshi_mlx.cli.tts_batch import run_batch

        return run_batch(args, sampling, options.seed, stop, max_frames,
                         lambda needs_mimi: _load(args, options, needs_mimi))
    if args.batch_size is not None:
        raise MoshiError("--batch-size goes with --batch")
    if args.output is None and args.codes_out is None and not args.play and not save_only:
        raise MoshiError("nothing to do: give -o out.wav, --codes-out codes.npy and/or --play")
    if args.stream and args.output is None:
        raise MoshiError("--stream writes the WAV incrementally: give -o out.wav")
    if args.prebuffer < 0:
        raise MoshiError(f"--prebuffer must be >= 0 seconds, got {args.prebuffer}")
    if args.output is not None:
        args.output = output_file(args.output, f"{OUTPUT_NAME}.wav")
    if args.codes_out is not None:
        args.codes_out = output_file(args.codes_out, f"{OUTPUT_NAME}.npy")
    if args.play:
        from moshi_mlx.audio.devices import check_output_device, parse_device

        args.output_device = parse_device(args.output_device)
        check_output_device(args.output_device)  # before loading the model
    if args.save_voice is not None and args.voice is None:
        check_one_recorded_turn(len(args.context_audio) + (args.context is not None))
    speaker, context = speaker_and_context(args, options)
    if args.save_voice is not None:
        check_one_recorded_turn(len(context), all(s.audio is not None or s.codes is not None
                                                   for s in context))
    needs_mimi = args.output is not None or args.play or any(s.audio is not None
                                                              for s in context)
    model, tokenizer, mimi = _load(args, options, needs_mimi)
    if args.save_voice is not None:
        context = [save_voice_turn(args, context[0], mimi, model.cfg.num_codebooks)]
        if save_only:
            return 0
    print_blas_hint()
    frames = stream_long_speech(model, tokenizer, args.text, speaker, context,
                                sampling.temp, sampling.top_k, max_frames, options.seed, mimi,
                                stop=stop)
    watermark = not args.no_watermark
    if args.play:
        from moshi_mlx.speech.output import play

        codes = play(frames, mimi, args.output_device, args.prebuffer, wav=args.output,
                     stream_wav=args.stream, watermark=watermark)
    elif args.stream:
        from moshi_mlx.speech.output import write_streaming

        codes = write_streaming(args.output, frames, mimi)
    elif args.output is not None and stop.rules == "all":  # decoded as frames come: silence
        from moshi_mlx.speech.output import decode_all, write_clip

        codes, audio = decode_all(frames, mimi)
        write_clip(args.output, audio, watermark)
    else:
        codes = list(frames)
        if args.output is not None:
            from moshi_mlx.speech.output import write_clip

            write_clip(args.output, frames_to_audio(mimi, _stack(codes, model)), watermark)
    result = _stack(codes, model)
    if args.codes_out is not None:
        from moshi_mlx.audio.codes import save_npy

        save_npy(args.codes_out, result.T.copy())
    print(f"{len(result)} frames, {len(result) / FRAME_RATE:.2f} s of audio", file=sys.stderr)
    if frames.stop_reasons:
        print(stop_line(frames.stop_reasons, frames.trimmed_frames), file=sys.stderr)
    if args.play or args.stream:
        _streamed_watermark_note(args)
    return 0


def stop_line(reasons: list[str], trimmed_frames: int) -> str:
    """`stopped: silence (trimmed 0.80 s)`; with several sentences, one reason each."""
    line = f"stopped: {', '.join(reasons)}"
    notes = ["one per sentence"] if len(reasons) > 1 else []
    if trimmed_frames:
        notes.append(f"trimmed {trimmed_frames / FRAME_RATE:.2f} s")
    return f"{line} ({'; '.join(notes)})" if notes else line


def _stack(frames: list[np.ndarray], model) -> np.ndarray:
    return np.stack(frames) if frames else np.zeros((0, model.cfg.num_codebooks), np.int32)


if __name__ == "__main__":
    sys.exit(main())
