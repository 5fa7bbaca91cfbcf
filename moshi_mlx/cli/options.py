"""What every command line shares: the option groups every model-loading command takes in the
same spelling, the options objects built from them once, argument types, how a command names
itself, the model-file options and how they resolve (through `moshi_mlx.loading.resolve`),
early checks, and the BLAS hint."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moshi_mlx.errors import MoshiError
from moshi_mlx.loading.options import ModelOptions

if TYPE_CHECKING:
    from moshi_mlx.loading.resolve import ResolvedFiles

DTYPE_CHOICES = ("auto", "bf16", "f32")


# ---------------------------------------------------------------------------- the command


def command_prog(module: str, script: str) -> str:
    """The name a command's usage lines give: its console script (`moshi-stt`) when it was
    started as one, else `python -m moshi_mlx.stt`."""
    started_as = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if started_as.removesuffix(".exe") == script else f"python -m {module}"


# ---------------------------------------------------------------------------- argument types


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed must be between 0 and 2**63 - 1, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def temperature(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"temperature must be >= 0 (0 = greedy), got {text}")
    return value


def top_k(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"top-k must be >= 0 (0 = no cut), got {value}")
    return value


def quantize_bits(text: str) -> int:
    """-q: one of the loader's QUANTIZATIONS. A bad value is a MoshiError (one line, exit 1,
    as every other value the loader refuses), not argparse's usage dump."""
    from moshi_mlx.loading.quantization import QUANTIZATIONS

    allowed = {str(bits): bits for bits in QUANTIZATIONS}
    if text.strip() not in allowed:
        raise MoshiError(f"-q must be {' or '.join(allowed)}, got {text!r}")
    return allowed[text.strip()]


# ---------------------------------------------------------------------------- option groups


def add_quantize_arg(group: Any, help_text: str) -> None:
    from moshi_mlx.loading.quantization import QUANTIZATIONS

    group.add_argument("-q", "--quantize", type=quantize_bits, choices=tuple(QUANTIZATIONS),
                       default=None, help=help_text)


def add_compute_args(group: Any) -> None:
    """--dtype and --cpu-threads: how a loaded model computes (every model family)."""
    group.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="activation dtype (default auto: bf16 on a GPU, f32 on the CPU "
                            "backend, where it is much faster)")
    group.add_argument("--cpu-threads", type=positive_int, default=None,
                       help="when computing on the CPU, split large layers over N threads "
                            "(default: one per core; 1 = no split)")


def add_run_args(group: Any, quantize_help: str) -> None:
    """The shared group of every command that loads a model: -q, --dtype, --cpu-threads and
    --seed; `ModelOptions.from_args` reads them back."""
    add_quantize_arg(group, quantize_help)
    add_compute_args(group)
    group.add_argument("--seed", type=seed, default=None,
                       help="random seed for sampling (>= 0; default: a fresh one each run)")


def add_sampling_args(group: Any, temp: float, top_k_default: int) -> None:
    """--temp and --top-k of a command with one sampler (the older spellings --temperature
    and --topk are aliases); `SamplingOptions.from_args` reads them back."""
    greedy = " (greedy)" if temp == 0 else ""
    group.add_argument("--temp", "--temperature", dest="temp", type=temperature, default=temp,
                       help=f"sampling temperature, 0 = greedy (default {temp:g}{greedy})")
    group.add_argument("--top-k", "--topk", dest="top_k", type=top_k, default=top_k_default,
                       help=f"sample among the k likeliest tokens, 0 = no cut "
                            f"(default {top_k_default})")


class _SetEach(argparse.Action):
    """One value for several options: Moshi's --temp / --top-k set its text and its audio
    sampler alike (the last option given wins, as for any argparse option)."""

    def __init__(self, option_strings: list[str], dest: str, targets: tuple[str, ...],
                 **kwargs: Any) -> None:
        self.targets = targets
        kwargs["default"] = argparse.SUPPRESS  # no attribute of its own: it sets the targets
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        for target in self.targets:
            setattr(namespace, target, values)


