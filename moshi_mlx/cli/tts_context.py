"""The tts command's context options: --context-audio turns (transcribed by --stt when no
--context-text is given), saved voices (--voice, --save-voice, --voices)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moshi_mlx.errors import MoshiError
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.speech import defaults
from moshi_mlx.speech.context import as_int

if TYPE_CHECKING:
    from moshi_mlx.speech.generate import Segment


def add_voice_args(parser: argparse.ArgumentParser) -> None:
    from moshi_mlx.speech.voices import default_voices_folder

    voices = parser.add_argument_group("saved voices")
    voices.add_argument("--voice", default=None, metavar="NAME",
                        help="speak in a saved voice: as its speaker, its turn the whole "
                             "context (not with --speaker or the context options)")
    voices.add_argument("--save-voice", default=None, metavar="NAME",
                        help="save the one context turn (--context-audio, with or without "
                             "--context-text) as voice NAME, Mimi-encoded; without text to "
                             "say, only save it")
    voices.add_argument("--voices", type=Path, default=None, metavar="DIR",
                        help=f"the saved voices' folder (default {default_voices_folder()})")


def speaker_and_context(args: argparse.Namespace, options: ModelOptions
                         ) -> tuple[int, list[Segment]]:
    """--voice's speaker and turn; else --speaker and _context's turns."""
    if args.voice is not None:
        from moshi_mlx.speech.voices import load_voice

        given = [flag for flag, value in (
            ("--speaker", args.speaker), ("--context", args.context),
            ("--context-audio", args.context_audio), ("--context-text", args.context_text),
            ("--context-speaker", args.context_speaker), ("--save-voice", args.save_voice))
            if value]
        if given:
            raise MoshiError(f"--voice is the whole context and its speaker: drop "
                             f"{', '.join(given)} (or drop --voice)")
        turn = load_voice(_voices_folder(args), args.voice)
        return turn.speaker, [turn]
    speaker = defaults.SPEAKER if args.speaker is None else as_int(args.speaker, "--speaker")
    return speaker, _context(args, speaker, options)


def _voices_folder(args: argparse.Namespace) -> Path:
    from moshi_mlx.speech.voices import default_voices_folder

    return args.voices if args.voices is not None else default_voices_folder()


def _context(args: argparse.Namespace, speaker: int, options: ModelOptions) -> list[Segment]:
    """--context's turns, then one per --context-audio (its text and speaker paired in order;
    without any --context-text, each recording is transcribed with --stt)."""
    from moshi_mlx.speech.context import audio_turns, read_context_file

    segments = read_context_file(args.context) if args.context else []
    texts = args.context_text
    if texts and len(texts) != len(args.context_audio):
        raise MoshiError("each --context-audio needs its --context-text (the transcript), or "
                         f"none to have them transcribed: got {len(args.context_audio)} audio "
                         f"and {len(texts)} texts")
    if args.context_speaker and len(args.context_speaker) != len(args.context_audio):
        raise MoshiError("give one --context-speaker per --context-audio (or none)")
    speakers = [as_int(spk, "--context-speaker") for spk in args.context_speaker] or \
        [speaker] * len(args.context_audio)
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.speech.recordings import check_speech

    pcms = [check_speech(read_audio(path), str(path)) for path in args.context_audio]
    if pcms and not texts:
        texts = _transcribe(args, options, pcms)
    return segments + audio_turns(pcms, texts, speakers)


def _transcribe(args: argparse.Namespace, options: ModelOptions, pcms: list[np.ndarray]
                ) -> list[str]:
    """The --context-audio recordings' texts, transcribed by --stt (one line each on stderr);
    the STT model is loaded here and freed before CSM loads."""
    from moshi_mlx.speech.recordings import transcribe_recordings
    from moshi_mlx.transcription.loader import load_transcriber

    transcriber = load_transcriber(args.stt, quantize=options.quantize, dtype=options.dtype,
                                   cpu_threads=options.cpu_threads, seed=options.seed)
    names = [str(path) for path in args.context_audio]
    texts = transcribe_recordings(transcriber, pcms, names)
    for name, text in zip(names, texts, strict=True):
        print(f"{name}: transcript: {text}", file=sys.stderr)
    return texts


def check_one_recorded_turn(turns: int, recorded: bool = True) -> None:
    if turns != 1 or not recorded:
        got = f"{turns} turns" if turns != 1 else "a turn without audio"
        raise MoshiError("--save-voice stores one recorded turn: give one --context-audio (or "
                         f"a --context file of one turn with its audio), got {got}")


def save_voice_turn(args: argparse.Namespace, turn: Segment, mimi, num_codebooks: int) -> Segment:
    """The turn Mimi-encoded (once: generation reuses the codes), saved as --save-voice."""
    from moshi_mlx.speech.generate import encode_context_audio
    from moshi_mlx.speech.voices import save_voice

    turn = encode_context_audio(mimi, turn, num_codebooks)
    path = save_voice(_voices_folder(args), args.save_voice, turn)
    print(f"saved voice {args.save_voice!r}: {path} ({turn.codes.shape[1]} frames, speaker "
          f"{turn.speaker}, text {turn.text!r})", file=sys.stderr)
    return turn
