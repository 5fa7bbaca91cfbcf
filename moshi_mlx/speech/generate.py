"""Text (+ conversation context) to Mimi frames with Sesame CSM, following Sesame's recipe.

Prompt: for each context segment, the text rows of `<|begin_of_text|>[speaker]text<|end_of_text|>`,
then one row per Mimi frame of its audio, then one all-zero audio row (end of audio); then the
text rows of the target turn. Each generated frame is fed back as one audio row. Generation
stops on an all-zero frame (not emitted), after `max_frames`, or by the other rules of
moshi_mlx.speech.stopping (`stop="eos"` keeps only Sesame's rule and the explicit limits).

Ids 2048..2050 of the 2051-entry audio vocabulary are not Mimi codes (every reference's Mimi
decoder fails on them). By default (`allow_non_codes=False`) their logits are masked before
sampling, so every returned frame decodes; `allow_non_codes=True` samples from the full
vocabulary exactly as the references do (the parity tests use it) and `frames_to_audio`
refuses such frames instead of passing them to Mimi.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from moshi_mlx.errors import MoshiError, WeightsError
from moshi_mlx.models.csm import Csm
from moshi_mlx.modules.sampling import Sampler, new_key
from moshi_mlx.speech.stopping import StopPolicy, StopRules

MIMI_CODES = 2048  # valid Mimi code ids are 0..2047
SENTENCE_ROOM_FRAMES = 250  # 20 s: room kept for each sentence of a long text


@dataclass(frozen=True)
class Segment:
    """One conversation turn: a speaker id, its text, and optionally its audio (24 kHz mono
    float samples) or its Mimi codes [num_codebooks, frames]."""

    speaker: int
    text: str
    audio: np.ndarray | None = None
    codes: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_speaker(self.speaker)
        if not isinstance(self.text, str):
            raise MoshiError(f"segment text must be a string, got {type(self.text).__name__}")
        if (self.audio is not None or self.codes is not None) and not self.text.strip():
            raise MoshiError("a context audio needs its text (the transcript of what is said)")
        if self.audio is not None and self.codes is not None:
            raise MoshiError("give a segment its audio or its codes, not both")


def check_speaker(speaker: object) -> int:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise MoshiError(f"speaker must be a non-negative int, got {speaker!r}")
    return int(speaker)


class CsmTokenizer:
    """Text turns -> token ids with Sesame's template
    `<|begin_of_text|>[speaker]text<|end_of_text|>` (no space after the bracket), through a HF
    `tokenizer.json`."""

    BOS = "<|begin_of_text|>"
    EOS = "<|end_of_text|>"

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: not a tokenizer.json ({exc})") from None
        bos, eos = self.tokenizer.token_to_id(self.BOS), self.tokenizer.token_to_id(self.EOS)
        if bos is None or eos is None:
            raise WeightsError(f"{path}: no {self.BOS} / {self.EOS} tokens (not a Llama-3 "
                               "tokenizer)")
        self.bos, self.eos = bos, eos

    def encode_turn(self, speaker: int, text: str) -> list[int]:
        ids = self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [self.bos, *ids, self.eos]


def load_tokenizer(path_or_repo: str | os.PathLike) -> CsmTokenizer:
    """tokenizer.json: a file, a folder holding it, or a Hugging Face repo id."""
    from moshi_mlx.loading.hub import TOKENIZER_JSON_NAME, resolve_file

    return CsmTokenizer(resolve_file(path_or_repo, TOKENIZER_JSON_NAME))


def encode_context_audio(mimi, segment: Segment, num_codebooks: int = 32) -> Segment:
    """The segment with its audio replaced by Mimi codes (a no-op for codes or text only)."""
    if segment.audio is None:
        return segment
    pcm = np.asarray(segment.audio, dtype=np.float32).reshape(-1)
    if pcm.size == 0:
        raise MoshiError("a context audio holds no samples")
    if mimi.num_codebooks != num_codebooks:
        raise MoshiError(f"Mimi encodes {mimi.num_codebooks} codebooks, CSM needs "
                         f"{num_codebooks}")
    codes = np.asarray(mimi.encode(pcm[None, None]))[0].astype(np.int32)
    return Segment(segment.speaker, segment.text, codes=codes)


def build_prompt(tokenizer: CsmTokenizer, context: Sequence[Segment], speaker: int, text: str,
                 num_codebooks: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Prompt rows: tokens int32 [S, K + 1] and mask bool [S, K + 1] (columns 0..K-1 audio
    codebooks, column K text)."""
    rows: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for seg in context:
        for part, mask in segment_rows(tokenizer, seg, num_codebooks):
            rows.append(part)
            masks.append(mask)
    rows.append(text_rows(tokenizer, check_speaker(speaker), text, num_codebooks))
    masks.append(text_mask(len(rows[-1]), num_codebooks))
    return np.concatenate(rows), np.concatenate(masks)