def add_moshi_sampling_args(group: Any) -> None:
    """Moshi samples text and audio tokens apart: --text-temp / --text-topk / --audio-temp /
    --audio-topk, and --temp / --top-k for both at once."""
    from moshi_mlx.modules.sampling import SamplingSettings

    released = SamplingSettings()
    group.add_argument("--temp", dest="temp", action=_SetEach, type=temperature,
                       targets=("text_temp", "audio_temp"),
                       help="temperature of both text and audio tokens (sets --text-temp and "
                            "--audio-temp)")
    group.add_argument("--top-k", dest="top_k", action=_SetEach, type=top_k,
                       targets=("text_topk", "audio_topk"),
                       help="top-k of both text and audio tokens (sets --text-topk and "
                            "--audio-topk)")
    group.add_argument("--text-temp", type=temperature, default=released.text_temp,
                       help=f"text temperature, 0 = greedy (default {released.text_temp:g})")
    group.add_argument("--text-topk", type=top_k, default=released.text_topk,
                       help=f"text top-k, 0 = no cut (default {released.text_topk})")
    group.add_argument("--audio-temp", type=temperature, default=released.audio_temp,
                       help=f"audio temperature, 0 = greedy (default {released.audio_temp:g})")
    group.add_argument("--audio-topk", type=top_k, default=released.audio_topk,
                       help=f"audio top-k, 0 = no cut (default {released.audio_topk})")


def add_list_devices_arg(group: Any) -> None:
    """--list-devices, for every command that opens a sound device; `show_devices` answers."""
    group.add_argument("--list-devices", action="store_true", help="list sound devices and exit")


def show_devices() -> int:
    """--list-devices: the sound devices on stdout; the command then exits 0."""
    from moshi_mlx.audio.devices import list_devices

    print(list_devices())
    return 0


# ---------------------------------------------------------------------------- options objects


@dataclass(frozen=True)
class SamplingOptions:
    """One sampler's --temp / --top-k (`add_sampling_args`): temperature 0 = greedy, top-k 0 =
    no cut."""

    temp: float
    top_k: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SamplingOptions:
        return cls(args.temp, args.top_k)


def print_blas_hint() -> None:
    """One stderr line when MLX runs on the slow reference BLAS (Linux)."""
    from moshi_mlx.cli.blas import blas_hint

    hint = blas_hint()
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


# ---------------------------------------------------------------------------- files


# ---------------------------------------------------------------------------- Moshi


