"""The OpenAI-compatible routes against a real server, driven by the `openai` SDK: the text and
the audio equal what `python -m moshi_mlx.stt` and `python -m moshi_mlx.tts` give for the same
input, and every bad input gets its status and OpenAI's error shape."""

from __future__ import annotations

import json
import logging
import struct
import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path

import numpy as np
import openai
import pytest
import soundfile
from aiohttp import web
from cli_run import run_main
from serve_helpers import BackgroundServer

from moshi_mlx import stt, tts
from moshi_mlx.cli.model_thread import load_on_model_thread, start_model_thread, stop_model_thread
from moshi_mlx.speech.generate import Segment
from moshi_mlx.speech.voices import save_voice
from moshi_mlx.web import limits
from moshi_mlx.web.keys import ApiKeys
from moshi_mlx.web.openai_api import OpenAiRoutes, ServedModel
from moshi_mlx.web.speech_service import SpeechService

CSM = Path(__file__).parent / "fixtures" / "csm"
CSM_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]
KEY = "test-key"
FRAME = 1920
WAV_HEADER_BYTES = 44
TEXT = "Hello from Sesame."


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    clip, rate = soundfile.read(str(CSM / "context_speech.wav"), dtype="float32")
    assert rate == 24000
    save_voice(folder, "narrator", Segment(1, "The quick brown fox jumps over the lazy dog.",
                                           audio=clip))
    return folder


@pytest.fixture(scope="module")
def server(stt_dir, random_mimi_path, csm_library, mimi32, voices):
    """Both families on one server as `serve` builds it (`serve.build_app`: the batched STT
    streams and CSM on one model thread)."""
    from moshi_mlx.loading.models import load_lm, load_mimi
    from moshi_mlx.loading.text_tokenizer import load_sentencepiece
    from moshi_mlx.serve import SPEECH_SERVICE, Loaded, build_app
    from moshi_mlx.transcription.slots import SttSlots

    executor = start_model_thread()

    def load_stt() -> SttSlots:
        lm = load_lm(stt_dir / "stt_pytorch.safetensors", config=stt_dir / "stt_config.json")
        return SttSlots(lm, load_sentencepiece(stt_dir / "stt_tokenizer.model"),
                        load_mimi(random_mimi_path, num_codebooks=lm.cfg.n_q), 2)

    loaded = Loaded(stt=load_on_model_thread(executor, load_stt),
                    speech=(*csm_library, mimi32),
                    sources={"stt": "kyutai/stt-fixture", "tts": str(CSM / "sesame")})
    args = Namespace(api_key=[KEY], host="127.0.0.1", voices=str(voices))
    apps = []

    def make_app() -> web.Application:
        apps.append(build_app(loaded, args, executor))
        return apps[-1]

    with BackgroundServer(make_app) as running:
        running.executor, running.speech = executor, apps[0][SPEECH_SERVICE]
        yield running
    stop_model_thread(executor)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def upload(tmp_path_factory, fixtures_dir) -> Path:
    """The first 5 s of the speech fixture as 48 kHz stereo FLAC: decoded, averaged and
    resampled by the server as the stt command does it."""
    pcm, rate = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    clip = pcm[: 5 * rate]
    stereo = np.stack([clip, clip], axis=1)
    path = tmp_path_factory.mktemp("upload") / "speech.flac"
    from moshi_mlx.audio.io import resample

    soundfile.write(str(path), resample(stereo, rate, 48000), 48000, subtype="PCM_24")
    return path


