"""Moshi's fine-tuning data, cut and tokenized as kyutai-labs/moshi-finetune does.

A data set is a `.jsonl` of `{"path": ..., "duration": seconds}` lines (paths relative to the
`.jsonl`'s folder). Each path is a stereo audio file: left channel = Moshi, right = the user;
beside it a `.json` of word alignments `{"alignments": [[word, [start, end], speaker], ...]}`
(seconds). Only the words of `MAIN_SPEAKER` (Moshi's channel) make the text stream.

Each file is cut into chunks of `duration_sec` (start times k * duration_sec, as float32, while
below the `.jsonl` duration); the last one keeps only the real audio and is padded. A chunk
becomes codes [1 + 2K, N], N = ceil(duration_sec * 12.5): the text stream, Moshi's K
codebooks, the user's K (Mimi run on each chunk alone; -1 past the real audio).

The text stream is moshi-finetune's Interleaver: a word's tokens from its start frame on, one a
frame (frame t takes the words starting before t + 1 frames), EPAD on the frame before a word
when it was PAD, PAD elsewhere; a word still being written is cut short when the next starts.

Past the real audio of a padded last chunk, moshi-finetune's text is not -1: it hands the
Interleaver the chunk's frame count R where seconds are expected, so the stream runs
ceil(12.5 R) frames (cropped to N): PAD, and any word aligned there, up to that, -1 after. Those
PAD targets count in its text loss. `mask_text_past_audio=False` (the default) reproduces it, so
losses equal moshi-finetune's; True makes every text target past the real audio -1.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from moshi_mlx.audio.rates import FRAME_RATE, SAMPLE_RATE
from moshi_mlx.errors import AudioError, TrainingDataError
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.training.moshi_loss import END_OF_TEXT_PADDING_ID

MAIN_SPEAKER = "SPEAKER_MAIN"  # moshi-finetune's label of Moshi's (left) channel
OTHER_SPEAKER = "SPEAKER_OTHER"  # what our annotate calls the user's channel
TEXT_PADDING_ID = LmConfig.existing_text_padding_id  # Moshi's PAD (the config's default)
DURATION_SEC = 10.0  # moshi-finetune's default chunk


class Word(NamedTuple):
    text: str
    start: float
    end: float
    speaker: str


def read_alignments(path: str | Path) -> list[Word]:
    """The words of an alignments .json, in file order; TrainingDataError naming the file
    when it is missing or does not hold `{"alignments": [[word, [start, end], speaker]]}`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingDataError(f"{path}: no alignments file (make it with "
                                "`moshi-finetune annotate`)") from None
    except (OSError, ValueError) as exc:
        raise TrainingDataError(f"{path}: cannot read the alignments ({exc})") from None
    entries = data.get("alignments") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise TrainingDataError(f'{path}: expected {{"alignments": [...]}}')
    words = []
    for index, entry in enumerate(entries):
        try:
            text, (start, end), speaker = entry
            words.append(Word(str(text), float(start), float(end), str(speaker)))
        except (TypeError, ValueError):
            raise TrainingDataError(f"{path}: alignment {index} is not "
                                    "[word, [start, end], speaker]: {entry!r}") from None
    return words


def tokenize_word(tokenizer: Any, word: str) -> list[int]:
    """A word's text tokens, as moshi-finetune tokenizes it (stripped; lines joined by the
    newline piece)."""
    lines = word.strip().split("\n")
    tokens = list(tokenizer.encode(lines[0]))
    for line in lines[1:]:
        tokens += [tokenizer.encode("\n")[-1], *tokenizer.encode(line)]
    return tokens


def text_stream(words: Sequence[Word], steps: int, tokenizer: Any,
                pad_id: int = TEXT_PADDING_ID, epad_id: int = END_OF_TEXT_PADDING_ID
                ) -> list[int]:
    """The Interleaver's text stream of `steps` frames from words timed from frame 0 (only
    `MAIN_SPEAKER`'s words of positive duration, in start order)."""
    kept = [(tokenize_word(tokenizer, w.text), w.start)
            for w in sorted(words, key=lambda w: w.start)
            if w.speaker == MAIN_SPEAKER and w.start < w.end]
    tokens = [pad_id] * steps
    pending: deque[int] = deque()
    next_word = 0
    for t in range(steps):
        while next_word < len(kept) and kept[next_word][1] * FRAME_RATE < t + 1:
            pending = deque(kept[next_word][0])  # a word still being written is cut short
            next_word += 1
        if pending:
            if t > 0 and tokens[t - 1] == pad_id:
                tokens[t - 1] = epad_id
            tokens[t] = pending.popleft()
    return tokens