def text_rows(tokenizer: CsmTokenizer, speaker: int, text: str, num_codebooks: int = 32
              ) -> np.ndarray:
    """The rows of one turn's text: its token ids in column K, zeros elsewhere."""
    ids = np.asarray(tokenizer.encode_turn(speaker, text), dtype=np.int32)
    rows = np.zeros((len(ids), num_codebooks + 1), np.int32)
    rows[:, -1] = ids
    return rows


def text_mask(length: int, num_codebooks: int = 32) -> np.ndarray:
    mask = np.zeros((length, num_codebooks + 1), bool)
    mask[:, -1] = True
    return mask


def segment_rows(tokenizer: CsmTokenizer, seg: Segment, num_codebooks: int = 32
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One context turn as (rows, mask) parts: its text rows, then (with codes) one row per
    audio frame and the all-zero end-of-audio row."""
    if not isinstance(seg, Segment):
        raise MoshiError(f"context items must be Segments, got {type(seg).__name__}")
    if seg.audio is not None:
        raise MoshiError("encode context audio first (encode_context_audio, or pass mimi=)")
    text = text_rows(tokenizer, seg.speaker, seg.text, num_codebooks)
    parts = [(text, text_mask(len(text), num_codebooks))]
    if seg.codes is None:
        return parts
    codes = np.asarray(seg.codes)
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise MoshiError(f"context codes must be [{num_codebooks}, frames], got "
                         f"{codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= MIMI_CODES):
        raise MoshiError(f"context codes must be Mimi codes 0..{MIMI_CODES - 1}")
    audio = np.zeros((codes.shape[1] + 1, num_codebooks + 1), np.int32)  # + the EOS row
    audio[:-1, :-1] = codes.T
    mask = np.zeros_like(audio, dtype=bool)
    mask[:, :-1] = True
    parts.append((audio, mask))
    return parts


class ContextCache:
    """The backbone KV caches of one model plus the rows (tokens, mask) they hold. A call whose
    prompt starts with rows already held only computes the rest: a conversation re-sends its
    whole history every turn, and each generated turn's frames are already in the cache."""

    def __init__(self, model: Csm) -> None:
        self.model = model
        self.caches = model.backbone_cache()
        width = model.cfg.num_codebooks + 1
        self.tokens = np.zeros((0, width), np.int32)
        self.mask = np.zeros((0, width), bool)
        self.reused = 0  # rows the last prefill took from the cache

    def __len__(self) -> int:
        return len(self.tokens)

    def prefill(self, tokens: np.ndarray, mask: np.ndarray) -> mx.array:
        """Make the caches hold exactly these prompt rows -> hidden state at the last one."""
        held = min(len(self.tokens), len(tokens) - 1)  # recompute at least the last row
        same = np.all((self.tokens[:held] == tokens[:held]) & (self.mask[:held] == mask[:held]),
                      axis=1)
        reuse = held if same.all() else int(np.argmin(same))
        self.rewind(reuse)
        self.reused = reuse
        x = self.model.embed_frames(mx.array(tokens[reuse:])[None], mx.array(mask[reuse:])[None])
        self.tokens, self.mask = tokens.copy(), mask.copy()
        return self.model.backbone_step(x, self.caches)

    def feed_frame(self, frame: mx.array, compiled: bool = True) -> mx.array:
        """Append a generated frame (lazy [1, K]) as an audio row -> the next hidden state.
        The row is recorded by `commit_frame` once its codes are known."""
        return self.model.backbone_step(self.model.embed_audio_frame(frame), self.caches,
                                        compiled)

    def commit_frame(self, codes: np.ndarray) -> None:
        row = np.zeros((1, self.tokens.shape[1]), np.int32)
        row[0, :-1] = codes
        mask = np.zeros_like(row, dtype=bool)
        mask[0, :-1] = True
        self.tokens = np.concatenate([self.tokens, row])
        self.mask = np.concatenate([self.mask, mask])

    def rewind(self, length: int) -> None:
        for cache in self.caches:
            cache.rewind(length)
        self.tokens, self.mask = self.tokens[:length], self.mask[:length]


class SpeechStream:
    """Iterator over generated frames (np.int32 [K] each). After it ends, `stop_reason` names
    why (moshi_mlx.speech.stopping: "eos", "repeat", "silence", "budget", "max", "context").
    `hear(pcm)` feeds a frame's decoded audio to the silence rule (`stream_decoded` does it);
    after a "silence" stop the last `trim_frames` frames are the quiet tail to drop.
    `record_logits` keeps each step's codebook-0 logits and each frame's depth logits [K-1, V]
    (float32 numpy).

    Each frame is one lazy graph (codebook 0, the 31 depth steps and their sampling); the next
    backbone step is queued behind it before the host reads the codes for the EOS check."""

    def __init__(self, model: Csm, tokens: np.ndarray, mask: np.ndarray, policy: StopPolicy,
                 sampler: Sampler, seed: int | None, allow_non_codes: bool,
                 record_logits: bool = False, cache: ContextCache | None = None,
                 compiled: bool = True) -> None:
        if cache is not None and cache.model is not model:
            raise MoshiError("this ContextCache belongs to another model")
        self.model, self.sampler, self.policy = model, sampler, policy
        self.max_frames = policy.limit
        self._pending_stop: str | None = None
        self.key = None if sampler.greedy else new_key(seed)
        self.record_logits = record_logits
        self.compiled = compiled
        self.c0_logits: list[np.ndarray] = []
        self.depth_logits: list[np.ndarray] = []
        self.stop_reason: str | None = None
        self.frames = 0
        mask_non_codes = not allow_non_codes and model.cfg.audio_vocab_size > MIMI_CODES
        if compiled:  # one graph for the whole frame: 32 heads and samplings, 31 depth steps
            self._run_frame = model.frame_graph(
                ("frame", sampler, mask_non_codes),
                lambda: frame_function(model, sampler, mask_non_codes))
        else:
            self._run_frame = frame_function(model, sampler, mask_non_codes)
        self.cache = cache if cache is not None else ContextCache(model)
        self._hidden = self.cache.prefill(tokens, mask)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def _frame(self, h: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Hidden state [1, dim] -> (frame codes [1, K], codebook-0 logits, depth logits
        [1, K-1, V]); advances the PRNG key when sampling."""
        key = self.key if self.key is not None else GREEDY_KEY
        codes, c0_logits, depth, next_key = self._run_frame(h, key)
        if self.key is not None:
            self.key = next_key
        return codes, c0_logits, depth

    def hear(self, pcm: np.ndarray) -> str | None:
        """The decoded audio of the frame just returned -> "silence" when it ends the stream
        (the next call stops), else None. Once a stop is decided, audio changes nothing."""
        if self.stop_reason is not None or self._pending_stop is not None:
            return None
        self._pending_stop = self.policy.on_audio(pcm)
        return self._pending_stop

    @property
    def trim_frames(self) -> int:
        return self.policy.trim_frames

    @property
    def may_trim(self) -> int:
        """How many of the latest frames a silence stop could still drop."""
        return 0 if self.stop_reason is not None else self.policy.may_trim

    def __next__(self) -> np.ndarray:
        if self.stop_reason is not None:
            raise StopIteration
        if self._pending_stop is not None or self.frames >= self.max_frames:
            self.stop_reason = self._pending_stop or self.policy.limit_reason
            raise StopIteration
        frame, c0_logits, depth = self._frame(self._hidden)
        last = self.frames + 1 >= self.max_frames
        if last:  # no next step: the budget check counted only max_frames positions
            mx.eval(frame)
        else:
            next_hidden = self.cache.feed_frame(frame, self.compiled)
            mx.async_eval(frame, next_hidden)
        if self.record_logits:
            self.c0_logits.append(np.asarray(c0_logits[0].astype(mx.float32)))
            self.depth_logits.append(np.asarray(depth[0].astype(mx.float32)))
        codes = np.asarray(frame[0]).astype(np.int32)
        reason = self.policy.on_frame(codes)
        if reason == "eos":
            self.stop_reason = "eos"
            if not last:  # the zero frame went into the backbone cache: take it out
                mx.eval(next_hidden)
                self.cache.rewind(len(self.cache))
            raise StopIteration
        self.frames += 1
        if not last:
            self.cache.commit_frame(codes)
            self._hidden = next_hidden
        self._pending_stop = reason
        return codes


GREEDY_KEY = mx.random.key(0)  # a placeholder input: greedy picks read no key


def frame_function(model: Csm, sampler: Sampler, mask_non_codes: bool) -> Callable:
    """(hidden [B, dim], key) -> (codes, codebook-0 logits, depth logits, next key): one frame
    with its 32 samplings, free of host syncs and of references to the stream (the model is
    held weakly: the model keeps the compiled graph)."""
    model_ref = weakref.ref(model)
    k, vocab = model.cfg.num_codebooks, model.cfg.audio_vocab_size

    def frame(h: mx.array, key: mx.array) -> tuple[mx.array, ...]:
        bias = mx.where(mx.arange(vocab) >= MIMI_CODES, -mx.inf, 0.0) if mask_non_codes \
            else None
        next_key, frame_key = mx.random.split(key)
        keys = mx.random.split(frame_key, k)

        def pick(logits: mx.array, codebook: int) -> mx.array:
            logits = logits.astype(mx.float32)
            if bias is not None:
                logits = logits + bias
            return sampler(logits, None if sampler.greedy else keys[codebook])

        return (*model_ref().frame(h, pick), next_key)

    return frame


def stream_speech(model: Csm, tokenizer: CsmTokenizer, text: str, speaker: int = 0,
                  context: Sequence[Segment] = (), temperature: float = 0.9, top_k: int = 50,
                  max_frames: int | None = None, seed: int | None = None, mimi=None,
                  allow_non_codes: bool = False, record_logits: bool = False,
                  cache: ContextCache | None = None, compiled: bool = True,
                  stop: str | StopRules = "all") -> SpeechStream:
    """Like `generate_speech`, as an iterator of frames (np.int32 [K]) produced one by one;
    its `stop_reason` tells why it ended. compiled=False runs every op eagerly (same results;
    for debugging and comparison)."""
    rules = StopRules.of(stop)
    sampler = make_sampler(temperature, top_k)
    tokens, mask, policy = prepare_request(model, tokenizer, text, speaker, context, max_frames,
                                           mimi, rules)
    return SpeechStream(model, tokens, mask, policy, sampler, seed, allow_non_codes,
                        record_logits, cache, compiled)


def make_sampler(temperature: float, top_k: int) -> Sampler:
    if temperature < 0:
        raise MoshiError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise MoshiError(f"top_k must be >= 0, got {top_k}")
    return Sampler(temp=float(temperature), top_k=int(top_k))


def prepare_request(model: Csm, tokenizer: CsmTokenizer, text: str, speaker: int,
                    context: Sequence[Segment], max_frames: int | None, mimi,
                    rules: StopRules) -> tuple[np.ndarray, np.ndarray, StopPolicy]:
    """One request checked -> its prompt rows (tokens, mask) and the stop policy of its
    generation (its frame limit within the 2048-position context)."""
    if not isinstance(text, str) or not text.strip():
        raise MoshiError("nothing to say: the text is empty")
    k = model.cfg.num_codebooks
    segments = []
    for seg in context:
        if isinstance(seg, Segment) and seg.audio is not None:
            if mimi is None:
                raise MoshiError("a context segment has audio: pass mimi= to encode it")
            seg = encode_context_audio(mimi, seg, k)
        segments.append(seg)
    tokens, mask = build_prompt(tokenizer, segments, speaker, text, k)
    budget = model.cfg.backbone.max_seq_len
    if max_frames is not None and (isinstance(max_frames, bool)
                                   or not isinstance(max_frames, int) or max_frames < 1):
        raise MoshiError(f"max_frames must be a positive int, got {max_frames!r}")
    max_frames, limit_reason = rules.limit(text, budget - 1 - len(tokens), max_frames)
    if len(tokens) + max_frames >= budget or max_frames < 1:
        raise MoshiError(f"text and context too long: the prompt takes {len(tokens)} positions, "
                         f"plus {max(max_frames, 1)} frames to generate must stay under "
                         f"{budget}; shorten the text or context")
    return tokens, mask, rules.policy(max_frames, limit_reason)


def generate_speech(model: Csm, tokenizer: CsmTokenizer, text: str, speaker: int = 0,
                    context: Sequence[Segment] = (), temperature: float = 0.9, top_k: int = 50,
                    max_frames: int | None = None, seed: int | None = None, mimi=None,
                    allow_non_codes: bool = False, cache: ContextCache | None = None,
                    stop: str | StopRules = "all", return_stop: bool = False
                    ) -> np.ndarray | tuple[np.ndarray, str]:
    """Speak `text` as `speaker`, conditioned on earlier turns -> frames int32 [T, K], or
    (frames, stop reason) with return_stop=True.

    temperature 0: greedy. max_frames None: the frame budget of the text (stop="all"; Sesame's
    90 s with stop="eos"), capped by the 2048-position context left after the prompt. No audio
    is decoded here, so the silence rule does not apply (see `stream_decoded`). Context
    segments with audio need `mimi` (32 codebooks). `cache`: a ContextCache kept across calls,
    so a context already processed is not computed again."""
    stream = stream_speech(model, tokenizer, text, speaker, context, temperature, top_k,
                           max_frames, seed, mimi, allow_non_codes, cache=cache, stop=stop)
    frames = list(stream)
    k = model.cfg.num_codebooks
    result = np.stack(frames) if frames else np.zeros((0, k), np.int32)
    return (result, stream.stop_reason) if return_stop else result


def check_mimi_codes(frames: np.ndarray) -> np.ndarray:
    """Frames [T, K] as Mimi codes [1, K, T]; ids >= 2048 are refused, never decoded."""
    frames = np.asarray(frames)
    if frames.size and (frames.min() < 0 or frames.max() >= MIMI_CODES):
        t, c = np.argwhere((frames < 0) | (frames >= MIMI_CODES))[0]
        raise MoshiError(f"frame {t} codebook {c} holds id {frames[t, c]}, not a Mimi code "
                         "(generated with allow_non_codes=True?)")
    return frames.T[None].astype(np.int32)


def frames_to_audio(mimi, frames: np.ndarray) -> np.ndarray:
    """Decode frames [T, K] with Mimi -> 24 kHz mono float32 [T * 1920]."""
    if len(frames) == 0:
        return np.zeros(0, np.float32)
    return np.asarray(mimi.decode(check_mimi_codes(frames)))[0, 0].astype(np.float32)


def stream_audio(mimi, frames) -> Iterator[np.ndarray]:
    """Decode frames (np.int32 [K] each, e.g. from `stream_speech`) one by one through Mimi's
    streaming decoder -> 1920-sample float32 chunks (no clicks between frames). Each call is
    a stream of its own: several may run on one Mimi."""
    state = mimi.new_decoder_state()
    for frame in frames:
        yield decode_frame(mimi, frame, state)


def decode_frame(mimi, frame: np.ndarray, state) -> np.ndarray:
    """One frame (np.int32 [K]) through Mimi's streaming decoder -> 1920 float32 samples."""
    pcm = mimi.decode_step(check_mimi_codes(np.asarray(frame)[None]), state)
    return np.asarray(pcm)[0, 0].astype(np.float32)


def stream_decoded(mimi, speech: Iterable[np.ndarray],
                   on_audio: Callable[[np.ndarray], None] | None = None
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(frame, its 1920-sample audio) for each frame of `speech`, decoded as it comes through
    Mimi's streaming decoder. When `speech` is a SpeechStream or LongSpeechStream, each frame's
    audio is fed to its stop rules (`hear`), and frames a silence stop could still drop are
    held back until louder audio or the end releases them: a trimmed tail is never yielded.
    `on_audio` gets every frame's audio at once, held or not (a speaker has no use for the
    delay: a pause plays as it comes)."""
    state = mimi.new_decoder_state()
    hear = getattr(speech, "hear", None)
    held: list[tuple[np.ndarray, np.ndarray]] = []
    for frame in speech:
        held.append((frame, decode_frame(mimi, frame, state)))
        if on_audio is not None:
            on_audio(held[-1][1])
        keep = 0
        if hear is not None:
            if hear(held[-1][1]) == "silence":
                del held[len(held) - speech.trim_frames:]
            else:
                keep = speech.may_trim
        while len(held) > keep:
            yield held.pop(0)
    yield from held


_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])\s+")


def split_sentences(text: str) -> list[str]:
    """Split on whitespace after sentence-ending punctuation (and on blank lines)."""
    parts = []
    for paragraph in re.split(r"\n\s*\n", text):
        parts += [s.strip() for s in _SENTENCE_END.split(paragraph.replace("\n", " "))]
    return [p for p in parts if p]


def stream_long_speech(model: Csm, tokenizer: CsmTokenizer, text: str, speaker: int = 0,
                       context: Sequence[Segment] = (), temperature: float = 0.9,
                       top_k: int = 50, max_frames: int | None = None, seed: int | None = None,
                       mimi=None, stop: str | StopRules = "all") -> LongSpeechStream:
    """Speak a text of any length sentence by sentence: each sentence is one turn conditioned
    on `context` plus the turns generated so far (oldest generated turns are dropped when the
    2048-position budget runs short, keeping room for `max_frames`, or for 20 s when it is
    None). `max_frames` and the stop rules apply to each sentence; sentence i uses seed + i.
    Yields frames (np.int32 [K])."""
    sentences = split_sentences(text) if isinstance(text, str) else []
    if not sentences:
        raise MoshiError("nothing to say: the text is empty")
    return LongSpeechStream(model, tokenizer, sentences, speaker, context, temperature, top_k,
                            max_frames, seed, mimi, StopRules.of(stop))


class LongSpeechStream:
    """The frames of several sentences, one SpeechStream each (see `stream_long_speech`).
    `stop_reasons`: each finished sentence's reason; `trimmed_frames`: the silent tails
    dropped in all; `hear`, `trim_frames` and `may_trim` act on the sentence being spoken."""

    def __init__(self, model: Csm, tokenizer: CsmTokenizer, sentences: list[str], speaker: int,
                 context: Sequence[Segment], temperature: float, top_k: int,
                 max_frames: int | None, seed: int | None, mimi, rules: StopRules) -> None:
        k = model.cfg.num_codebooks
        self.model, self.tokenizer, self.speaker = model, tokenizer, speaker
        self.base = [encode_context_audio(mimi, s, k) if s.audio is not None and mimi is not None
                     else s for s in context]
        self.sampling = (temperature, top_k)
        self.max_frames, self.seed, self.mimi, self.rules = max_frames, seed, mimi, rules
        self.stop_reasons: list[str] = []
        self.trimmed_frames = 0
        self._sentences = list(enumerate(sentences))
        self._spoken: list[Segment] = []
        self._cache = ContextCache(model)
        self._current: SpeechStream | None = None
        self._sentence = ""
        self._frames: list[np.ndarray] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    @property
    def stop_reason(self) -> str | None:
        return self.stop_reasons[-1] if self.stop_reasons else None

    def hear(self, pcm: np.ndarray) -> str | None:
        return self._current.hear(pcm) if self._current is not None else None

    @property
    def trim_frames(self) -> int:
        return self._current.trim_frames if self._current is not None else 0

    @property
    def may_trim(self) -> int:
        return self._current.may_trim if self._current is not None else 0

    def __next__(self) -> np.ndarray:
        while True:
            if self._current is None:
                if not self._sentences:
                    raise StopIteration
                self._current = self._start(*self._sentences.pop(0))
            try:
                frame = next(self._current)
            except StopIteration:
                self._finish()
                continue
            self._frames.append(frame)
            return frame

    def _start(self, index: int, sentence: str) -> SpeechStream:
        k = self.model.cfg.num_codebooks
        need = self.max_frames if self.max_frames is not None else SENTENCE_ROOM_FRAMES
        while self._spoken and _prompt_length(self.tokenizer, [*self.base, *self._spoken],
                                              self.speaker, sentence, k) \
                + need >= self.model.cfg.backbone.max_seq_len:
            self._spoken.pop(0)
        self._sentence = sentence
        return stream_speech(self.model, self.tokenizer, sentence, self.speaker,
                             [*self.base, *self._spoken], *self.sampling, self.max_frames,
                             None if self.seed is None else self.seed + index, self.mimi,
                             cache=self._cache, stop=self.rules)

    def _finish(self) -> None:
        stream, frames = self._current, self._frames
        self.stop_reasons.append(stream.stop_reason)
        trim = stream.trim_frames if stream.stop_reason == "silence" else 0
        self.trimmed_frames += trim
        frames = frames[: len(frames) - trim]
        if frames:
            self._spoken.append(Segment(self.speaker, self._sentence, codes=_as_codes(frames)))
        self._current, self._frames = None, []


def _as_codes(frames: list[np.ndarray]) -> np.ndarray:
    """Generated frames as context codes [K, T] (non-codes, if allowed, become 0)."""
    codes = np.stack(frames).T.copy()
    codes[codes >= MIMI_CODES] = 0
    return codes


def _prompt_length(tokenizer: CsmTokenizer, context: Sequence[Segment], speaker: int,
                   text: str, k: int) -> int:
    return len(build_prompt(tokenizer, context, speaker, text, k)[0])
