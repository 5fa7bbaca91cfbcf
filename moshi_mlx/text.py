"""python -m moshi_mlx.text: continue a text prompt with Moshi's text stream alone (its temporal
transformer as a text model, no audio).

    python -m moshi_mlx.text "Hello, how are you?" -q 4 --max-tokens 50
    python -m moshi_mlx.text "" --bos --temp 0 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from moshi_mlx.errors import cli_errors

DEFAULT_MAX_TOKENS = 100


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.cli.options import (
        add_model_args,
        add_sampling_args,
        command_prog,
        positive_int,
    )
    from moshi_mlx.modules.sampling import SamplingSettings

    parser = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.text", "moshi-text"),
        description="Text-only generation with Moshi's temporal transformer (MLX): the prompt's "
                    "tokens in, text out, no audio streams.",
    )
    parser.add_argument("prompt", help="text to continue (encoded with the model's "
                                       "SentencePiece tokenizer, without BOS unless --bos)")
    add_model_args(parser, audio=False)
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                     help=f"how many tokens to generate (default {DEFAULT_MAX_TOKENS})")
    released = SamplingSettings()  # Moshi's released text sampling
    add_sampling_args(gen, released.text_temp, released.text_topk)
    gen.add_argument("--bos", action="store_true",
                     help="start the prompt with the tokenizer's BOS token")
    gen.add_argument("--json", action="store_true",
                     help='print one JSON line {"prompt_tokens", "tokens", "text"} at the end '
                          "instead of streaming the text")
    return parser


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from moshi_mlx.cli.options import SamplingOptions, print_blas_hint, resolve_model_files
    from moshi_mlx.conversation.text_gen import TextGenerator, check_fits, encode_prompt
    from moshi_mlx.loading.models import load_lm
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.modules.sampling import Sampler

    files = resolve_model_files(args)
    tokenizer = load_sentencepiece(files.tokenizer)
    prompt_tokens = encode_prompt(tokenizer, args.prompt, args.bos)
    check_fits(files.checkpoint.config.context, len(prompt_tokens), args.max_tokens)  # pre-load
    options = ModelOptions.from_args(args)
    lm = load_lm(files.weight, config=files.config, **options.load_kwargs())
    print_blas_hint()
    sampling = SamplingOptions.from_args(args)
    generator = TextGenerator(lm, tokenizer, Sampler(sampling.temp, sampling.top_k),
                              seed=options.seed)
    tokens = []
    for token in generator.tokens(prompt_tokens, args.max_tokens):
        tokens.append(token)
        piece = generator.piece(token)
        if piece is not None and not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"prompt_tokens": prompt_tokens, "tokens": tokens,
                          "text": generator.text_of(tokens)}))
    else:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
