"""One server for every family: `python -m moshi_mlx.serve --stt [--tts] [--moshi]`.

    python -m moshi_mlx.serve --stt                        # Kyutai STT, 127.0.0.1:8080
    python -m moshi_mlx.serve --stt --tts -q 8 --max-streams 4
    python -m moshi_mlx.serve --moshi -q 4 --port 8998
    python -m moshi_mlx.serve --moshi -q 4 --text-prompt "You are a ship's cook."

Routes: /api/asr-streaming (Kyutai's STT protocol, every stream one row of a batched step),
/v1/audio/transcriptions, /v1/audio/speech and /v1/models (OpenAI's audio API), /api/chat
(Moshi, as `local_web` serves it). See README.md, "Serving", for the protocols and limits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from moshi_mlx.cli.model_thread import load_on_model_thread, start_model_thread, stop_model_thread
from moshi_mlx.cli.options import (
    SamplingOptions,
    adapter_options,
    add_adapter_args,
    add_run_args,
    add_sampling_args,
    command_prog,
    positive_int,
)
from moshi_mlx.cli.prompt_args import (
    PromptPlan,
    add_prompt_args,
    apply_prompt,
    check_before_load,
    given_prompt_flags,
    prompt_plan,
)
from moshi_mlx.errors import MoshiError, cli_errors
from moshi_mlx.loading.options import ModelOptions
from moshi_mlx.web import http
from moshi_mlx.web.address import DEFAULT_HOST, check_port_free, is_loopback, port
from moshi_mlx.web.keys import DEFAULT_KEYS

SPEECH_SERVICE = web.AppKey("speech_service", object)  # the app's SpeechService, when served
STT_SERVICE = web.AppKey("stt_service", object)  # the app's SttService, when served
RELEASED = "released"  # a family flag given alone: the released model
SERVE_PORT = 8080  # the address Kyutai's scripts and Unmute use
DEFAULT_MAX_STREAMS = 8


def build_parser() -> argparse.ArgumentParser:
    from moshi_mlx.loading.families import files_of

    p = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.serve", "moshi-serve"),
        description="Serve Kyutai STT, Sesame CSM and Moshi over Kyutai's and OpenAI's "
                    "protocols, from one process and one port.")
    models = p.add_argument_group("models (at least one; SRC: a repo id or a weights_convert "
                                  "folder, default the released model)")
    for flag, family, what in (("--stt", "stt", "Kyutai speech-to-text"),
                               ("--tts", "csm", "Sesame CSM text-to-speech"),
                               ("--moshi", "moshi", "Moshi conversation")):
        models.add_argument(flag, nargs="?", const=RELEASED, default=None, metavar="SRC",
                            help=f"{what} (alone: the released {files_of(family).default_repo()}"
                                 f", or its -q repo)")
    add_run_args(models, "quantized weights: 4 or 8 bits, for every model loaded")
    tuned = p.add_argument_group("fine-tuned models (LoRA): a command's options, prefixed by "
                                 "the model's flag")
    tuned.add_argument("--tts-adapter-path", default=None, metavar="DIR",
                       help="CSM LoRA adapter folder (python -m moshi_mlx.finetune csm), as "
                            "tts --adapter-path")
    add_adapter_args(tuned, prefix="moshi-")
    add_sampling_args(p.add_argument_group(
        "speech-to-text sampling (Kyutai's `temperature`; CSM and Moshi take theirs per "
        "request)"), temp=0.0, top_k_default=50)
    add_prompt_args(p, "Moshi's prompt (with --moshi: run before every /api/chat conversation "
                       "whose client sends no text_prompt)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}, this machine "
                             "only); another address needs an --api-key of your own")
    server.add_argument("--port", type=port, default=SERVE_PORT,
                        help=f"port (default {SERVE_PORT})")
    server.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help=f"a key clients must send (repeatable; default: "
                             f"{', '.join(DEFAULT_KEYS)}, as in Kyutai's configs)")
    server.add_argument("--max-streams", type=positive_int, default=DEFAULT_MAX_STREAMS,
                        help=f"speech-to-text streams served at once, one batch "
                             f"(default {DEFAULT_MAX_STREAMS})")
    server.add_argument("--voices", default=None, metavar="DIR",
                        help="the saved voices /v1/audio/speech may name (default: the "
                             "voice store under your cache folder)")
    return p


@dataclass
class Loaded:
    """What one server process holds (made on the model thread)."""

    stt: Any = None  # SttSlots
    speech: Any = None  # SpeechService's model parts
    moshi: Any = None  # Engine
    moshi_prompt: PromptPlan = PromptPlan()  # the server's own prompt (flags) for /api/chat
    sources: dict[str, str] = field(default_factory=dict)  # family -> source


def check_adapters(args: argparse.Namespace) -> None:
    """A fine-tuning option goes with its model's flag (checked before anything loads)."""
    if args.tts_adapter_path is not None and not args.tts:
        raise MoshiError("--tts-adapter-path goes with --tts")
    if adapter_options(args, "moshi-") is not None and not args.moshi:
        raise MoshiError("--moshi-adapter-path / --moshi-lora-weight go with --moshi")


def check_exposure(host: str, keys: list[str] | None) -> None:
    """Another address than loopback needs keys of the user's own."""
    if not is_loopback(host) and not keys:
        raise MoshiError(f"--host {host} opens the server to other machines: give an "
                         f"--api-key of your own (the default key is public)")


COMMANDS = {"stt": "moshi_mlx.stt", "tts": "moshi_mlx.tts", "moshi": "moshi_mlx.local"}
REGISTRY_NAMES = {"stt": "stt", "tts": "csm", "moshi": "moshi"}  # loading.families names


