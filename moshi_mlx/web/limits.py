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

# Kyutai's STT protocol (/api/asr-streaming)
MAX_ASR_MESSAGE_BYTES = 4 * 1024 * 1024  # one msgpack message (~35 s of Audio floats)
ASR_MAX_BUFFERED_SAMPLES = 60 * 24000  # audio waiting per stream before its socket is not read
ASR_PING_SECONDS = 10.0  # ping period; a peer that does not answer is dropped (Kyutai's 10 s)
ASR_IDLE_SECONDS = 120.0  # a stream that sends no message for this long is closed (Kyutai's)

# Moshi's /api/chat
# A client's own text prompt (`text_prompt`), in characters: PersonaPlex's web client's limit.
MAX_TEXT_PROMPT_CHARS = 1000
# aiohttp's limit on a request line (its default: 8190 bytes), raised so that a URL holding
# the longest text prompt, percent-encoded (up to 12 bytes a character), is read.
MAX_REQUEST_LINE_BYTES = 12 * MAX_TEXT_PROMPT_CHARS + 4096
