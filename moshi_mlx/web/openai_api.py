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

import argparse
import asyncio
import io
import json
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.cli import options
from moshi_mlx.errors import MoshiError
from moshi_mlx.speech import defaults
from moshi_mlx.transcription.formats import render, subtitle_cues
from moshi_mlx.transcription.transcriber import Transcript
from moshi_mlx.web import limits
from moshi_mlx.web.keys import ApiKeys
from moshi_mlx.web.speech_service import SpeechBusy, SpeechRequest, SpeechService

log = logging.getLogger("moshi_mlx.web")

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
SPEECH_FORMATS = ("wav", "pcm", "flac")
FAMILY_NAMES = {"stt": ("stt",), "tts": ("tts", "csm"), "moshi": ("moshi",)}
OWNERS = {"stt": "kyutai", "tts": "sesame", "moshi": "kyutai"}
MAX_FIELD_BYTES = 4096  # a form field other than the file (model, language, prompt, ...)
PCM16_SCALE = 32767


@dataclass(frozen=True)
class ServedModel:
    id: str  # what /v1/models lists: the source it was loaded from (repo id / folder)
    family: str  # "stt" | "tts" | "moshi"


class AsyncTranscriber(Protocol):
    async def transcribe(self, pcm: np.ndarray,
                         on_text: Callable[[str], Awaitable[None]] | None = None
                         ) -> Transcript: ...


class ApiError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}
        return web.json_response(body, status=self.status)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


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
        form = await _read_form(request)
        self._route_model(form.get("model", ""), "stt", self.transcriber is not None)
        response_format = form.get("response_format", "json")
        if response_format not in TRANSCRIPTION_FORMATS:
            raise _bad(f"unsupported response_format {response_format!r}: use one of "
                       f"{', '.join(TRANSCRIPTION_FORMATS)}", "response_format")
        for granularity in form.lists.get("timestamp_granularities", []):
            if granularity not in GRANULARITIES:
                raise _bad(f"unsupported timestamp granularity {granularity!r}: use word "
                           "and/or segment", "timestamp_granularities")
        stream = _form_bool(form.get("stream", "false"), "stream")
        if form.file is None:
            raise _bad("no audio: send the file as the multipart field 'file'", "file")
        name, data = form.file
        pcm = await _decode_upload(data, name)
        if stream:
            return await self._stream_transcript(request, pcm)
        transcript = await self.transcriber.transcribe(pcm)
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
        body = await _read_json(request)
        self._route_model(_text_field(body, "model", ""), "tts", self.speech is not None)
        speech_request, response_format = _speech_request(body)
        try:
            self.speech.check_voice(speech_request.voice)
            chunks = self.speech.stream(speech_request)
        except MoshiError as exc:
            raise _bad(str(exc), "voice") from None
        try:
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except MoshiError as exc:
                raise _bad(str(exc), "input") from None
            except SpeechBusy as exc:
                raise ApiError(503, str(exc), None, "busy", "server_error") from None
            return await _send_speech(request, chunks, first, response_format)
        finally:
            await chunks.aclose()


# ---------------------------------------------------------------------- request bodies


@dataclass
class _Form:
    lists: dict[str, list[str]]
    file: tuple[str, bytes] | None

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.lists.get(name)
        return values[-1] if values else default


async def _read_form(request: web.Request) -> _Form:
    """A multipart form within the limits: the file part's bytes, the other fields as text
    (`name[]` collected under `name`)."""
    _refuse_long_body(request, limits.APP_MAX_REQUEST_BYTES)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:  # not a multipart content type
        raise _bad(f"expected a multipart/form-data body ({exc})") from None
    lists: dict[str, list[str]] = {}
    upload = None
    total = 0
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            if part.name == "file":
                data = await _read_part(part, limits.MAX_UPLOAD_BYTES, "the audio file")
                upload = (_printable(part.filename or "") or "file", data)
            else:
                data = await _read_part(part, MAX_FIELD_BYTES, f"the field {part.name!r}")
            total += len(data)
            if total > limits.APP_MAX_REQUEST_BYTES:  # many parts, each within its limit
                raise ApiError(413, "the form is over the limit of "
                               f"{limits.APP_MAX_REQUEST_BYTES} bytes", None,
                               "request_too_large")
            if part.name == "file":
                continue
            try:
                value = data.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"the field {part.name!r} is not UTF-8 text", part.name) from None
            lists.setdefault(part.name.removesuffix("[]"), []).append(value)
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        reason = str(exc).strip().splitlines()[-1].strip() or type(exc).__name__
        raise _bad(f"malformed multipart body ({reason})") from None
    return _Form(lists, upload)


def _printable(name: str, longest: int = 100) -> str:
    """A client's file name as it may go into a message and a log line (no line breaks)."""
    return "".join(ch for ch in name if ch.isprintable())[:longest]


async def _read_part(part: Any, limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit of {limit} bytes", part.name,
                           "file_too_large" if part.name == "file" else "field_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_long_body(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"the request body ({request.content_length} bytes) is over the "
                       f"limit of {limit} bytes", None, "request_too_large")