def source_of(args: argparse.Namespace, family: str) -> str | None:
    """The source a family flag names; None: the released model (for -q)."""
    value = getattr(args, family)
    return None if value == RELEASED else value


def served_name(args: argparse.Namespace, family: str) -> str:
    """What /v1/models lists: the source as given, or the released repo it stands for."""
    from moshi_mlx.loading.families import files_of

    source = source_of(args, family)
    if source is not None:
        return source
    return files_of(REGISTRY_NAMES[family]).default_repo(None, args.quantize)


def resolve_models(args: argparse.Namespace) -> dict[str, Any]:
    """family -> its resolved files, for every family asked for: every file is found and
    header-checked before anything loads, as the other commands do."""
    from moshi_mlx.loading.resolve import resolve

    return {family: resolve(COMMANDS[family], source_of(args, family), quantize=args.quantize)
            for family in COMMANDS if getattr(args, family)}


def load_models(files: dict[str, Any], args: argparse.Namespace,
                moshi_prompt: PromptPlan | None = None) -> Loaded:
    """Load the resolved families (on the model thread); Moshi gets `moshi_prompt`."""
    options = ModelOptions.from_args(args)
    loaded = Loaded(sources={family: served_name(args, family) for family in files})
    if "stt" in files:
        from moshi_mlx.transcription.loader import stt_parts_from_files
        from moshi_mlx.transcription.slots import SttSlots

        lm, tokenizer, mimi = stt_parts_from_files(files["stt"], options)
        sampling = SamplingOptions.from_args(args)
        loaded.stt = SttSlots(lm, tokenizer, mimi, args.max_streams, temp=sampling.temp,
                              top_k=sampling.top_k, seed=options.seed)
    if "tts" in files:
        from moshi_mlx.speech.loader import speech_parts_from_files

        loaded.speech = speech_parts_from_files(files["tts"], options,
                                                adapter_path=args.tts_adapter_path)
    if "moshi" in files:
        from moshi_mlx.conversation.engine import Engine, EngineOptions

        moshi = files["moshi"]
        loaded.moshi = Engine.from_files(moshi.weight, moshi.codec, moshi.tokenizer,
                                         config=moshi.config, options=EngineOptions(
                                             options, adapter=adapter_options(args, "moshi-")))
        loaded.moshi_prompt = moshi_prompt or PromptPlan()
        apply_prompt(loaded.moshi, loaded.moshi_prompt)
    return loaded


def build_app(loaded: Loaded, args: argparse.Namespace, executor: Any) -> Any:
    """The one aiohttp application of every loaded family's routes."""
    from moshi_mlx.web import limits
    from moshi_mlx.web.keys import ApiKeys
    from moshi_mlx.web.openai_api import OpenAiRoutes, ServedModel

    keys = ApiKeys(args.api_key or DEFAULT_KEYS)
    app = http.make_app(http.HostPolicy(args.host), client_max_size=limits.APP_MAX_REQUEST_BYTES)
    service = None
    if loaded.stt is not None:
        from moshi_mlx.web.asr_streaming import AsrStreamingRoute
        from moshi_mlx.web.stt_service import SttService

        service = SttService(loaded.stt, executor)
        app[STT_SERVICE] = service
        AsrStreamingRoute(service, keys).add_routes(app)

        async def start_stt(app: Any) -> None:
            service.start()

        async def stop_stt(app: Any) -> None:
            await service.stop()

        app.on_startup.append(start_stt)
        app.on_cleanup.append(stop_stt)
    speech = None
    if loaded.speech is not None:
        from moshi_mlx.web.speech_service import SpeechService

        voices = {} if args.voices is None else {"voices": Path(args.voices)}
        speech = SpeechService(*loaded.speech, executor=executor, **voices)
        app[SPEECH_SERVICE] = speech
    models = [ServedModel(source, family) for family, source in loaded.sources.items()]
    OpenAiRoutes(keys=keys, models=models, transcriber=service, speech=speech).add_routes(app)
    if loaded.moshi is not None:
        from moshi_mlx.web.server import ChatServer

        ChatServer(loaded.moshi, page=None, executor=executor,
                   prompt=loaded.moshi_prompt).add_routes(app)
    return app


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.stt or args.tts or args.moshi):
        raise MoshiError("nothing to serve: give --stt, --tts and/or --moshi")
    check_adapters(args)
    check_exposure(args.host, args.api_key)
    if not args.moshi and given_prompt_flags(args):
        raise MoshiError(f"{' and '.join(given_prompt_flags(args))}: Moshi's prompt needs --moshi")
    moshi_prompt = prompt_plan(args)  # bad prompt input fails before any model loads
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    check_port_free(args.host, args.port)
    files = resolve_models(args)
    if "moshi" in files:  # the prompt against Moshi's config, before any weights load
        check_before_load(moshi_prompt, files["moshi"], ModelOptions.from_args(args))
    executor = start_model_thread()
    try:
        print("loading…", file=sys.stderr, flush=True)
        loaded = load_on_model_thread(executor,
                                      lambda: load_models(files, args, moshi_prompt))
        app = build_app(loaded, args, executor)
        try:
            families = ", ".join(loaded.sources)
            asyncio.run(http.serve_until_stopped(
                app, args.host, args.port, lambda url: f"serving {families} at {url} (Ctrl-C "
                                                       "to stop)"))
        except KeyboardInterrupt:
            pass
    finally:
        stop_model_thread(executor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