@pytest.fixture(scope="module")
def stt_json(upload, stt_command_args, tmp_path_factory) -> dict:
    """What `python -m moshi_mlx.stt FILE --format json` says about the upload."""
    out = tmp_path_factory.mktemp("stt") / "expected.json"
    code = stt.main([*stt_command_args, str(upload), "--format", "json", "-o", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["text"].strip()  # the fixture model says something about this clip
    return result


# ---------------------------------------------------------------------- transcriptions


def test_json_and_text_equal_the_stt_command(client, upload, stt_json):
    with upload.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert result.text == stt_json["text"]
    assert result.model_extra["words"] == stt_json["words"]  # the stt command's json, whole
    with upload.open("rb") as f:
        text = client.audio.transcriptions.create(model="stt", file=f, response_format="text")
    assert text == stt_json["text"] + "\n"


def test_subtitles_equal_the_stt_command(client, upload, stt_command_args, tmp_path, capsys):
    for fmt in ("srt", "vtt"):
        code, out, err = run_main(stt.main, [*stt_command_args, str(upload), "--format", fmt],
                                  capsys)
        assert code == 0, err
        with upload.open("rb") as f:
            got = client.audio.transcriptions.create(model="whisper-1", file=f,
                                                     response_format=fmt)
        assert got == out and got.count("-->") >= 1


def test_verbose_json_carries_words_and_segments(client, upload, stt_json):
    with upload.open("rb") as f:
        result = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json",
            timestamp_granularities=["word", "segment"], language="en")
    assert result.text == stt_json["text"] and result.language == "en"
    assert result.duration == pytest.approx(5.0, abs=1e-3)
    assert [(w.word, w.start, w.end) for w in result.words] == \
        [(w["word"], w["start"], w["end"]) for w in stt_json["words"]]
    # Segments: the subtitle cues, so they hold every word once, in order, within the clip.
    assert result.segments
    assert " ".join(s.text for s in result.segments) == " ".join(w["word"]
                                                                 for w in stt_json["words"])
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    assert all(0 <= s.start <= s.end <= 5.0 for s in result.segments)


def test_streamed_deltas_add_up_to_the_done_text(client, upload, stt_json):
    with upload.open("rb") as f:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=f,
                                                         stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.done") == 1
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 2  # the text came in pieces, as it was decoded
    assert "".join(deltas) == events[-1].text == stt_json["text"]


# ---------------------------------------------------------------------- speech


def _tts_stream(tmp_path: Path, mimi: Path, *extra: str) -> np.ndarray:
    out = tmp_path / "tts.wav"
    assert tts.main([TEXT, *CSM_ARGS, "--mimi-weight", str(mimi), "--temperature", "0",
                     "--stream", "-o", str(out), *extra]) == 0
    audio, rate = soundfile.read(str(out), dtype="float32")
    assert rate == 24000 and len(audio) > 0
    return audio


def test_streamed_speech_equals_tts_greedy_output(client, random_mimi_path, tmp_path):
    expected = _tts_stream(tmp_path, random_mimi_path)
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", input=TEXT, voice="0", response_format="wav",
            extra_body={"temperature": 0}) as response:
        assert response.headers["content-type"] == "audio/wav"
        chunks = list(response.iter_bytes())
    body = b"".join(chunks)
    assert len(chunks) > 1  # streamed, not one block at the end
    # One header (float32 mono 24 kHz, unknown length), then the samples.
    assert body[:4] == b"RIFF" and body[8:16] == b"WAVEfmt "
    assert struct.unpack("<HHIIHH", body[20:36]) == (3, 1, 24000, 96000, 4, 32)
    assert body[36:40] == b"data" and body[40:44] == b"\xff\xff\xff\xff"
    assert body.count(b"RIFF") == 1
    audio = np.frombuffer(body[WAV_HEADER_BYTES:], "<f4")
    assert len(audio) == len(expected) and len(audio) % FRAME == 0
    np.testing.assert_array_equal(audio, expected)
    decoded, rate = soundfile.read(_as_file(body), dtype="float32")
    assert rate == 24000
    np.testing.assert_array_equal(decoded, expected)  # a player reads the streamed header


def _as_file(data: bytes):
    import io

    return io.BytesIO(data)


def test_pcm_and_flac_formats(client, random_mimi_path, tmp_path):
    expected = _tts_stream(tmp_path, random_mimi_path)
    pcm = client.audio.speech.create(model="csm", input=TEXT, voice="0", response_format="pcm",
                                     extra_body={"temperature": 0}).content
    samples = np.frombuffer(pcm, "<i2").astype(np.float64) / 32767
    assert len(samples) == len(expected)
    np.testing.assert_allclose(samples, np.clip(expected, -1, 1), atol=0.5 / 32767 + 1e-7)
    flac = client.audio.speech.create(model="csm", input=TEXT, voice="0",
                                      response_format="flac",
                                      extra_body={"temperature": 0}).content
    audio, rate = soundfile.read(_as_file(flac), dtype="float64")
    assert rate == 24000 and len(audio) == len(expected)
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1 / 32767)