async def _read_json(request: web.Request) -> dict[str, Any]:
    _refuse_long_body(request, limits.MAX_JSON_BYTES)
    data = bytearray()
    while chunk := await request.content.read(64 * 1024):
        data += chunk
        if len(data) > limits.MAX_JSON_BYTES:
            raise ApiError(413, f"the request body is over the limit of {limits.MAX_JSON_BYTES}"
                           " bytes", None, "request_too_large")
    try:
        body = json.loads(bytes(data))
    except ValueError as exc:  # not UTF-8, not JSON, or a number too long to read
        raise _bad(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _form_bool(value: str, name: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise _bad(f"{name} must be true or false, got {value!r}", name)


async def _decode_upload(data: bytes, name: str) -> np.ndarray:
    """The upload as 24 kHz mono float audio (400 when it is not audio); decoded on a worker
    thread, not the event loop."""
    from moshi_mlx.audio.io import decode_audio_bytes

    try:
        return await asyncio.get_running_loop().run_in_executor(
            None, decode_audio_bytes, data, name)
    except MoshiError as exc:
        raise _bad(str(exc), "file", "invalid_audio") from None


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


def _text_field(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string", name)
    return value


def _option_field(body: dict[str, Any], name: str, parse: Callable[[str], Any],
                  default: Any) -> Any:
    """A number checked by the commands' own option type (`--temp`, `--top-k`, `--seed`), so
    the server accepts what they accept."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise _bad(f"{name} must be a number, got {value!r}", name)
    if isinstance(value, float) and value.is_integer() and parse is not options.temperature:
        value = int(value)
    try:
        return parse(str(value))
    except ValueError:
        raise _bad(f"{name} must be a whole number, got {value!r}", name) from None
    except argparse.ArgumentTypeError as exc:
        raise _bad(str(exc), name) from None


def _speech_request(body: dict[str, Any]) -> tuple[SpeechRequest, str]:
    text = _text_field(body, "input", "")
    if not text.strip():
        raise _bad("input is empty: give the text to speak", "input")
    if len(text) > limits.MAX_SPEECH_INPUT_CHARS:
        raise _bad(f"input is {len(text)} characters, over the limit of "
                   f"{limits.MAX_SPEECH_INPUT_CHARS}", "input")
    voice = body.get("voice", "0")
    if isinstance(voice, int) and not isinstance(voice, bool):
        voice = str(voice)
    if not isinstance(voice, str):
        raise _bad("voice must be a speaker id such as \"0\" or a saved voice's name", "voice")
    response_format = _text_field(body, "response_format", "wav")
    if response_format not in SPEECH_FORMATS:
        raise _bad(f"unsupported response_format {response_format!r}: use one of "
                   f"{', '.join(SPEECH_FORMATS)}", "response_format")
    if body.get("speed", 1.0) not in (None, 1, 1.0) or isinstance(body.get("speed"), bool):
        raise _bad("speed other than 1.0 is not supported", "speed")
    if _text_field(body, "stream_format", "audio") != "audio":
        raise _bad("stream_format must be audio (server-sent events are not supported)",
                   "stream_format")
    request = SpeechRequest(
        text=text, voice=voice,
        temperature=_option_field(body, "temperature", options.temperature,
                                  defaults.TEMPERATURE),
        top_k=_option_field(body, "top_k", options.top_k, defaults.TOP_K),
        seed=_option_field(body, "seed", options.seed, None))
    return request, response_format


# ---------------------------------------------------------------------- speech bodies


def streamed_wav_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 32-bit float mono WAV header of unknown length (RIFF and data sizes 0xFFFFFFFF, the
    convention players and ffmpeg read as "until the end of the stream")."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)  # IEEE float
    return b"".join([b"RIFF", struct.pack("<I", unknown), b"WAVE",
                     b"fmt ", struct.pack("<I", len(fmt)), fmt,
                     b"data", struct.pack("<I", unknown)])


def pcm16_bytes(audio: np.ndarray) -> bytes:
    """Float audio as raw signed 16-bit little-endian samples (clipped to -1..1)."""
    scaled = np.round(np.clip(audio, -1.0, 1.0) * PCM16_SCALE)
    return scaled.astype("<i2").tobytes()


def flac_bytes(audio: np.ndarray) -> bytes:
    """A whole 16-bit FLAC file; no audio gives no bytes (libsndfile writes no empty FLAC)."""
    import soundfile

    if audio.size == 0:
        return b""
    out = io.BytesIO()
    soundfile.write(out, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return out.getvalue()


CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac"}


async def _send_speech(request: web.Request, chunks: AsyncIterator[np.ndarray],
                       first: np.ndarray | None, response_format: str) -> web.StreamResponse:
    """Stream the audio as it is decoded: wav (one header, then float32 samples) and pcm
    (s16le) frame by frame; flac as a whole file at the end."""
    response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[response_format]})
    await response.prepare(request)
    whole: list[np.ndarray] = []
    frames = 0

    async def write(data: bytes) -> None:
        # A client that stops reading would hold the one speech slot: it is dropped.
        try:
            await asyncio.wait_for(response.write(data), limits.SEND_TIMEOUT_S)
        except asyncio.TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError(f"not read for {limits.SEND_TIMEOUT_S:g} s") from None

    try:
        if response_format == "wav":
            await write(streamed_wav_header())
        pending = [] if first is None else [first]
        while True:
            for audio in pending:
                frames += 1
                if response_format == "flac":
                    whole.append(audio)
                elif response_format == "wav":
                    await write(audio.astype("<f4").tobytes())
                else:
                    await write(pcm16_bytes(audio))
            try:
                pending = [await anext(chunks)]
            except StopAsyncIteration:
                break
        if response_format == "flac":
            audio = np.concatenate(whole) if whole else np.zeros(0, np.float32)
            await write(flac_bytes(audio))
        await response.write_eof()
    except ConnectionError as exc:
        log.info("%s %s: the client left after %d frames (%s)", request.method, request.path,
                 frames, exc)
    except MoshiError as exc:  # a later sentence could not be spoken: the body ends there
        log.info("%s %s: speech ended early after %d frames: %s", request.method,
                 request.path, frames, exc)
    except Exception:  # our bug; the status is sent, so the body just ends
        log.exception("%s %s: speech failed after %d frames", request.method, request.path,
                      frames)
    return response