def add_model_args(parser: argparse.ArgumentParser, audio: bool = True) -> None:
    """Options that choose and load the Moshi model (terminal and web front ends). audio=False
    (text-only generation): no Mimi options and no text / audio sampling group."""
    from moshi_mlx.conversation.engine import MIMI_BACKENDS
    from moshi_mlx.loading.families import files_of

    g = parser.add_argument_group("model")
    g.add_argument("--hf-repo", default=None,
                   help="Hugging Face repo id or local folder holding the model files "
                        "(default: the official kyutai/<voice>-mlx-<q4|q8|bf16> repo)")
    voices = tuple(files_of("moshi").repos)  # the released ones: moshiko, moshika
    g.add_argument("--voice", choices=voices, default=voices[0],
                   help="which released voice to use when --hf-repo is not given")
    g.add_argument("--moshi-weight", default=None, help="Moshi weight file (path or repo name)")
    if audio:
        g.add_argument("--mimi-weight", default=None, help="Mimi weight file")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--config", default=None, help="Moshi config.json (default: the repo's)")
    if audio:
        g.add_argument("--mimi-backend", choices=MIMI_BACKENDS, default="mlx",
                       help="Mimi implementation (default: our MLX one)")
    add_run_args(g, "quantized weights: 4 or 8 bits (default: bf16)")
    if audio:
        add_adapter_args(parser.add_argument_group("fine-tuned (LoRA)"))
        add_moshi_sampling_args(parser.add_argument_group("sampling"))


def add_adapter_args(group: Any, prefix: str = "") -> None:
    """A LoRA to run Moshi with: --adapter-path (ours), or --lora-weight / --lora-config /
    --no-fuse-lora (moshi-finetune's files, as moshi.server spells them). prefix: the same
    options for one model of several (serve: "moshi-"); `adapter_options` reads them."""
    group.add_argument(f"--{prefix}adapter-path", default=None, metavar="DIR",
                       help="LoRA adapter folder (python -m moshi_mlx.finetune moshi), kept "
                            "apart from the weights")
    group.add_argument(f"--{prefix}lora-weight", default=None, metavar="FILE",
                       help="moshi-finetune's lora.safetensors, fused into the weights "
                            "(unless --no-fuse-lora)")
    group.add_argument(f"--{prefix}lora-config", default=None, metavar="FILE",
                       help="its config.json (lora_rank, lora_scaling; default: beside it)")
    group.add_argument(f"--{prefix}no-fuse-lora", action="store_true",
                       help="keep --lora-weight apart from the weights (LoRA layers)")


def adapter_options(args: argparse.Namespace, prefix: str = "") -> Any:
    """The `add_adapter_args` options as LmAdapterOptions (None when no adapter is given)."""
    from moshi_mlx.training.moshi_lora import LmAdapterOptions

    name = prefix.replace("-", "_")
    try:
        adapter = LmAdapterOptions(getattr(args, f"{name}adapter_path"),
                                   getattr(args, f"{name}lora_weight"),
                                   getattr(args, f"{name}lora_config"),
                                   fuse=not getattr(args, f"{name}no_fuse_lora"))
    except MoshiError as exc:  # said in this command's spelling of the options
        raise MoshiError(str(exc).replace("--", f"--{prefix}")) from None
    return adapter if adapter.active else None


def resolve_model_files(args: argparse.Namespace) -> ResolvedFiles:
    """The Moshi files the `add_model_args` options name (local paths, a folder or a hub repo,
    through moshi_mlx.loading.resolve), checked from their header before anything is loaded.
    Without the Mimi options (`add_model_args(audio=False)`) no codec is looked for."""
    from moshi_mlx.loading.resolve import resolve

    audio = hasattr(args, "mimi_weight")
    return resolve("moshi_mlx.local", args.hf_repo, variant=getattr(args, "voice", None),
                   quantize=getattr(args, "quantize", None), weights=args.moshi_weight,
                   config=args.config, tokenizer=args.tokenizer,
                   codec=getattr(args, "mimi_weight", None), need_codec=audio)


def add_stt_model_args(parser: argparse.ArgumentParser) -> None:
    """Options that choose and load a Kyutai STT model (`moshi_mlx.stt`, the fine-tuning
    annotator); `resolve_stt_files` reads them back."""
    from moshi_mlx.loading.families import files_of

    releases = files_of("stt")
    g = parser.add_argument_group("model")
    g.add_argument("--model", choices=sorted(releases.repos), default="1b",
                   help="released model when --hf-repo is not given (default 1b)")
    g.add_argument("--hf-repo", default=None,
                   help=f"Hugging Face repo id or local folder (default {releases.default_repo()})")
    g.add_argument("--moshi-weight", default=None, help="STT LM weights (either layout)")
    g.add_argument("--config", default=None, help="the model's config.json")
    g.add_argument("--mimi-weight", default=None, help="Mimi weights")
    g.add_argument("--tokenizer", default=None, help="text tokenizer (SentencePiece .model)")
    g.add_argument("--vad-weights", default=None,
                   help="checkpoint with the VAD heads (e.g. kyutai/stt-1b-en_fr-candle) when "
                        "the weights have none")
    add_run_args(g, "4 or 8 bits (a bf16 file is quantized on load)")


def resolve_stt_files(args: argparse.Namespace, need_mimi: bool) -> ResolvedFiles:
    """The STT files the `add_stt_model_args` options name, through moshi_mlx.loading.resolve
    (a checkpoint of another family is refused there). Kyutai's STT repos hold bf16 weights
    only: -q then quantizes them on load."""
    from moshi_mlx.loading.resolve import resolve

    return resolve("moshi_mlx.stt", args.hf_repo, variant=args.model, quantize=args.quantize,
                   weights=args.moshi_weight, config=args.config, tokenizer=args.tokenizer,
                   codec=args.mimi_weight, need_codec=need_mimi)


def engine_options(args: argparse.Namespace) -> Any:
    """The parsed `add_model_args` options as the engine's one options object."""
    from moshi_mlx.conversation.engine import EngineOptions
    from moshi_mlx.modules.sampling import SamplingSettings

    sampling = SamplingSettings(args.text_temp, args.text_topk, args.audio_temp, args.audio_topk)
    return EngineOptions(ModelOptions.from_args(args), sampling, args.mimi_backend,
                         adapter_options(args))


def build_engine(args: argparse.Namespace,
                 before_load: Callable[[ResolvedFiles], None] | None = None) -> Any:
    """Resolve the files named by `add_model_args` options and load the engine;
    `before_load(files)` runs between the two (checks that need the resolved files)."""
    from moshi_mlx.conversation.engine import Engine

    files = resolve_model_files(args)
    if before_load is not None:
        before_load(files)
    engine = Engine.from_files(files.weight, files.codec, files.tokenizer,
                               config=files.config, options=engine_options(args))
    print_blas_hint()
    return engine
