"""The conversation engine: one 80 ms frame in, one frame of Moshi out.

Both front ends (the terminal loop in `moshi_mlx.local` and the web server) drive the same
`Engine.process`: Mimi encode of the user's frame -> one Moshi step -> Mimi decode of Moshi's
frame. The engine holds all streaming state; `reset()` starts a fresh conversation.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .blas import blas_hint
from .errors import MoshiError, WeightsError

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
NUM_CODEBOOKS = 8

TEXT_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
CONFIG_NAME = "config.json"
MODEL_NAMES = {4: "model.q4.safetensors", 8: "model.q8.safetensors", None: "model.safetensors"}
VOICES = ("moshiko", "moshika")


def default_repo(voice: str, quantize: int | None) -> str:
    """Official MLX repo of `voice` for a quantization: kyutai/moshiko-mlx-q4 etc."""
    suffix = {4: "q4", 8: "q8", None: "bf16"}[quantize]
    return f"kyutai/{voice}-mlx-{suffix}"


@dataclass
class FrameOutput:
    pcm: np.ndarray  # (1920,) float32: Moshi's audio for this frame (zeros while none yet)
    text: str | None  # the text piece said at this step, None for PAD/EPAD/no token
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, step, decode


class Codec(Protocol):
    """Streaming Mimi seen by the engine: numpy in, numpy out, one frame at a time."""

    def encode(self, pcm: np.ndarray) -> np.ndarray: ...  # (1920,) f32 -> (8,) int codes

    def decode(self, codes: np.ndarray) -> np.ndarray: ...  # (8,) int -> (1920,) f32

    def reset(self) -> None: ...


class MlxCodec:
    """`moshi_mlx.Mimi` (our MLX implementation) behind the `Codec` interface."""

    def __init__(self, mimi: Any):
        self.mimi = mimi

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        codes = self.mimi.encode_step(mx.array(pcm.reshape(1, 1, -1)))
        return np.asarray(codes)[0, :NUM_CODEBOOKS, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        pcm = self.mimi.decode_step(mx.array(codes.reshape(1, -1, 1).astype(np.int32)))
        return np.asarray(pcm.astype(mx.float32)).reshape(-1)

    def reset(self) -> None:
        self.mimi.reset()


class RustyCodec:
    """Kyutai's Rust Mimi (`rustymimi`): one tokenizer instance per direction, so that
    encoder and decoder streaming states never interfere."""

    def __init__(self, path: str | Path):
        import rustymimi

        self._path = str(path)
        self._make = lambda: rustymimi.Tokenizer(self._path, num_codebooks=NUM_CODEBOOKS)
        self.encoder = self._make()
        self.decoder = self._make()

    def encode(self, pcm: np.ndarray) -> np.ndarray:
        codes = self.encoder.encode_step(pcm.reshape(1, 1, -1).astype(np.float32))
        return np.asarray(codes)[0, :NUM_CODEBOOKS, 0]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        pcm = self.decoder.decode_step(codes.reshape(1, -1, 1).astype(np.uint32))
        return np.asarray(pcm, dtype=np.float32).reshape(-1)

    def reset(self) -> None:
        self.encoder.reset()
        self.decoder.reset()


class Engine:
    """Full-duplex Moshi, frame by frame: `process(user_pcm) -> FrameOutput`."""

    sample_rate: int = SAMPLE_RATE
    frame_size: int = FRAME_SIZE

    def __init__(
        self,
        codec: Codec,
        lm_gen: Any,
        text_tokenizer: Any,
        silent_text_ids: Sequence[int] = (0, 3),
    ):
        self.codec = codec
        self.lm_gen = lm_gen
        self.text_tokenizer = text_tokenizer
        self.silent_text_ids = frozenset(int(i) for i in silent_text_ids)
        self.frames = 0

    @classmethod
    def from_files(
        cls,
        moshi_weight: str | Path,
        mimi_weight: str | Path,
        tokenizer: str | Path,
        config: str | Path | None = None,
        quantize: int | None = None,
        dtype: str = "auto",
        seed: int | None = None,
        text_temp: float = 0.7,
        text_topk: int = 25,
        audio_temp: float = 0.8,
        audio_topk: int = 250,
        mimi_backend: str = "mlx",
        cpu_threads: int | None = None,
    ) -> Engine:
        import sentencepiece

        from . import LmGen, load_lm

        for path, what in ((moshi_weight, "Moshi weights"), (mimi_weight, "Mimi weights"),
                           (tokenizer, "text tokenizer")):
            if not Path(path).is_file():
                raise WeightsError(f"{what} not found: {path}")
        check_quantization(moshi_weight, quantize)
        try:
            lm = load_lm(str(moshi_weight), config=config, quantize=quantize,
                         dtype=_mlx_dtype(dtype), cpu_threads=cpu_threads)
            codec = make_codec(mimi_weight, mimi_backend)
        except MemoryError:
            raise MoshiError(
                f"out of memory while loading {Path(moshi_weight).name}; try -q 4 or close "
                "other programs"
            ) from None
        except RuntimeError as exc:
            if "memory" in str(exc).lower() or "alloc" in str(exc).lower():
                raise MoshiError(
                    f"out of memory while loading {Path(moshi_weight).name}; try -q 4 or close "
                    "other programs"
                ) from None
            raise
        gen = LmGen(lm, text_temp=text_temp, text_topk=text_topk, audio_temp=audio_temp,
                    audio_topk=audio_topk, seed=seed)
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
        except (OSError, RuntimeError):
            raise WeightsError(f"{tokenizer} is not a SentencePiece model") from None
        pad_id = getattr(getattr(lm, "cfg", None), "existing_text_padding_id", None)
        engine = cls(codec, gen, sp, silent_text_ids=(0, 3 if pad_id is None else int(pad_id)))
        engine.warm_up()
        return engine

    def reset(self) -> None:
        self.codec.reset()
        self.lm_gen.reset()
        self.frames = 0

    def warm_up(self, frames: int = 2) -> None:
        """Run `frames` frames of silence, then reset: graphs are compiled and buffers
        allocated now, not during the first frames of a conversation (where a stall of a
        second would pile up microphone audio and then a burst of output). Frame 0 steps
        only; frame 1 also decodes."""
        for _ in range(frames):
            self.process(np.zeros(self.frame_size, dtype=np.float32))
        self.reset()

    def text_piece(self, token: int) -> str | None:
        """Printable text of a text token; None for padding, end-of-padding and control ids."""
        if token < 0 or token in self.silent_text_ids:
            return None
        sp = self.text_tokenizer
        if token >= sp.get_piece_size() or sp.is_control(token) or sp.is_unknown(token):
            return None
        return sp.id_to_piece(token).replace("\u2581", " ")

    def process(self, pcm: np.ndarray) -> FrameOutput:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.shape[0] != self.frame_size:
            raise ValueError(f"expected {self.frame_size} samples, got {pcm.shape[0]}")
        t0 = time.perf_counter()
        codes = self.codec.encode(pcm)
        t1 = time.perf_counter()
        text_token, audio_codes = self._step(codes)
        t2 = time.perf_counter()
        if audio_codes is None:
            out = np.zeros(self.frame_size, dtype=np.float32)
        else:
            out = self.codec.decode(audio_codes)
        t3 = time.perf_counter()
        self.frames += 1
        text = None if text_token is None else self.text_piece(text_token)
        return FrameOutput(out, text, {"encode": t1 - t0, "step": t2 - t1, "decode": t3 - t2})

    def _step(self, codes: np.ndarray) -> tuple[int | None, np.ndarray | None]:
        import mlx.core as mx

        user = mx.array(np.asarray(codes, dtype=np.int32).reshape(1, NUM_CODEBOOKS))
        text, audio = self.lm_gen.step(user)  # evaluates its outputs (one host sync)
        token = None if text is None else int(np.array(text).reshape(-1)[0])
        if audio is None:
            return token, None
        audio_np = np.array(audio).reshape(-1)[:NUM_CODEBOOKS].astype(np.int64)
        if (audio_np < 0).any():  # a delayed codebook not known yet
            return token, None
        return token, audio_np


def make_codec(mimi_weight: str | Path, backend: str = "mlx") -> Codec:
    if backend == "rustymimi":
        try:
            return RustyCodec(mimi_weight)
        except ImportError:
            raise MoshiError("--mimi-backend rustymimi needs `pip install rustymimi`") from None
    if backend != "mlx":
        raise MoshiError(f"unknown Mimi backend {backend!r} (use mlx or rustymimi)")
    from . import load_mimi

    return MlxCodec(load_mimi(str(mimi_weight), num_codebooks=NUM_CODEBOOKS))


def _mlx_dtype(name: str) -> Any:
    import mlx.core as mx

    if name == "auto":
        # On MLX's CPU backend quantized matmuls with bf16 activations are ~10x slower than
        # with float32 (measured: benchmarks/lm_step.py); on Apple GPUs bf16 is the fast path.
        name = "f32" if mx.default_device() == mx.cpu else "bf16"
    dtypes = {"bf16": mx.bfloat16, "f32": mx.float32, "f16": mx.float16}
    if name not in dtypes:
        raise MoshiError(f"unknown dtype {name!r} (use one of {', '.join(dtypes)})")
    return dtypes[name]


def detect_quantization(weight_file: str | Path) -> int | None:
    """Bits per weight of a Moshi LM file (4 or 8), None when it is not quantized.

    Reads and checks only the safetensors header (WeightsError for a file that is not a
    Moshi LM checkpoint), so a wrong -q fails before anything is loaded.
    """
    from .weights import describe_checkpoint

    _, _, quantization = describe_checkpoint(weight_file)
    return None if quantization is None else quantization.bits


def check_quantization(weight_file: str | Path, quantize: int | None) -> None:
    """One clear error when -q names other bits than a pre-quantized weight file holds.

    (-q with a bf16 file is fine: the loader quantizes it while loading.)
    """
    found = detect_quantization(weight_file)
    if found is None or quantize is None or found == quantize:
        return
    raise WeightsError(
        f"{Path(weight_file).name} holds {found}-bit weights but -q {quantize} was given; "
        f"use -q {found} (or the matching repo/file)"
    )


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2**63 - 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose and load the model (shared by the terminal and web front ends)."""
    g = parser.add_argument_group("model")
    g.add_argument("-q", "--quantize", type=int, choices=(4, 8), default=None,
                   help="quantized weights: 4 or 8 bits (default: bf16)")
    g.add_argument("--hf-repo", default=None,
                   help="Hugging Face repo id or local folder holding the model files "
                        "(default: the official kyutai/<voice>-mlx-<q4|q8|bf16> repo)")
    g.add_argument("--voice", choices=VOICES, default="moshiko",
                   help="which released voice to use when --hf-repo is not given")
    g.add_argument("--moshi-weight", default=None, help="Moshi weight file (path or repo name)")
    g.add_argument("--mimi-weight", default=None, help="Mimi weight file")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--config", default=None, help="Moshi config.json (default: the repo's)")
    g.add_argument("--dtype", choices=("auto", "bf16", "f32"), default="auto",
                   help="activation dtype (default auto: bf16 on a GPU, f32 on the CPU "
                        "backend, where it is much faster)")
    g.add_argument("--cpu-threads", type=_positive_int, default=None,
                   help="when computing on the CPU, split large layers over N threads "
                        "(default: one per core; 1 = no split)")
    g.add_argument("--seed", type=_seed, default=None, help="random seed for sampling (>= 0)")
    g.add_argument("--text-temp", type=float, default=0.7, help="text temperature (0 = greedy)")
    g.add_argument("--text-topk", type=int, default=25)
    g.add_argument("--audio-temp", type=float, default=0.8, help="audio temperature (0 = greedy)")
    g.add_argument("--audio-topk", type=int, default=250)
    g.add_argument("--mimi-backend", choices=("mlx", "rustymimi"), default="mlx",
                   help="Mimi implementation (default: our MLX one)")


@dataclass
class ModelFiles:
    moshi_weight: Path
    mimi_weight: Path
    tokenizer: Path
    config: Path | None
    quantize: int | None


def resolve_model_files(args: argparse.Namespace) -> ModelFiles:
    """Find the weight files from the parsed options (local paths, a folder or a hub repo)."""
    from .hub import resolve_file

    quantize = getattr(args, "quantize", None)
    repo = args.hf_repo or default_repo(getattr(args, "voice", "moshiko"), quantize)
    repo_dir = Path(repo).expanduser()
    if not repo_dir.is_dir() and not args.moshi_weight:
        _check_repo_name(repo, quantize)

    if args.moshi_weight:
        moshi = resolve_file(args.moshi_weight, MODEL_NAMES[quantize])
    elif repo_dir.is_dir():
        moshi = _model_file_in_folder(repo_dir, quantize)
    else:
        moshi = resolve_file(repo, MODEL_NAMES[quantize])
    mimi = resolve_file(args.mimi_weight or repo, MIMI_NAME)
    tokenizer = resolve_file(args.tokenizer or repo, TEXT_TOKENIZER_NAME)

    config: Path | None = None
    if args.config:
        config = resolve_file(args.config, CONFIG_NAME)
    elif repo_dir.is_dir():
        config = repo_dir / CONFIG_NAME if (repo_dir / CONFIG_NAME).is_file() else None
    elif not args.moshi_weight or args.hf_repo:
        try:
            config = resolve_file(repo, CONFIG_NAME)
        except WeightsError:
            config = None  # optional: the official repos work from built-in defaults

    check_quantization(moshi, quantize)
    return ModelFiles(moshi, mimi, tokenizer, config, quantize)


def _check_repo_name(repo: str, quantize: int | None) -> None:
    """The official repos say their quantization in their name (…-mlx-q4, -q8, -bf16)."""
    name = repo.rsplit("/", 1)[-1].lower()
    for suffix, bits in (("-q4", 4), ("-q8", 8), ("-bf16", None)):
        if name.endswith(suffix) and bits != quantize:
            want = "no -q" if bits is None else f"-q {bits}"
            have = "no -q" if quantize is None else f"-q {quantize}"
            raise WeightsError(f"{repo} holds {MODEL_NAMES[bits]}: use {want} (got {have})")


def _model_file_in_folder(folder: Path, quantize: int | None) -> Path:
    wanted = folder / MODEL_NAMES[quantize]
    if wanted.is_file():
        return wanted
    present = [(q, name) for q, name in MODEL_NAMES.items() if (folder / name).is_file()]
    if not present:
        names = ", ".join(MODEL_NAMES.values())
        raise WeightsError(f"{folder} holds no Moshi weights (expected one of {names})")
    if quantize is None and len(present) == 1:
        return folder / present[0][1]
    have = ", ".join(name for _, name in present)
    flag = "no -q" if quantize is None else f"-q {quantize}"
    raise WeightsError(f"{folder} has {have}, not {MODEL_NAMES[quantize]} ({flag}); fix -q")


def build_engine(args: argparse.Namespace) -> Engine:
    """Resolve the files named by `add_model_args` options and load the engine."""
    files = resolve_model_files(args)
    engine = Engine.from_files(
        files.moshi_weight,
        files.mimi_weight,
        files.tokenizer,
        config=files.config,
        quantize=files.quantize,
        dtype=args.dtype,
        seed=args.seed,
        text_temp=args.text_temp,
        text_topk=args.text_topk,
        audio_temp=args.audio_temp,
        audio_topk=args.audio_topk,
        mimi_backend=args.mimi_backend,
        cpu_threads=args.cpu_threads,
    )
    hint = blas_hint()
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return engine
