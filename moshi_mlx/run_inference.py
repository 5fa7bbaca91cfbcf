"""Kyutai's documented STT command for Macs, answered by our STT.

    python -m moshi_mlx.run_inference --hf-repo kyutai/stt-2.6b-en-mlx audio.mp3 --temp 0

Kyutai's STT README runs its `moshi_mlx` package (0.3.x) this way. This module takes that
command's arguments with the same spellings (the input file, an optional output file,
--hf-repo, --moshi-weights, --mimi-weights, --tokenizer, --lm-config, --temp, --cfg-coef,
--verbose) and prints what it prints on stdout: the text pieces as they are decoded, then a
newline. The files resolve as `python -m moshi_mlx.stt` resolves them (a repo id or a folder
as weights_convert writes; explicit files may also be `hf://OWNER/REPO/PATH`, as in Kyutai's
command), and a checkpoint of another family is one line naming its command.

Where ours differs, on purpose:
- Without --hf-repo the released STT model is used: Kyutai's default names a Moshi
  checkpoint, which this command (transcription only) does not run.
- An output audio file and --cfg-coef other than 1 apply to Moshi generating speech; STT
  generates none and has no guidance, so both are refused in one line.
- The shared -q / --dtype / --cpu-threads / --seed of every model-loading command are
  accepted besides. Sampling keeps Kyutai's text top-k of 25.

No console script: `python -m moshi_mlx.run_inference` is the spelling Kyutai documents, and
a `run_inference` script on PATH would name nothing in particular. For formats, several files,
a microphone or end of turn, use `python -m moshi_mlx.stt`.
"""

from __future__ import annotations

import argparse
import sys

from moshi_mlx.cli.options import add_run_args, print_blas_hint, temperature
from moshi_mlx.errors import MoshiError, cli_errors

MODULE = "moshi_mlx.run_inference"
KYUTAI_DEFAULT_TEMP = 0.8
KYUTAI_TEXT_TOP_K = 25  # Kyutai's command samples text among the 25 likeliest tokens
HUB_PREFIX = "hf://"


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.loading.families import files_of

    default_repo = files_of("stt").default_repo()
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Kyutai's documented STT command (moshi_mlx 0.3.x run_inference): "
                    "prints the transcript of an audio file through our STT. "
                    "python -m moshi_mlx.stt offers more.")
    parser.add_argument("infile", metavar="infile",
                        help="input audio file (any format soundfile reads)")
    parser.add_argument("outfile", nargs="?", default="", metavar="outfile",
                        help="Kyutai's output audio file, for Moshi generating speech: STT "
                             "generates none, so one is refused")
    g = parser.add_argument_group("model (Kyutai's spellings)")
    g.add_argument("--hf-repo", default=None,
                   help=f"Hugging Face repo id or a weights_convert folder (default "
                        f"{default_repo}; Kyutai's default, a Moshi checkpoint, is not "
                        "transcription)")
    g.add_argument("--moshi-weights", default=None,
                   help="STT LM weights (either layout; hf://OWNER/REPO/FILE fetches one)")
    g.add_argument("--mimi-weights", default=None, help="Mimi weights")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--lm-config", default=None, help="the model's config.json")
    g.add_argument("--temp", type=temperature, default=KYUTAI_DEFAULT_TEMP,
                   help=f"text sampling temperature, 0 = greedy (default "
                        f"{KYUTAI_DEFAULT_TEMP:g}, as Kyutai's; its README passes --temp 0)")
    g.add_argument("--cfg-coef", type=float, default=1.0,
                   help="classifier-free guidance of Moshi's conditioned models: STT has "
                        "none, only 1 (the default) applies")
    g.add_argument("--verbose", action="store_true",
                   help="name the files loaded, on stderr")
    add_run_args(parser.add_argument_group("loading (moshi_mlx's shared options)"),
                 "4 or 8 bits (a bf16 file is quantized on load)")
    return parser


def hub_path(value: str | None) -> str | None:
    """A file option as given, or a local path for Kyutai's hf://OWNER/REPO/PATH spelling."""
    if value is None or not value.startswith(HUB_PREFIX):
        return value
    from moshi_mlx.loading.hub import resolve_file

    parts = value[len(HUB_PREFIX):].split("/")
    if len(parts) < 3 or not all(parts):
        raise MoshiError(f"{value}: write hf://OWNER/REPO/PATH")
    return str(resolve_file("/".join(parts[:2]), "/".join(parts[2:])))


def _check_kyutai_only_options(args: argparse.Namespace) -> None:
    if args.outfile:
        raise MoshiError(f"{args.outfile}: an STT model generates no audio to write; "
                         "give the input file only")
    if args.cfg_coef != 1.0:
        raise MoshiError(f"--cfg-coef {args.cfg_coef:g}: STT models have no classifier-free "
                         "guidance (only 1 applies)")


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_kyutai_only_options(args)
    from moshi_mlx.audio.io import read_audio
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.loading.resolve import resolve
    from moshi_mlx.transcription.files import transcribe_files
    from moshi_mlx.transcription.loader import transcriber_from_files

    pcm = read_audio(args.infile)  # a bad input fails before loading
    files = resolve(MODULE, args.hf_repo, quantize=args.quantize,
                    weights=hub_path(args.moshi_weights), config=hub_path(args.lm_config),
                    tokenizer=hub_path(args.tokenizer), codec=hub_path(args.mimi_weights))
    if args.verbose:
        print(f"weights {files.weight}\nconfig {files.config}\ntokenizer {files.tokenizer}\n"
              f"mimi {files.codec}", file=sys.stderr)
    transcriber = transcriber_from_files(files, ModelOptions.from_args(args), temp=args.temp,
                                         top_k=KYUTAI_TEXT_TOP_K)
    print_blas_hint()
    transcribe_files(transcriber, [pcm], print_text=True)  # the pieces, then a newline
    return 0


if __name__ == "__main__":
    sys.exit(main())