def first_starting_at(words: Sequence[Word], time: float) -> int:
    """moshi-finetune's bisection: the index of the first word starting at or after `time`
    (assuming the file lists words in start order, as it does)."""
    low, high = 0, len(words)
    while low < high:
        middle = (low + high) // 2
        if words[middle].start < time:
            low = middle + 1
        else:
            high = middle
    return low


def chunk_starts(duration: float, duration_sec: float) -> list[float]:
    """Start times (seconds, float32 values as moshi-finetune's reader gives them) of the chunks
    of a file of `duration` seconds."""
    starts = []
    k = 0
    while k * duration_sec < duration:
        starts.append(float(np.float32(k * duration_sec)))
        k += 1
    return starts


def chunk_text(words: Sequence[Word], start_sec: float, duration_sec: float, real_frames: int,
               tokenizer: Any, pad_id: int = TEXT_PADDING_ID,
               epad_id: int = END_OF_TEXT_PADDING_ID, mask_text_past_audio: bool = False
               ) -> np.ndarray:
    """The text stream [N] of the chunk at `start_sec` whose real audio is `real_frames`
    frames (N = ceil(duration_sec * 12.5)); see the module docstring for what lies past the
    real audio."""
    frames = math.ceil(duration_sec * FRAME_RATE)
    first = first_starting_at(words, start_sec)
    last = first_starting_at(words, start_sec + duration_sec)
    shifted = [Word(w.text, w.start - start_sec, w.end - start_sec, w.speaker)
               for w in words[first:last]]
    # moshi-finetune passes the frame count as seconds: ceil(12.5 R) frames, cropped to N.
    steps = frames if mask_text_past_audio else math.ceil(real_frames * FRAME_RATE)
    stream = text_stream(shifted, steps, tokenizer, pad_id, epad_id)[:frames]
    text = np.full(frames, -1, dtype=np.int32)
    keep = real_frames if mask_text_past_audio else len(stream)
    text[:keep] = stream[:keep]
    return text


@dataclass(frozen=True)
class Entry:
    path: Path
    duration: float


