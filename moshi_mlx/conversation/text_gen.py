"""Text-only generation with Moshi's temporal transformer, as transformers' `MoshiForCausalLM`
uses it: text token embeddings alone (no audio stream), the temporal transformer, out_norm and
the text head. The prompt goes through the caches in one batched step; then one token a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from moshi_mlx.errors import PromptError
from moshi_mlx.loading.text_tokenizer import printable_piece
from moshi_mlx.models.lm import Lm
from moshi_mlx.modules.sampling import Sampler, new_key

END_OF_PADDING_ID = 0  # EPAD: Moshi's text stream marks a word's start with it


@dataclass(frozen=True)
class TextGeneration:
    prompt_tokens: list[int]
    tokens: list[int]  # the generated ones
    text: str  # what the generated tokens print (`TextGenerator.piece`), joined


def check_fits(context: int, prompt_tokens: int, max_tokens: int) -> None:
    """PromptError (one line, with the limit) when a prompt and the tokens asked for after it
    do not fit in the model's attention context."""
    if prompt_tokens + max_tokens > context:
        raise PromptError(
            f"the prompt ({prompt_tokens} tokens) and {max_tokens} new tokens exceed the "
            f"model's context of {context} tokens: at most {max(context - prompt_tokens, 0)} "
            "new tokens after this prompt")


class TextGenerator:
    """Continues a text prompt with a Moshi LM's text stream alone (`Lm.text_only`).

    sampler: temperature / top-k of each token (greedy at temperature 0); seed: the PRNG seed
    of every `tokens` call (None: a fresh one each call)."""

    def __init__(self, lm: Lm, tokenizer: Any, sampler: Sampler | None = None,
                 seed: int | None = None) -> None:
        self.lm = lm
        self.tokenizer = tokenizer
        self.sampler = sampler or Sampler(0.0)
        self.seed = seed
        self.silent_ids = frozenset({END_OF_PADDING_ID, lm.cfg.existing_text_padding_id})

    @property
    def context(self) -> int:
        return self.lm.cfg.context

    def tokens(self, prompt_tokens: list[int], max_tokens: int) -> Iterator[int]:
        """`max_tokens` tokens after the prompt, each yielded as soon as it is known. A prompt
        that is empty or does not fit is refused here (PromptError), not at the first token."""
        if not prompt_tokens:
            raise PromptError("the prompt has no tokens")
        check_fits(self.context, len(prompt_tokens), max_tokens)
        return self._stream(prompt_tokens, max_tokens)

    def _stream(self, prompt_tokens: list[int], max_tokens: int) -> Iterator[int]:
        caches = self.lm.make_cache()
        key = None if self.sampler.greedy else new_key(self.seed)

        def sample(logits: mx.array) -> mx.array:
            nonlocal key
            draw = None
            if key is not None:
                key, draw = mx.random.split(key)
            return self.sampler(logits, draw)

        token = sample(self.lm.text_only(mx.array([prompt_tokens], dtype=mx.int32), caches))
        for step in range(max_tokens):
            following = None
            if step + 1 < max_tokens:  # queued before the host waits for `token`
                following = sample(self.lm.text_only(token[:, None], caches))
                mx.async_eval(following)
            yield int(token.item())
            token = following

    def piece(self, token: int) -> str | None:
        """What a generated token prints; None for PAD, EPAD and control ids."""
        return printable_piece(self.tokenizer, token, self.silent_ids)

    def generate(self, prompt: str, max_tokens: int, bos: bool = False) -> TextGeneration:
        prompt_tokens = encode_prompt(self.tokenizer, prompt, bos)
        tokens = list(self.tokens(prompt_tokens, max_tokens))
        return TextGeneration(prompt_tokens, tokens, self.text_of(tokens))

    def text_of(self, tokens: list[int]) -> str:
        return "".join(piece for piece in map(self.piece, tokens) if piece is not None)


def encode_prompt(tokenizer: Any, prompt: str, bos: bool = False) -> list[int]:
    """A text prompt as SentencePiece ids, after the tokenizer's BOS when `bos`; PromptError
    when that leaves no token (a model continues something, never nothing)."""
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if bos:
        if tokenizer.bos_id() < 0:
            raise PromptError("this text tokenizer has no BOS token")
        ids.insert(0, int(tokenizer.bos_id()))
    if not ids:
        raise PromptError("the prompt is empty: give some text, or start from BOS alone (--bos)")
    return ids
