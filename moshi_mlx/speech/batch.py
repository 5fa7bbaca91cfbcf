"""Several CSM requests (text, speaker, context) generated as one batch: one backbone step and
one depth-decoder pass a frame for all of them.

Prompts of different lengths are left-padded (as transformers' batched `generate`) into a
`LeftPaddedCache`: every row writes the same slot at each step, its padding masked and its RoPE
positions its own (slot - pad), so a row sees exactly what its single run sees. Each row stops
on its own rules (`StopPolicy`, its own max_frames); a finished row is removed from the batch
(its cache rows, hidden state and the padding no row needs any more are dropped), so it costs
nothing further. Greedy float32, every row's frames equal its `generate_speech` run code for
code. When sampling, the rows draw from one PRNG key chain (batch-wide seed): independent
draws, not the draws of their single runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from moshi_mlx.errors import MoshiError
from moshi_mlx.models.csm import Csm
from moshi_mlx.modules.cache import LeftPaddedCache
from moshi_mlx.modules.sampling import Sampler, new_key
from moshi_mlx.speech.generate import (
    GREEDY_KEY,
    MIMI_CODES,
    CsmTokenizer,
    Segment,
    decode_frame,
    frame_function,
    make_sampler,
    prepare_request,
)
from moshi_mlx.speech.stopping import StopPolicy, StopRules


@dataclass(frozen=True)
class SpeechRequest:
    """One utterance to generate: its text, speaker, earlier turns and frame limit (None: the
    stop rules' budget)."""

    text: str
    speaker: int = 0
    context: Sequence[Segment] = ()
    max_frames: int | None = None


@dataclass(frozen=True)
class PreparedRequest:
    """A request checked and tokenized: prompt rows and its stop policy (`prepare`)."""

    tokens: np.ndarray
    mask: np.ndarray
    policy: StopPolicy = field(compare=False)


def prepare(model: Csm, tokenizer: CsmTokenizer, request: SpeechRequest, mimi=None,
            stop: str | StopRules = "all") -> PreparedRequest:
    """One request -> its prompt and stop policy (MoshiError when it cannot run: checked
    before any batch starts, so a caller can report it alone)."""
    if not isinstance(request, SpeechRequest):
        raise MoshiError(f"requests must be SpeechRequests, got {type(request).__name__}")
    tokens, mask, policy = prepare_request(model, tokenizer, request.text, request.speaker,
                                           request.context, request.max_frames, mimi,
                                           StopRules.of(stop))
    return PreparedRequest(tokens, mask, policy)


class BatchSpeechStream:
    """Iterator over the steps of a batched generation: each step is {request index: frame
    (np.int32 [K])} for the requests that produced a frame. `stop_reasons[i]` names why
    request i ended (None while it runs); `hear(i, pcm)` feeds its decoded audio to its
    silence rule; `trim_frames(i)` is the quiet tail to drop after a "silence" stop."""

    def __init__(self, model: Csm, requests: Sequence[PreparedRequest], sampler: Sampler,
                 seed: int | None = None, allow_non_codes: bool = False,
                 compiled: bool = True) -> None:
        if not requests:
            raise MoshiError("no requests to generate")
        self.model, self.compiled = model, compiled
        self.policies = [r.policy for r in requests]
        self.frames = [0] * len(requests)
        self.stop_reasons: list[str | None] = [None] * len(requests)
        self._pending: list[str | None] = [None] * len(requests)
        self.key = None if sampler.greedy else new_key(seed)
        mask_non_codes = not allow_non_codes and model.cfg.audio_vocab_size > MIMI_CODES
        if compiled:  # the single runs' compiled frame graph, traced anew for each batch size
            self._run_frame = model.frame_graph(
                ("frame", sampler, mask_non_codes),
                lambda: frame_function(model, sampler, mask_non_codes))
        else:
            self._run_frame = frame_function(model, sampler, mask_non_codes)
        self.rows = list(range(len(requests)))  # the request index of each batch row
        lengths = [len(r.tokens) for r in requests]
        width = max(lengths)
        tokens = np.zeros((len(requests), width, requests[0].tokens.shape[1]), np.int32)
        mask = np.zeros(tokens.shape, bool)
        for row, (request, length) in enumerate(zip(requests, lengths, strict=True)):
            tokens[row, width - length:] = request.tokens
            mask[row, width - length:] = request.mask
        self.caches = [LeftPaddedCache([width - n for n in lengths])
                       for _ in model.backbone.layers]
        x = model.embed_frames(mx.array(tokens), mx.array(mask))
        self._hidden = model.backbone_step(x, self.caches)

    def __iter__(self) -> Iterator[dict[int, np.ndarray]]:
        return self

    @property
    def batch_size(self) -> int:
        """Rows still generating."""
        return len(self.rows)

    def hear(self, index: int, pcm: np.ndarray) -> str | None:
        """The decoded audio of request `index`'s latest frame -> "silence" when it ends that
        request (at the next step), else None."""
        if self.stop_reasons[index] is not None or self._pending[index] is not None:
            return None
        self._pending[index] = self.policies[index].on_audio(pcm)
        return self._pending[index]

    def trim_frames(self, index: int) -> int:
        return self.policies[index].trim_frames

    def may_trim(self, index: int) -> int:
        return 0 if self.stop_reasons[index] is not None else self.policies[index].may_trim

    def __next__(self) -> dict[int, np.ndarray]:
        self._keep([b for b, i in enumerate(self.rows) if not self._ends_now(i)])
        if not self.rows:
            raise StopIteration
        key = self.key if self.key is not None else GREEDY_KEY
        codes, _, _, next_key = self._run_frame(self._hidden, key)
        if self.key is not None:
            self.key = next_key
        last = all(self.frames[i] + 1 >= self.policies[i].limit for i in self.rows)
        if last:  # no row takes another step: no backbone step either
            mx.eval(codes)
        else:
            next_hidden = self.model.backbone_step(self.model.embed_audio_frame(codes),
                                                   self.caches, self.compiled)
            mx.async_eval(codes, next_hidden)
        frames = np.asarray(codes).astype(np.int32)
        step: dict[int, np.ndarray] = {}
        for b, i in enumerate(self.rows):
            reason = self.policies[i].on_frame(frames[b])
            if reason == "eos":  # Sesame's all-zero frame: not emitted, the request ends
                self.stop_reasons[i] = "eos"
                continue
            self.frames[i] += 1
            self._pending[i] = reason
            step[i] = frames[b]
        if not last:
            self._hidden = next_hidden
        self._keep([b for b, i in enumerate(self.rows) if self.stop_reasons[i] is None])
        if not step and not self.rows:
            raise StopIteration
        return step

    def _ends_now(self, index: int) -> bool:
        """Whether request `index` ends before its next frame; records why."""
        policy = self.policies[index]
        if self._pending[index] is None and self.frames[index] < policy.limit:
            return False
        self.stop_reasons[index] = self._pending[index] or policy.limit_reason
        return True

    def _keep(self, batch_rows: list[int]) -> None:
        """Keep these batch rows: the others leave the caches and the hidden state."""
        if len(batch_rows) == len(self.rows):
            return
        self.rows = [self.rows[b] for b in batch_rows]
        if not batch_rows:
            return
        index = mx.array(np.asarray(batch_rows, dtype=np.int32))
        self._hidden = self._hidden[index]
        for cache in self.caches:
            cache.keep_rows(batch_rows)


def stream_batch(model: Csm, tokenizer: CsmTokenizer, requests: Sequence[SpeechRequest],
                 temperature: float = 0.9, top_k: int = 50, seed: int | None = None, mimi=None,
                 allow_non_codes: bool = False, stop: str | StopRules = "all",
                 compiled: bool = True) -> BatchSpeechStream:
    """The requests as one batch (see the module docstring), step by step. Sampling options
    and stop rules are shared; each request has its own max_frames. Context audio needs
    `mimi` (its codes are used as they are)."""
    sampler = make_sampler(temperature, top_k)
    prepared = [prepare(model, tokenizer, r, mimi, stop) for r in requests]
    return BatchSpeechStream(model, prepared, sampler, seed, allow_non_codes, compiled)


@dataclass
class BatchResult:
    """What one request produced: frames int32 [T, K] (a trimmed silent tail left out), the
    stop reason, the frames trimmed, and with a Mimi the 24 kHz audio of the frames kept."""

    frames: np.ndarray
    stop_reason: str
    trimmed_frames: int = 0
    audio: np.ndarray | None = None


def collect_batch(stream: BatchSpeechStream, mimi=None,
                  on_done: Callable[[int, BatchResult], None] | None = None
                  ) -> list[BatchResult]:
    """Run a batch to its end -> one result per request. With `mimi`, each request's frames
    are decoded as they come (a streaming decoder each), so its silence rule hears them.
    `on_done(index, result)` is called as each request ends."""
    count = len(stream.stop_reasons)
    frames: list[list[np.ndarray]] = [[] for _ in range(count)]
    pcms: list[list[np.ndarray]] = [[] for _ in range(count)]
    states = [mimi.new_decoder_state() for _ in range(count)] if mimi is not None else None
    results: list[BatchResult | None] = [None] * count
    k = stream.model.cfg.num_codebooks

    def finish_ended() -> None:
        for i, reason in enumerate(stream.stop_reasons):
            if reason is None or results[i] is not None:
                continue
            trim = stream.trim_frames(i) if reason == "silence" else 0
            kept = frames[i][: len(frames[i]) - trim]
            audio = None
            if states is not None:
                kept_pcm = pcms[i][: len(kept)]
                audio = np.concatenate(kept_pcm) if kept_pcm else np.zeros(0, np.float32)
            results[i] = BatchResult(np.stack(kept) if kept else np.zeros((0, k), np.int32),
                                     reason, trim, audio)
            if on_done is not None:
                on_done(i, results[i])

    for step in stream:
        for i, frame in step.items():
            frames[i].append(frame)
            if states is not None:
                pcms[i].append(decode_frame(mimi, frame, states[i]))
                stream.hear(i, pcms[i][-1])
        finish_ended()
    finish_ended()
    return [r for r in results if r is not None]


def generate_batch(model: Csm, tokenizer: CsmTokenizer, requests: Sequence[SpeechRequest],
                   temperature: float = 0.9, top_k: int = 50, seed: int | None = None,
                   mimi=None, allow_non_codes: bool = False, stop: str | StopRules = "all",
                   return_stop: bool = False
                   ) -> list[np.ndarray] | list[tuple[np.ndarray, str]]:
    """Like `generate_speech` for each request, in one batch -> frames int32 [T, K] per
    request (in order), or (frames, stop reason) pairs with return_stop=True. No audio is
    decoded, so the silence rule does not apply (see `collect_batch`)."""
    stream = stream_batch(model, tokenizer, requests, temperature, top_k, seed, mimi,
                          allow_non_codes, stop)
    results = collect_batch(stream)
    if return_stop:
        return [(r.frames, r.stop_reason) for r in results]
    return [r.frames for r in results]
