"""CSM training data: conversations of turns {"speaker", "text", "audio" | "codes"}, their
audio encoded once with our Mimi (cached beside the data), as rows and labels.

A data file is a JSON list of conversations or a JSONL file of one conversation a line; a
conversation is a list of turns; paths are relative to the data file. A turn without audio or
codes is text only (context). The rows of a conversation are what CSM reads at inference
(`speech.generate.segment_rows`); the labels follow transformers' processor: every audio turn
(`train_on="all"`) or only the last turn (`"last"`) is a target, its frames with their codes
and its end-of-audio row with zeros; text rows are never targets.

Bad input refuses the run before training, naming the file, the conversation and the turn.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.errors import AudioError, MoshiError
from moshi_mlx.speech.context import as_int
from moshi_mlx.speech.generate import CsmTokenizer, Segment, segment_rows
from moshi_mlx.training.csm_loss import IGNORE, CsmBatch

TRAIN_ON = ("all", "last")
DATA_SUFFIXES = (".jsonl", ".json")
TURN_KEYS = {"speaker", "text", "audio", "codes"}
CODES_CACHE_SUFFIX = ".mimi-codes.npz"


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Segment, ...]  # text and codes (audio already encoded)
    where: str  # "data.jsonl: conversation 3", for errors


@dataclass(frozen=True)
class Example:
    """One conversation as the model reads it. tokens, mask [S, K + 1]; labels [S, K];
    frame_rows: the labelled audio frames (candidates for leaving the depth loss)."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    frame_rows: np.ndarray