def test_a_seeded_sampled_request_equals_tts_with_that_seed(client, random_mimi_path,
                                                           tmp_path):
    expected = _tts_stream(tmp_path, random_mimi_path, "--temperature", "0.9", "--top-k", "20",
                           "--seed", "7")
    body = client.audio.speech.create(model="tts-1", input=TEXT, voice="0",
                                      extra_body={"seed": 7, "top_k": 20}).content
    np.testing.assert_array_equal(np.frombuffer(body[WAV_HEADER_BYTES:], "<f4"), expected)


def test_a_saved_voice_speaks_as_its_context_turn(client, random_mimi_path, voices, tmp_path):
    context = tmp_path / "context.json"
    context.write_text(json.dumps([{"speaker": 1, "text": json.loads(
        (voices / "narrator.json").read_text())["text"],
        "audio": str(voices / "narrator.wav")}]))
    expected = _tts_stream(tmp_path, random_mimi_path, "--speaker", "1", "--context",
                           str(context))
    body = client.audio.speech.create(model="tts-1", input=TEXT, voice="narrator",
                                      extra_body={"temperature": 0}).content
    np.testing.assert_array_equal(np.frombuffer(body[WAV_HEADER_BYTES:], "<f4"), expected)
    alone = _tts_stream(tmp_path, random_mimi_path, "--speaker", "1")
    assert len(alone) != len(expected) or not np.array_equal(alone, expected)


def test_one_generation_at_a_time_and_a_client_that_leaves_frees_it(client, server,
                                                                   caplog):
    caplog.set_level(logging.INFO, logger="moshi_mlx.web")
    long_text = "One, two, three, four, five, six, seven, eight, nine and ten."
    server.speech.max_queued = 0  # nobody may wait: a second request while one runs is refused
    try:
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", input=long_text, voice="0", response_format="pcm") as first:
            body = first.iter_bytes()  # kept: a dropped iterator closes the response
            assert len(next(body)) > 0  # generating
            # The model thread is not held between frames: other work there gets in.
            assert server.executor.submit(lambda: "between frames").result(timeout=10) == \
                "between frames"
            with pytest.raises(openai.APIStatusError) as info:
                client.audio.speech.create(model="tts-1", input="Hi.", voice="0")
            assert info.value.status_code == 503 and _error(info)["code"] == "busy"
    finally:
        server.speech.max_queued = limits.MAX_QUEUED_SPEECH
    # The first client left early: its generation ends at its next frame and the next
    # request is served (it waits its turn meanwhile).
    audio = client.audio.speech.create(model="tts-1", input="Hi.", voice="0",
                                       response_format="pcm", extra_body={"temperature": 0})
    assert len(audio.content) > 0
    left = [r.getMessage() for r in caplog.records if "the client left" in r.getMessage()]
    assert len(left) == 1 and "/v1/audio/speech" in left[0]


