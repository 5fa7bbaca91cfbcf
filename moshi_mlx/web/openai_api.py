"""OpenAI-compatible speech endpoints: /v1/audio/transcriptions (Kyutai STT), /v1/audio/speech
(Sesame CSM) and /v1/models, as the `openai` SDK and other OpenAI clients call them.

Errors are OpenAI's shape {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status,
and one log line each. The limits are moshi_mlx.web.limits'.

Transcriptions: text, json (the stt command's JSON: text, words, end_of_turn), srt and vtt are
exactly `python -m moshi_mlx.stt --format ...`; verbose_json always carries both `words` and
`segments` (the srt/vtt cues: split at pauses, ends of turn and long lines) and echoes the
request's `language` ("unknown" without one); `prompt` and `temperature` are accepted and
ignored (decoding is the loaded model's). stream=true: server-sent events.
Speech: wav is one 32-bit float header of unknown length, then the samples as decoded (the
tts command writes float WAVs too); pcm is raw s16le; flac is one 16-bit file at the end.
`voice` defaults to speaker "0" and `response_format` to wav (OpenAI's mp3 is not offered).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from moshi_mlx.cli import options
from moshi_mlx.errors import MoshiError, NoFreeSlot
from moshi_mlx.speech import defaults
from moshi_mlx.transcription.formats import render, subtitle_cues
from moshi_mlx.transcription.transcriber import Transcript
from moshi_mlx.web import limits
from moshi_mlx.web.keys import ApiKeys
from moshi_mlx.web.openai_requests import (
    ApiError,
    bad,
    form_bool,
    option_field,
    read_form,
    read_json,
    text_field,
)
from moshi_mlx.web.speech_body import CONTENT_TYPES, send_speech
from moshi_mlx.web.speech_service import SpeechBusy, SpeechRequest, SpeechService
from moshi_mlx.web.uploads import decode_upload

log = logging.getLogger("moshi_mlx.web")

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
SPEECH_FORMATS = tuple(CONTENT_TYPES)  # wav, pcm, flac
FAMILY_NAMES = {"stt": ("stt",), "tts": ("tts", "csm"), "moshi": ("moshi",)}
OWNERS = {"stt": "kyutai", "tts": "sesame", "moshi": "kyutai"}


@dataclass(frozen=True)
class ServedModel:
    id: str  # what /v1/models lists: the source it was loaded from (repo id / folder)
    family: str  # "stt" | "tts" | "moshi"


class AsyncTranscriber(Protocol):
    """web.stt_service.SttService: a whole clip through one slot of the batched streams."""

    def has_room(self) -> bool: ...

    async def transcribe(self, pcm: np.ndarray,
                         on_text: Callable[[str], Awaitable[None]] | None = None
                         ) -> Transcript: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpenAiRoutes:
    """The three /v1 routes; `transcriber` / `speech` None: that family is not served."""

    def __init__(self, *, keys: ApiKeys, models: Sequence[ServedModel],
                 transcriber: AsyncTranscriber | None, speech: SpeechService | None) -> None:
        self.keys = keys
        self.models = list(models)
        self.transcriber = transcriber
        self.speech = speech
        self.created = int(time.time())

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/audio/transcriptions", self._guarded(self._transcriptions))
        app.router.add_post("/v1/audio/speech", self._guarded(self._speech))
        app.router.add_get("/v1/models", self._guarded(self._list_models))

    def _guarded(self, handler: Handler) -> Handler:
        """The key check, and every refusal as an OpenAI error with one log line."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                if not self.keys.bearer_ok(request):
                    raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer "
                                   "KEY' with a key the server accepts", code="invalid_api_key")
                return await handler(request)
            except ApiError as err:
                log.info("%s %s from %s: %d %s", request.method, request.path, request.remote,
                         err.status, err.message)
                return err.response()
            except Exception:  # our bug, not the client's: the traceback is wanted
                log.exception("%s %s: internal error", request.method, request.path)
                return ApiError(500, "internal server error (see the server's log)",
                                kind="server_error").response()

        return guarded

    # ------------------------------------------------------------------ models
    async def _list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m.id, "object": "model", "created": self.created,
                 "owned_by": OWNERS.get(m.family, "moshi_mlx")} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    def _route_model(self, name: str, family: str, served: bool) -> ServedModel:
        """The loaded model of `family` that `name` asks for: its family's name, its source,
        or anything when only one is loaded (clients send fixed names such as whisper-1)."""
        loaded = [m for m in self.models if m.family == family] if served else []
        if not loaded:
            raise ApiError(404, f"no {family} model is loaded on this server (start it with "
                           f"--{family})", "model", "model_not_found")
        for model in loaded:
            if name == model.id or name in FAMILY_NAMES.get(family, ()):
                return model
        if len(loaded) == 1:
            return loaded[0]
        raise ApiError(404, f"model {name!r} is not loaded; loaded: "
                       f"{', '.join(m.id for m in loaded)}", "model", "model_not_found")

    # ------------------------------------------------------------------ transcriptions
    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        form = await read_form(request)
        self._route_model(form.get("model", ""), "stt", self.transcriber is not None)
        response_format = form.get("response_format", "json")
        if response_format not in TRANSCRIPTION_FORMATS:
            raise bad(f"unsupported response_format {response_format!r}: use one of "
                       f"{', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
        for granularity in form.lists.get("timestamp_granularities", []):
            if granularity not in GRANULARITIES:
                raise bad(f"unsupported timestamp granularity {granularity!r}: use word "
                           "and/or segment", "timestamp_granularities")
        stream = form_bool(form.get("stream", "false"), "stream")
        if form.file is None:
            raise bad("no audio: send the file as the multipart field 'file'", "file")
        name, data = form.file
        pcm = await _decode_upload(data, name)
        if not self.transcriber.has_room():
            raise _no_free_channels()
        if stream:
            return await self._stream_transcript(request, pcm)
        try:
            transcript = await self.transcriber.transcribe(pcm)
        except NoFreeSlot:
            raise _no_free_channels() from None
        if response_format == "verbose_json":
            return web.json_response(_verbose(transcript, form.get("language")))
        text = render(transcript, response_format)  # the stt command's text, json, srt, vtt
        content_type = {"json": "application/json", "vtt": "text/vtt"}.get(response_format,
                                                                           "text/plain")
        return web.Response(text=text, content_type=content_type, charset="utf-8")

    async def _stream_transcript(self, request: web.Request, pcm: np.ndarray
                                 ) -> web.StreamResponse:
        """Server-sent events: transcript.text.delta as the text is decoded, then
        transcript.text.done; the deltas add up to the done text."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent: list[str] = []
        gone = False

        async def send(event: dict[str, Any]) -> None:
            nonlocal gone
            if gone:
                return
            try:
                await response.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
                                     .encode())
            except ConnectionError:
                gone = True
                log.info("%s %s: the client left during the stream", request.method,
                         request.path)

        async def on_text(delta: str) -> None:
            sent.append(delta)
            await send({"type": "transcript.text.delta", "delta": delta})

        try:
            transcript = await self.transcriber.transcribe(pcm, on_text)
        except NoFreeSlot:  # taken while the response started: rare, and no bug of ours
            log.info("%s %s: no free channels", request.method, request.path)
            await send({"error": {"message": "no free channels", "type": "server_error",
                                  "param": None, "code": "busy"}})
            return response
        except Exception:  # the status is sent: the error goes out as an event (as OpenAI's)
            log.exception("%s %s: transcription failed", request.method, request.path)
            await send({"error": {"message": "internal server error (see the server's log)",
                                  "type": "server_error", "param": None, "code": None}})
            return response
        so_far = "".join(sent)
        if transcript.text.startswith(so_far) and len(transcript.text) > len(so_far):
            await on_text(transcript.text[len(so_far):])
        await send({"type": "transcript.text.done", "text": transcript.text})
        if not gone:
            await response.write_eof()
        return response

    # ------------------------------------------------------------------ speech
    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        self._route_model(text_field(body, "model", ""), "tts", self.speech is not None)
        speech_request, response_format = _speech_request(body)
        try:
            self.speech.check_voice(speech_request.voice)
            chunks = self.speech.stream(speech_request)
        except MoshiError as exc:
            raise bad(str(exc), "voice") from None
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except MoshiError as exc:
                raise bad(str(exc), "input") from None
            except SpeechBusy as exc:
                raise ApiError(503, str(exc), None, "busy", "server_error") from None
            return await send_speech(request, chunks, first, response_format)
        finally:
            await chunks.aclose()


def _no_free_channels() -> ApiError:
    return ApiError(503, "no free channels: every speech-to-text stream is in use; try again",
                    None, "busy", "server_error")


async def _decode_upload(data: bytes, name: str) -> np.ndarray:
    """The upload as 24 kHz mono float audio (400 when it is not audio)."""
    try:
        return await decode_upload(data, name)
    except MoshiError as exc:
        raise bad(str(exc), "file", "invalid_audio") from None


def _verbose(transcript: Transcript, language: str | None) -> dict[str, Any]:
    """OpenAI's verbose_json: always both the words and the segments (the srt/vtt cues)."""
    words = transcript.to_json_dict()["words"]
    segments = [{"id": i, "seek": 0, "start": round(start, 3), "end": round(end, 3),
                 "text": text, "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
                 "compression_ratio": 1.0, "no_speech_prob": 0.0}
                for i, (start, end, text) in enumerate(subtitle_cues(transcript))]
    return {"task": "transcribe", "language": language or "unknown",
            "duration": round(transcript.duration, 3), "text": transcript.text,
            "words": words, "segments": segments}


def _speech_request(body: dict[str, Any]) -> tuple[SpeechRequest, str]:
    text = text_field(body, "input", "")
    if not text.strip():
        raise bad("input is empty: give the text to speak", "input")
    if len(text) > limits.MAX_SPEECH_INPUT_CHARS:
        raise bad(f"input is {len(text)} characters, over the limit of "
                   f"{limits.MAX_SPEECH_INPUT_CHARS}", "input")
    voice = body.get("voice", str(defaults.SPEAKER))
    if isinstance(voice, int) and not isinstance(voice, bool):
        voice = str(voice)
    if not isinstance(voice, str):
        raise bad("voice must be a speaker id such as \"0\" or a saved voice's name", "voice")
    response_format = text_field(body, "response_format", "wav")
    if response_format not in SPEECH_FORMATS:
        raise bad(f"unsupported response_format {response_format!r}: use one of "
                   f"{', '.join(SPEECH_FORMATS)}", "response_format")
    if body.get("speed", 1.0) not in (None, 1, 1.0) or isinstance(body.get("speed"), bool):
        raise bad("speed other than 1.0 is not supported", "speed")
    if text_field(body, "stream_format", "audio") != "audio":
        raise bad("stream_format must be audio (server-sent events are not supported)",
                   "stream_format")
    request = SpeechRequest(
        text=text, voice=voice,
        temperature=option_field(body, "temperature", options.temperature,
                                 defaults.TEMPERATURE, whole=False),
        top_k=option_field(body, "top_k", options.top_k, defaults.TOP_K),
        seed=option_field(body, "seed", options.seed, None))
    return request, response_format


