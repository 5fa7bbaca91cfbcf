"""OpenAI-style request bodies within the server's limits, and OpenAI-shaped refusals."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from moshi_mlx.web import limits


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


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


@dataclass
class Form:
    """A multipart form: each field's values (`name[]` under `name`) and the file part."""

    lists: dict[str, list[str]]
    file: tuple[str, bytes] | None

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.lists.get(name)
        return values[-1] if values else default


async def read_form(request: web.Request) -> Form:
    """A multipart form within the limits: the file part's bytes, the other fields as text
    (`name[]` collected under `name`)."""
    _refuse_long_body(request, limits.APP_MAX_REQUEST_BYTES)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:  # not a multipart content type
        raise bad(f"expected a multipart/form-data body ({exc})") from None
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
                data = await _read_part(part, limits.MAX_FIELD_BYTES, f"the field {part.name!r}")
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
                raise bad(f"the field {part.name!r} is not UTF-8 text", part.name) from None
            lists.setdefault(part.name.removesuffix("[]"), []).append(value)
    except ApiError:
        raise
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        reason = str(exc).strip().splitlines()[-1].strip() or type(exc).__name__
        raise bad(f"malformed multipart body ({reason})") from None
    return Form(lists, upload)


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


async def read_json(request: web.Request) -> dict[str, Any]:
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
        raise bad(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    return body


def form_bool(value: str, name: str) -> bool:
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0", ""):
        return False
    raise bad(f"{name} must be true or false, got {value!r}", name)


def text_field(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(f"{name} must be a string", name)
    return value


def option_field(body: dict[str, Any], name: str, parse: Callable[[str], Any],
                 default: Any, whole: bool = True) -> Any:
    """A number checked by the commands' own option type (`--temp`, `--top-k`, `--seed`), so
    the server accepts what they accept; `whole`: 7.0 is read as 7."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)):
        raise bad(f"{name} must be a number, got {value!r}", name)
    if whole and isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return parse(str(value))
    except ValueError:
        raise bad(f"{name} must be a whole number, got {value!r}", name) from None
    except argparse.ArgumentTypeError as exc:
        raise bad(str(exc), name) from None