def test_a_client_that_stops_reading_is_dropped(csm_library, mimi32, monkeypatch, caplog):
    import socket

    caplog.set_level(logging.INFO, logger="moshi_mlx.web")
    monkeypatch.setattr(limits, "SEND_TIMEOUT_S", 0.5)
    executor = start_model_thread()

    def make_app() -> web.Application:
        app = web.Application()
        OpenAiRoutes(keys=ApiKeys(), models=[ServedModel("csm", "tts")], transcriber=None,
                     speech=SpeechService(*csm_library, mimi32, executor)).add_routes(app)
        return app

    body = json.dumps({"model": "tts-1", "voice": "0", "temperature": 0,
                       "input": "One, two, three, four, five, "
                       "six, seven, eight, nine and ten."}).encode()
    with BackgroundServer(make_app, send_buffer=4096) as running:
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", running.port))
        try:
            reader.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Authorization: Bearer public_token\r\n"
                           b"Content-Type: application/json\r\nContent-Length: "
                           + str(len(body)).encode() + b"\r\n\r\n" + body)
            # Never read. The generation is dropped once a write waits 0.5 s, so the next
            # request is served (it waits its turn behind the stuck one meanwhile).
            other = openai.OpenAI(base_url=f"{running.url}/v1", api_key="public_token",
                                  max_retries=0, timeout=60)
            audio = other.audio.speech.create(model="tts-1", input="Hi.", voice="0",
                                              response_format="pcm")
            assert len(audio.content) > 0
        finally:
            reader.close()
    stop_model_thread(executor)
    dropped = [r.getMessage() for r in caplog.records if "not read for 0.5 s" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------- models


def test_models_lists_what_is_loaded(client):
    models = client.models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [
        ("kyutai/stt-fixture", "model", "kyutai"), (str(CSM / "sesame"), "model", "sesame")]
    assert all(isinstance(m.created, int) for m in models.data)


def test_a_family_not_loaded_is_model_not_found():
    def make_app() -> web.Application:
        app = web.Application()
        OpenAiRoutes(keys=ApiKeys(), models=[], transcriber=None, speech=None).add_routes(app)
        return app

    with BackgroundServer(make_app) as running:
        bare = openai.OpenAI(base_url=f"{running.url}/v1", api_key="public_token",
                             max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            bare.audio.speech.create(model="tts-1", input="Hi.", voice="0")
        assert info.value.body["code"] == "model_not_found"
        with pytest.raises(openai.NotFoundError) as info:
            bare.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))
        assert info.value.body["code"] == "model_not_found"
        assert bare.models.list().data == []


# ---------------------------------------------------------------------- bad input


def _error(exc_info) -> dict:
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}
    return body


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_missing_or_wrong_key_is_401_on_every_route(server, key, upload):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    for method, path, data in (("GET", "/v1/models", None),
                               ("POST", "/v1/audio/speech", b'{"input": "Hi."}'),
                               ("POST", "/v1/audio/transcriptions", upload.read_bytes())):
        status, body = _raw(server, method, path, data, headers)
        assert status == 401, path
        assert body["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert _error(info)["code"] == "invalid_api_key"


def _raw(server, method: str, path: str, data: bytes | None, headers: dict[str, str]
         ) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_an_upload_that_is_not_audio_is_400(client, caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1",
                                           file=("notes.wav", b"these are not samples"))
    error = _error(info)
    assert error["param"] == "file" and "notes.wav: cannot read audio" in error["message"]
    # The server logs one line, no traceback (the client's own log lines aside).
    server_lines = [r for r in caplog.records if r.name.split(".")[0] in ("moshi_mlx", "aiohttp")]
    assert [(r.name, r.exc_info) for r in server_lines] == [("moshi_mlx.web", None)]
    assert "400 notes.wav: cannot read audio" in server_lines[0].getMessage()
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("empty.wav", b""))
    assert _error(info)["param"] == "file"
    assert _error(info)["message"] == \
        "empty.wav: cannot read audio (Format not recognised.)"


def test_a_file_name_cannot_write_control_characters_to_the_log(server):
    body = (b"--b\r\nContent-Disposition: form-data; name=file; "
            b"filename*=UTF-8''a%0A%1B%5B2Kb.wav\r\n\r\nnot audio\r\n--b--\r\n")
    status, reply = _raw(server, "POST", "/v1/audio/transcriptions", body,
                         {"Authorization": f"Bearer {KEY}",
                          "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400
    assert reply["error"]["message"].startswith("a[2Kb.wav: cannot read audio")


def test_uploads_over_the_limit_are_413_at_the_exact_size(client, monkeypatch):
    monkeypatch.setattr(limits, "MAX_UPLOAD_BYTES", 1000)
    with pytest.raises(openai.BadRequestError):  # at the limit: read, then found not audio
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 1000))
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x" * 1001))
    assert info.value.status_code == 413
    assert "over the limit of 1000 bytes" in _error(info)["message"]


