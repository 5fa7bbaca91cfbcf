"""Every limit the server enforces, in one place (the README's table quotes these)."""

from __future__ import annotations

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # an audio file for /v1/audio/transcriptions (OpenAI's)
MAX_FIELD_BYTES = 4096  # a form field other than the file (model, language, prompt...)
MAX_JSON_BYTES = 64 * 1024  # a JSON request body (/v1/audio/speech)
# aiohttp's client_max_size for the app: the largest upload plus room for the multipart form.
APP_MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
MAX_SPEECH_INPUT_CHARS = 4096  # characters of `input` for /v1/audio/speech (OpenAI's)
MAX_QUEUED_SPEECH = 8  # speech requests waiting for the one generation slot; more get 503
SEND_TIMEOUT_S = 30.0  # a streamed body's write may wait this long for a client reading