def data_files(path: str | os.PathLike, split: str) -> Path | None:
    """The file of a split ("train", "valid", "test"): `path` itself when it is a file (every
    split reads it), else `<path>/<split>.jsonl` or `.json` (None when absent)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise MoshiError(f"{path}: no such data file or folder")
    for suffix in DATA_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return path / f"{split}{suffix}"
    return None


def read_raw_conversations(path: Path) -> list[object]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise MoshiError(f"{path}: cannot read the data ({exc})") from None
    try:
        if path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoshiError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(items, list) or not items:
        raise MoshiError(f"{path}: expected a non-empty list of conversations")
    return items


class CodesCache:
    """Mimi codes of audio files, by the sha256 of the file's bytes, in one .npz beside the
    data; dropped when made by another Mimi (`mimi_id`)."""

    def __init__(self, data_path: Path, mimi_id: str, encode: Callable[[np.ndarray],
                                                                         np.ndarray]) -> None:
        self.path = data_path.with_name(data_path.name + CODES_CACHE_SUFFIX)
        self.mimi_id = mimi_id
        self.encode = encode
        self.codes: dict[str, np.ndarray] = {}
        self.resampled: set[int] = set()
        self.changed = False
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as stored:
                    if str(stored.get("mimi_id", "")) == mimi_id:
                        self.codes = {k: stored[k] for k in stored.files if k != "mimi_id"}
            except (OSError, ValueError):
                self.codes = {}  # a damaged cache is made again

    def of(self, audio_path: Path) -> np.ndarray:
        import soundfile

        from moshi_mlx.audio.io import read_audio

        try:
            key = hashlib.sha256(audio_path.read_bytes()).hexdigest()
        except OSError:
            raise AudioError(f"{audio_path}: no such audio file") from None
        if key not in self.codes:
            pcm = read_audio(audio_path)
            rate = soundfile.info(str(audio_path)).samplerate
            if rate != SAMPLE_RATE:
                self.resampled.add(rate)
            if pcm.size < 1920:
                raise AudioError(f"{audio_path}: shorter than one 80 ms frame")
            self.codes[key] = np.asarray(self.encode(pcm), dtype=np.int32)
            self.changed = True
        return self.codes[key]

    def save(self) -> None:
        if self.changed:
            np.savez(self.path, mimi_id=np.str_(self.mimi_id), **self.codes)
            self.changed = False


def read_conversations(path: Path, codes_of: Callable[[Path], np.ndarray] | None,
                       num_codebooks: int = 32) -> list[Conversation]:
    """The conversations of a data file, audio turns encoded by `codes_of(audio_path)`
    (None: a turn with audio is refused)."""
    from moshi_mlx.audio.codes import load_codes

    conversations = []
    for c, raw in enumerate(read_raw_conversations(path)):
        where = f"{path}: conversation {c}"
        if not isinstance(raw, list) or not raw:
            raise MoshiError(f"{where}: expected a non-empty list of turns")
        turns = []
        for t, turn in enumerate(raw):
            at = f"{where}, turn {t}"
            if not isinstance(turn, dict) or not {"speaker", "text"} <= turn.keys():
                raise MoshiError(f"{at}: a turn needs 'speaker' and 'text'")
            if set(turn) - TURN_KEYS:
                raise MoshiError(f"{at}: unknown keys {sorted(set(turn) - TURN_KEYS)}")
            if turn.get("audio") and turn.get("codes"):
                raise MoshiError(f"{at}: give 'audio' or 'codes', not both")
            if not isinstance(turn["text"], str) or not turn["text"].strip():
                raise MoshiError(f"{at}: empty text")
            speaker = as_int(turn["speaker"], f"{at}: speaker")
            codes = None
            try:
                if turn.get("audio"):
                    if codes_of is None:
                        raise MoshiError("audio turns need Mimi (codes given here only)")
                    codes = codes_of(path.parent / str(turn["audio"]))
                elif turn.get("codes"):
                    codes = load_codes(path.parent / str(turn["codes"]))
                if codes is not None and codes.shape[0] != num_codebooks:
                    raise MoshiError(f"codes have {codes.shape[0]} codebooks, CSM needs "
                                     f"{num_codebooks}")
                turns.append(Segment(speaker, turn["text"], codes=codes))
            except MoshiError as exc:
                raise type(exc)(f"{at}: {exc}") from None
        conversations.append(Conversation(tuple(turns), where))
    return conversations


def example_of(tokenizer: CsmTokenizer, conversation: Conversation, train_on: str = "all",
               num_codebooks: int = 32, max_rows: int | None = None) -> Example:
    """Rows and labels of one conversation (see the module's docstring)."""
    if train_on not in TRAIN_ON:
        raise MoshiError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    turns = conversation.turns
    targets = [i for i, turn in enumerate(turns) if turn.codes is not None]
    if train_on == "last":
        if turns[-1].codes is None:
            raise MoshiError(f"{conversation.where}: the last turn has no audio to train on "
                             "(--train-on last)")
        targets = [len(turns) - 1]
    if not targets:
        raise MoshiError(f"{conversation.where}: no turn has audio or codes to train on")
    tokens, masks, labels, frames = [], [], [], []
    for i, turn in enumerate(turns):
        for rows, mask in segment_rows(tokenizer, turn, num_codebooks):
            audio = not mask[0, -1]
            label = np.full((len(rows), num_codebooks), IGNORE, np.int32)
            frame = np.zeros(len(rows), bool)
            if audio and i in targets:
                label = rows[:, :-1].copy()  # the frames' codes, then the all-zero EOS row
                frame[:-1] = True
            tokens.append(rows)
            masks.append(mask)
            labels.append(label)
            frames.append(frame)
    example = Example(np.concatenate(tokens), np.concatenate(masks), np.concatenate(labels),
                      np.flatnonzero(np.concatenate(frames)))
    if max_rows is not None and len(example.tokens) > max_rows:
        raise MoshiError(f"{conversation.where}: {len(example.tokens)} rows, more than the "
                         f"model's context of {max_rows}: split it into shorter conversations")
    return example


def make_batch(examples: list[Example], depth_ratio: float = 1.0,
               rng: np.random.Generator | None = None,
               depth_dropped: np.ndarray | None = None) -> CsmBatch:
    """Right-padded batch. Of its n labelled audio frames, int(n * (1 - depth_ratio)) drawn at
    random keep their codebook-0 target but leave the depth loss (transformers'
    `depth_decoder_labels_ratio`); depth_dropped [B, S] bool fixes that choice instead."""
    if not 0.0 <= depth_ratio <= 1.0:
        raise MoshiError(f"the depth decoder labels ratio must be in [0, 1], got {depth_ratio}")
    steps = max(len(e.tokens) for e in examples)
    width = examples[0].tokens.shape[1]
    tokens = np.zeros((len(examples), steps, width), np.int32)
    mask = np.zeros((len(examples), steps, width), bool)
    labels = np.full((len(examples), steps, width - 1), IGNORE, np.int32)
    for b, e in enumerate(examples):
        tokens[b, : len(e.tokens)] = e.tokens
        mask[b, : len(e.tokens)] = e.mask
        labels[b, : len(e.tokens)] = e.labels
    if depth_dropped is None:
        frames = [(b, s) for b, e in enumerate(examples) for s in e.frame_rows]
        drop = int(len(frames) * (1.0 - depth_ratio))
        depth_dropped = np.zeros((len(examples), steps), bool)
        if drop:
            rng = rng or np.random.default_rng()
            for i in rng.permutation(len(frames))[:drop]:
                depth_dropped[frames[i]] = True
    labels[depth_dropped[:, :steps], 1:] = IGNORE
    return CsmBatch.from_numpy(tokens, mask, labels)


def training_batches(examples: list[Example], batch_size: int, rng: np.random.Generator,
                     depth_ratio: float = 1.0) -> Iterator[CsmBatch]:
    """Endless batches of `batch_size` examples, reshuffled each pass (a pass's remainder
    that does not fill a batch waits for the next pass's shuffle)."""
    if batch_size > len(examples):
        raise MoshiError(f"--batch-size {batch_size} is more than the {len(examples)} "
                         "training conversations")
    while True:
        order = rng.permutation(len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [examples[i] for i in order[start : start + batch_size]]
            yield make_batch(chosen, depth_ratio, rng)


def evaluation_batches(examples: list[Example], batch_size: int,
                       depth_ratio: float = 1.0, seed: int = 0) -> Iterator[CsmBatch]:
    """Every example once, in order, `batch_size` at a time (the last batch may be smaller);
    depth frames drawn from a fixed seed so evaluations compare."""
    rng = np.random.default_rng(seed)
    for start in range(0, len(examples), batch_size):
        yield make_batch(examples[start : start + batch_size], depth_ratio, rng)