def test_a_body_over_the_app_limit_is_413(server, monkeypatch):
    monkeypatch.setattr(limits, "APP_MAX_REQUEST_BYTES", 100)
    status, body = _raw(server, "POST", "/v1/audio/transcriptions", b"x" * 101,
                        {"Authorization": f"Bearer {KEY}",
                         "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 413 and body["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("fields, param, message", [
    ({"input": ""}, "input", "input is empty"),
    ({"input": "   \n"}, "input", "input is empty"),
    ({"input": "a" * (limits.MAX_SPEECH_INPUT_CHARS + 1)}, "input",
     f"over the limit of {limits.MAX_SPEECH_INPUT_CHARS}"),
    ({"voice": "alloy"}, "voice", "saved voices: narrator"),
    ({"response_format": "mp3"}, "response_format", "use one of wav, pcm, flac"),
    ({"speed": 1.5}, "speed", "speed other than 1.0"),
    ({"speed": True}, "speed", "speed other than 1.0"),
    ({"temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),
    ({"top_k": 2.5}, "top_k", "top_k must be a whole number"),
    ({"top_k": -1}, "top_k", "top-k must be >= 0"),
    ({"seed": 2**63}, "seed", "seed must be between 0 and 2**63 - 1"),
    ({"seed": 10**400}, "seed", "seed must be between 0 and 2**63 - 1"),
])
def test_bad_speech_requests_are_400(client, fields, param, message):
    request = {"model": "tts-1", "input": "Hi.", "voice": "0", **fields}
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(**{k: request.pop(k) for k in ("model", "input", "voice")},
                                   extra_body=request)
    error = _error(info)
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_input_limit_is_exact(client, monkeypatch):
    monkeypatch.setattr(limits, "MAX_SPEECH_INPUT_CHARS", len("Hi."))
    audio = client.audio.speech.create(model="tts-1", input="Hi.", voice="0",
                                       response_format="pcm", extra_body={"temperature": 0})
    assert len(audio.content) > 0
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", input="Hi!!", voice="0")
    assert "4 characters, over the limit of 3" in _error(info)["message"]


@pytest.mark.parametrize("body", [b"{", b"[1, 2]", b"\xff\xfe", b'{"input": 5}',
                                  b'{"input": "Hi.", "seed": ' + b"9" * 5000 + b"}"])
def test_malformed_json_is_400(server, body):
    status, reply = _raw(server, "POST", "/v1/audio/speech", body,
                         {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"


def test_bad_transcription_fields_are_400(client, upload):
    for kwargs, param in (({"response_format": "docx"}, "response_format"),
                          ({"timestamp_granularities": ["sentence"]},
                           "timestamp_granularities")):
        with upload.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
            client.audio.transcriptions.create(model="whisper-1", file=f, **kwargs)
        assert _error(info)["param"] == param
    with upload.open("rb") as f, pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=f,
                                           extra_body={"stream": "maybe"})
    assert _error(info)["param"] == "stream"


def test_a_body_that_is_not_a_form_is_400(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for content_type, body in (("application/json", b'{"file": "x"}'),
                               ("multipart/form-data; boundary=b", b"--b\r\nnonsense")):
        status, reply = _raw(server, "POST", "/v1/audio/transcriptions", body,
                             {**headers, "Content-Type": content_type})
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
    status, reply = _raw(server, "POST", "/v1/audio/transcriptions",
                         b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
                         b"whisper-1\r\n--b--\r\n",
                         {**headers, "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and reply["error"]["param"] == "file"


@pytest.mark.parametrize("headers, query, kyutai, bearer", [
    ({}, "", False, False),
    ({"kyutai-api-key": KEY}, "", True, False),
    ({}, f"?auth_id={KEY}", True, False),
    ({"kyutai-api-key": "nope"}, "?auth_id=nope", False, False),
    ({"Authorization": f"Bearer {KEY}"}, "", False, True),
    ({"Authorization": f"bearer  {KEY} "}, "", False, True),
    ({"Authorization": KEY}, "", False, False),
    ({"Authorization": "Bearer public_token"}, "", False, False),
])
def test_keys_are_read_from_kyutai_and_openai_spellings(headers, query, kyutai, bearer):
    from aiohttp.test_utils import make_mocked_request

    keys = ApiKeys([KEY])
    request = make_mocked_request("GET", f"/api/asr-streaming{query}", headers=headers)
    assert (keys.kyutai_ok(request), keys.bearer_ok(request)) == (kyutai, bearer)
    assert not keys.only_default and ApiKeys().only_default
    assert ApiKeys().bearer_ok(make_mocked_request(
        "GET", "/", headers={"Authorization": "Bearer public_token"}))