def read_jsonl(path: str | Path) -> list[Entry]:
    """The entries of a data .jsonl (audio paths resolved against its folder)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TrainingDataError(f"{path}: cannot read the data list ({exc.strerror})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            entries.append(Entry(path.parent / data["path"], float(data["duration"])))
        except (ValueError, TypeError, KeyError):
            raise TrainingDataError(f'{path}:{number}: expected {{"path": ..., "duration": '
                                    "seconds}") from None
    if not entries:
        raise TrainingDataError(f"{path}: the data list is empty")
    return entries


Encoder = Callable[[np.ndarray], np.ndarray]  # float32 pcm [C, S] at 24 kHz -> codes [C, K, F]


def mimi_encoder(mimi: Any) -> Encoder:
    """Our Mimi as the encoder of `MoshiDataset` (each chunk encoded alone, as moshi-finetune
    does)."""
    import mlx.core as mx

    def encode(pcm: np.ndarray) -> np.ndarray:
        return np.array(mimi.encode(mx.array(pcm[:, None, :])))

    return encode


class MoshiDataset:
    """moshi-finetune's chunks of the files of a `.jsonl` as codes [1 + 2K, N].

    Every audio and alignments file is checked when the set is made: a missing or unreadable
    file, a mono file or a `.jsonl` duration longer than the audio refuse the whole set before
    training (TrainingDataError naming the file). Other rates are resampled to 24 kHz, said
    once through `notice`; so are files without a word of Moshi's and words aligned past the
    end of their audio (kept, as moshi-finetune keeps them, unless `mask_text_past_audio`).
    Codes are made on first use and kept.
    """

    def __init__(self, jsonl: str | Path, tokenizer: Any, encode: Encoder,
                 duration_sec: float = DURATION_SEC, pad_id: int = TEXT_PADDING_ID,
                 epad_id: int = END_OF_TEXT_PADDING_ID, mask_text_past_audio: bool = False,
                 notice: Callable[[str], None] = print) -> None:
        if not duration_sec > 0:
            raise TrainingDataError(f"duration_sec must be > 0, got {duration_sec}")
        self.tokenizer = tokenizer
        self.encode = encode
        self.duration_sec = duration_sec
        self.pad_id, self.epad_id = pad_id, epad_id
        self.mask_text_past_audio = mask_text_past_audio
        self.entries = read_jsonl(jsonl)
        self.words = [read_alignments(e.path.with_suffix(".json")) for e in self.entries]
        self._check_audio(notice)
        self.chunks = [(index, start) for index, entry in enumerate(self.entries)
                       for start in chunk_starts(entry.duration, duration_sec)]
        self._codes: dict[int, np.ndarray] = {}
        self._audio: tuple[int, np.ndarray] | None = None  # the last file read, [2, S]

    @property
    def frames(self) -> int:
        return math.ceil(self.duration_sec * FRAME_RATE)

    def _check_audio(self, notice: Callable[[str], None]) -> None:
        import soundfile

        rates, silent, late = set(), 0, 0
        for entry, words in zip(self.entries, self.words, strict=True):
            if not entry.path.is_file():
                raise TrainingDataError(f"{entry.path}: no such audio file")
            try:
                info = soundfile.info(str(entry.path))
            except Exception as exc:  # soundfile raises several kinds
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
                raise TrainingDataError(f"{entry.path}: cannot read audio ({reason})") from None
            if info.channels != 2:
                raise TrainingDataError(f"{entry.path}: {info.channels} channel(s); Moshi's "
                                        "data are stereo (left Moshi, right the user)")
            seconds = info.frames / info.samplerate
            if entry.duration > seconds + 1 / info.samplerate:
                raise TrainingDataError(f"{entry.path}: the data list says {entry.duration:.3f} "
                                        f"s, the audio holds {seconds:.3f} s")
            if info.samplerate != SAMPLE_RATE:
                rates.add(info.samplerate)
            main = [w for w in words if w.speaker == MAIN_SPEAKER and w.text.strip()]
            silent += not main
            late += sum(w.start >= seconds for w in main)
        if rates:
            notice(f"audio at {', '.join(map(str, sorted(rates)))} Hz is resampled to "
                   f"{SAMPLE_RATE} Hz")
        if silent:
            notice(f"{silent} file(s) hold no word of {MAIN_SPEAKER}: their text is all PAD")
        if late:
            what = "dropped" if self.mask_text_past_audio else "kept, as moshi-finetune does"
            notice(f"{late} word(s) start after the end of their audio ({what})")

    def __len__(self) -> int:
        return len(self.chunks)

    def _read(self, index: int) -> np.ndarray:
        if self._audio is None or self._audio[0] != index:
            from moshi_mlx.audio.io import read_audio_channels

            path = self.entries[index].path
            try:
                pcm, _ = read_audio_channels(path)
            except AudioError as exc:
                raise TrainingDataError(str(exc)) from None
            self._audio = (index, np.ascontiguousarray(pcm.T))
        return self._audio[1]

    def __getitem__(self, item: int) -> np.ndarray:
        """Chunk `item` as codes int32 [1 + 2K, N]."""
        if item not in self._codes:
            self._codes[item] = self._make(item)
        return self._codes[item]

    def _make(self, item: int) -> np.ndarray:
        index, start_sec = self.chunks[item]
        pcm = self._read(index)
        first = round(start_sec * SAMPLE_RATE)
        real = pcm[:, first : first + round(self.duration_sec * SAMPLE_RATE)]
        if real.shape[1] == 0:
            raise TrainingDataError(f"{self.entries[index].path}: no audio at {start_sec:.3f} s")
        codes = self.encode(real)[:, :, : self.frames]
        real_frames = codes.shape[-1]
        audio = np.full((codes.shape[0] * codes.shape[1], self.frames), -1, dtype=np.int32)
        audio[:, :real_frames] = codes.reshape(-1, real_frames)
        text = chunk_text(self.words[index], start_sec, self.duration_sec, real_frames,
                          self.tokenizer, self.pad_id, self.epad_id, self.mask_text_past_audio)
        return np.concatenate([text[None], audio], axis=0)

    def batches(self, batch_size: int, order: Sequence[int] | None = None,
                drop_last: bool = True) -> Iterator[np.ndarray]:
        """Codes [batch_size, 1 + 2K, N] of the chunks in `order` (default: file order). As
        moshi-finetune batches them, an incomplete last batch is dropped, unless not
        `drop_last` (evaluation: every chunk counts)."""
        order = range(len(self)) if order is None else order
        batch = []
        for item in order:
            batch.append(self[item])
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch and not drop_last:
            yield np.stack(batch)


def training_batches(dataset: MoshiDataset, batch_size: int, rng: np.random.Generator
                     ) -> Iterator[np.ndarray]:
    """Endless batches of `batch_size` chunks, reshuffled each pass (as moshi-finetune, a
    pass's last incomplete batch is dropped)."""
    if batch_size > len(dataset):
        raise TrainingDataError(f"--batch-size {batch_size} is more than the {len(dataset)} "
                                "chunks of the training data")
    while True:
        yield from dataset.batches(batch_size, rng.permutation(len(dataset)).tolist())
