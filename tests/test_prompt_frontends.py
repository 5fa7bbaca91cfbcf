"""Issue 19's prompt options on every Moshi front end: `local` (live and file mode),
`local_web`, `serve --moshi` and /api/chat's `text_prompt` query parameter.

Part 1 (no model): the flags, every bad input (one line, exit 1, before the model loads), what
the front ends ask of the engine (a fake that records the calls: the Engine contract of
`moshi_mlx.conversation.prompts`), the server's query parameter and its limit, and our page's
text box reaching that parameter (Chromium).

Part 2 (the real fixture engine, end to end): the flags give the conversation the library's
`Engine.set_prompt` gives, a saved state resumes it, and /api/chat's client prompt is the
library's prompted conversation. These need the Engine's prompt phases (the "phases" branch).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
import soundfile
from cli_run import run_main
from test_web_server import PCM, FakeEngine, audio_bytes, expect_handshake, frame_int16

from moshi_mlx import local, local_web, serve
from moshi_mlx.cli.prompt_args import DEFAULT_STATE_NAME, PromptPlan, prompt_plan
from moshi_mlx.conversation.prompts import MoshiPrompt
from moshi_mlx.errors import PromptError
from moshi_mlx.web import limits, protocol
from moshi_mlx.web.server import ChatServer, bound_port
from moshi_mlx.web.server import serve as serve_chat

FIXTURES = Path(__file__).parent / "fixtures"
SPEECH = FIXTURES / "speech.wav"
ROLE = "You are a ship's cook who loves soup."
FRONT_ENDS = {  # name -> (main, argv that reaches the prompt options)
    "local-file": (local.main, ["--input-file", str(SPEECH), "--output-file", "{tmp}/o.wav"]),
    "local-live": (local.main, []),
    "local_web": (local_web.main, ["--port", "0"]),
    "serve": (serve.main, ["--moshi"]),
}


# ------------------------------------------------------------------------------- inputs


def write_state(path: Path) -> Path:
    """A well-formed safetensors file (one float32 tensor), written by hand."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.float32(1).tobytes())
    return path


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    rate = 24000
    t = np.arange(rate) / rate
    files = {
        "text": tmp_path / "role.txt", "blank": tmp_path / "blank.txt",
        "latin1": tmp_path / "latin1.txt", "folder": tmp_path / "folder",
        "voice": tmp_path / "voice.wav", "silent": tmp_path / "silent.wav",
        "empty_wav": tmp_path / "empty.wav", "not_audio": tmp_path / "notes.wav",
        "state": write_state(tmp_path / "state.safetensors"),
        "not_state": tmp_path / "notes.safetensors",
    }
    files["text"].write_text(f"  {ROLE}\n", encoding="utf-8")
    files["blank"].write_text(" \n\n", encoding="utf-8")
    files["latin1"].write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    files["folder"].mkdir()
    soundfile.write(files["voice"], 0.3 * np.sin(2 * np.pi * 220 * t), rate)
    soundfile.write(files["silent"], np.zeros(rate), rate)
    soundfile.write(files["empty_wav"], np.zeros(0), rate)
    files["not_audio"].write_text("not a recording")
    files["not_state"].write_text("not a state")
    return files


def parse(main_module, argv: list[str]):
    return main_module.build_parser().parse_args(argv)


# ------------------------------------------------------------------------------- the flags


@pytest.mark.parametrize("module", [local, local_web, serve])
def test_every_front_end_reads_the_prompt_flags_into_one_plan(module, tmp_path, inputs):
    """Text stripped, a 48 kHz stereo voice as 24 kHz mono, a folder for the saved state."""
    rate = 48000
    t = np.arange(rate // 2) / rate
    tone = 0.25 * np.sin(2 * np.pi * 300 * t)
    stereo = tmp_path / "stereo48k.wav"
    soundfile.write(stereo, np.stack([tone, tone], axis=1), rate)
    base = ["--moshi"] if module is serve else []
    args = parse(module, [*base, "--text-prompt", f"  {ROLE} ", "--voice-prompt", str(stereo),
                          "--save-prompt-state", f"{tmp_path}/states/"])
    plan = prompt_plan(args)
    assert plan.prompt.text == ROLE and plan.prompt.voice_codes is None and plan.state is None
    assert plan.save == tmp_path / "states" / DEFAULT_STATE_NAME and plan.save.parent.is_dir()
    voice = plan.prompt.voice_pcm
    assert voice.dtype == np.float32 and voice.shape == (12000,)  # 0.5 s at 24 kHz
    expected = 0.25 * np.sin(2 * np.pi * 300 * np.arange(12000) / 24000)
    np.testing.assert_allclose(voice[2000:10000], expected[2000:10000], atol=2e-3)

    from_file = prompt_plan(parse(module, [*base, "--text-prompt-file", str(inputs["text"])]))
    assert from_file == PromptPlan(MoshiPrompt(text=ROLE))
    state = prompt_plan(parse(module, [*base, "--prompt-state", str(inputs["state"])]))
    assert state == PromptPlan(state=inputs["state"]) and not state.empty
    assert prompt_plan(parse(module, base)).empty


def test_a_non_ascii_text_file_is_read_as_utf8(tmp_path):
    role = tmp_path / "role.txt"
    role.write_text("Tu es un cuisinier \u00e0 bord, \u00e9nergique. \u65e5\u672c\n",
                    encoding="utf-8")
    plan = prompt_plan(parse(local, ["--text-prompt-file", str(role)]))
    assert plan.prompt.text == "Tu es un cuisinier \u00e0 bord, \u00e9nergique. \u65e5\u672c"


BAD_INPUTS = [  # (argv, with {name} for the `inputs` files, the message's text)
    (["--text-prompt", "a", "--text-prompt-file", "{text}"],
     "give --text-prompt or --text-prompt-file, not both"),
    (["--prompt-state", "{state}", "--text-prompt", "a"],
     "--prompt-state replaces the prompt phases: drop --text-prompt"),
    (["--prompt-state", "{state}", "--voice-prompt", "{voice}", "--text-prompt-file", "{text}"],
     "drop --text-prompt-file and --voice-prompt"),
    (["--prompt-state", "{state}", "--save-prompt-state", "{tmp}/again.safetensors"],
     "--save-prompt-state with --prompt-state: that state is saved already"),
    (["--save-prompt-state", "{tmp}/s.safetensors"], "--save-prompt-state needs a prompt to save"),
    (["--text-prompt", "  "], "--text-prompt is empty"),
    (["--text-prompt-file", "{tmp}/missing.txt"], "--text-prompt-file {tmp}/missing.txt: no such"),
    (["--text-prompt-file", "{blank}"], "--text-prompt-file {blank} is empty"),
    (["--text-prompt-file", "{latin1}"], "--text-prompt-file {latin1}: not UTF-8 text"),
    (["--text-prompt-file", "{folder}"], "is a folder, not a text file"),
    (["--voice-prompt", "{tmp}/missing.wav"], "--voice-prompt {tmp}/missing.wav: no such audio"),
    (["--voice-prompt", "{not_audio}"], "--voice-prompt {not_audio}: cannot read audio"),
    (["--voice-prompt", "{empty_wav}"], "holds no samples"),
    (["--voice-prompt", "{silent}"],
     "--voice-prompt {silent}: the voice prompt cannot be used: audio is silent"),
    (["--prompt-state", "{tmp}/missing.safetensors"], "--prompt-state {tmp}/missing.safetensors"),
    (["--prompt-state", "{not_state}"], "is not a safetensors file"),
    (["--text-prompt", "a", "--save-prompt-state", "{tmp}/nowhere/s.safetensors"],
     "--save-prompt-state: cannot write"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load (or file resolution) fails the test: the prompt checks come first."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model load was reached")

    monkeypatch.setattr("moshi_mlx.cli.options.build_engine", loaded)
    monkeypatch.setattr("moshi_mlx.cli.options.resolve_model_files", loaded)
    monkeypatch.setattr("moshi_mlx.serve.resolve_models", loaded)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_prompt_input_is_one_line_before_the_model_loads(front_end, argv, message, inputs,
                                                             tmp_path, capsys, no_model_load):
    names = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path)}
    main, base = FRONT_ENDS[front_end]
    full = [word.format(**names) for word in (*base, *argv)]
    code, out, err = run_main(main, full, capsys)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()], err
    assert err.startswith("error: ") and message.format(**names) in err, err
    assert out == ""


def test_serve_refuses_prompt_flags_without_moshi(capsys, no_model_load):
    code, _, err = run_main(serve.main, ["--stt", "--text-prompt", "a"], capsys)
    assert code == 1
    assert err.strip() == "error: --text-prompt: Moshi's prompt needs --moshi"


# ------------------------------------------------------------------- what the engine is asked


class PromptedFakeEngine(FakeEngine):
    """test_web_server's FakeEngine, plus the prompt methods of the Engine contract: every call
    recorded in order with the thread it ran on. A text prompt of "TOO LONG" is refused as
    the real engine refuses a prompt longer than its context."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def reset(self) -> None:
        super().reset()
        self.calls.append(("reset",))

    def set_prompt(self, prompt: MoshiPrompt) -> None:
        self.threads.add(threading.get_ident())
        if prompt.text == "TOO LONG":
            raise PromptError("text prompt of 3 tokens: the context leaves room for 2")
        self.calls.append(("set_prompt", prompt))

    def load_prompt_state(self, path) -> None:
        self.calls.append(("load_prompt_state", Path(path)))

    def save_prompt_state(self, path) -> None:
        self.calls.append(("save_prompt_state", Path(path)))

    def prompts(self) -> list[tuple]:
        return [call for call in self.calls if call[0] != "reset"]


def test_the_plan_runs_the_phases_then_saves_and_says_how_long(inputs, tmp_path, capsys):
    from moshi_mlx.cli.prompt_args import apply_prompt

    plan = prompt_plan(parse(local, ["--text-prompt", ROLE, "--voice-prompt",
                                     str(inputs["voice"]), "--save-prompt-state",
                                     str(tmp_path / "s.safetensors")]))
    engine = PromptedFakeEngine()
    assert apply_prompt(engine, plan) is engine
    assert [c[0] for c in engine.calls] == ["set_prompt", "save_prompt_state", "reset"]
    assert engine.calls[0][1] is plan.prompt and engine.calls[1][1] == tmp_path / "s.safetensors"
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"prompt phases ran (voice 1.0 s, text {len(ROLE)} characters) in ")
    assert f"; state saved to {tmp_path / 's.safetensors'} in " in line and "\n" not in line

    loaded = PromptedFakeEngine()
    apply_prompt(loaded, prompt_plan(parse(local, ["--prompt-state", str(inputs["state"])])))
    assert loaded.calls == [("load_prompt_state", inputs["state"]), ("reset",)]
    assert capsys.readouterr().err.startswith(f"prompt state loaded from {inputs['state']} in ")

    untouched = PromptedFakeEngine()
    apply_prompt(untouched, PromptPlan())
    assert untouched.calls == [] and capsys.readouterr().err == ""


def test_local_file_mode_applies_the_plan_to_the_loaded_engine(inputs, tmp_path, monkeypatch,
                                                               capsys):
    engine = PromptedFakeEngine()
    order: list[str] = []

    def build_engine(args):
        order.append("load")
        return engine

    def run_file(engine_, *args, **kwargs):
        order.append("run")
        assert engine_ is engine and [c[0] for c in engine.calls] == ["set_prompt", "reset"]
        return SimpleNamespace(summary_line=lambda: "frames 0")

    monkeypatch.setattr("moshi_mlx.cli.options.build_engine", build_engine)
    monkeypatch.setattr("moshi_mlx.audio.fileloop.run_file", run_file)
    code, _, err = run_main(local.main, ["--input-file", str(SPEECH), "--output-file",
                                         str(tmp_path / "o.wav"), "--text-prompt-file",
                                         str(inputs["text"])], capsys)
    assert code == 0 and order == ["load", "run"]
    assert engine.calls[0] == ("set_prompt", MoshiPrompt(text=ROLE))
    assert err.splitlines()[0].startswith(f"prompt phases ran (text {len(ROLE)} characters)")


def test_serve_loads_moshi_then_applies_its_prompt_on_the_model_thread(inputs, monkeypatch):
    from moshi_mlx.conversation import engine as engine_module

    engine = PromptedFakeEngine()
    monkeypatch.setattr(engine_module.Engine, "from_files",
                        classmethod(lambda cls, *a, **k: engine))
    args = parse(serve, ["--moshi", "--prompt-state", str(inputs["state"])])
    files = {"moshi": SimpleNamespace(weight="w", codec="c", tokenizer="t", config=None)}
    loaded = serve.load_models(files, args, prompt_plan(args))
    assert loaded.moshi is engine and loaded.moshi_prompt == PromptPlan(state=inputs["state"])
    assert engine.calls == [("load_prompt_state", inputs["state"]), ("reset",)]


# ------------------------------------------------------------------- /api/chat's text_prompt


async def converse(url: str, query: dict | None = None, frames: int = 1) -> list[np.ndarray]:
    """One conversation in our protocol: the handshake, `frames` audio frames answered (the
    audio received for each), close."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url + "/api/chat", protocols=PCM, params=query or {})
        await expect_handshake(ws)
        answers = []
        for n in range(frames):
            await ws.send_bytes(audio_bytes(frame_int16(n)))
            while True:
                msg = await ws.receive(timeout=60)
                if msg.data[0] == protocol.KIND_AUDIO:
                    answers.append(protocol.decode_pcm(msg.data[1:]))
                    break
        await ws.close()
        return answers


async def refused(url: str, query: dict) -> tuple[dict, int, str]:
    """A conversation the server refuses: its status message, close code and reason."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(url + "/api/chat", protocols=PCM, params=query)
        msg = await ws.receive(timeout=10)
        assert msg.data[0] == protocol.KIND_STATUS, msg
        status = json.loads(msg.data[1:])
        close = await ws.receive(timeout=10)
        assert close.type == aiohttp.WSMsgType.CLOSE, close
        return status, close.data, close.extra


def run_server(engine, prompt: PromptPlan, scenario):
    server = ChatServer(engine, prompt=prompt)

    async def main():
        runner = await serve_chat(server, "127.0.0.1", 0)
        try:
            return await scenario(f"http://127.0.0.1:{bound_port(runner)}")
        finally:
            await runner.cleanup()

    try:
        return asyncio.run(main())
    finally:
        server.close()


def test_a_clients_text_prompt_runs_before_its_handshake_and_the_servers_comes_back(tmp_path):
    voice = np.full(2400, 0.1, dtype=np.float32)
    server_prompt = MoshiPrompt(text="the server's role", voice_pcm=voice)
    engine = PromptedFakeEngine()
    seen: list[list] = []

    async def scenario(url):
        # The prompt is in the engine when the handshake arrives (then one reset).
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/api/chat", protocols=PCM,
                                          params={"text_prompt": f" {ROLE} ", "text_topk": "5"})
            await expect_handshake(ws)
            seen.append(list(engine.calls))
            await ws.close()
        await asyncio.sleep(0.1)
        await converse(url, {"text_prompt": ROLE})  # the same text: nothing runs again
        seen.append(list(engine.calls))
        await converse(url)  # no parameter: the server's own prompt again
        seen.append(list(engine.calls))
        await converse(url, {"text_prompt": ""})  # PersonaPlex's client with no prompt
        seen.append(list(engine.calls))

    run_server(engine, PromptPlan(server_prompt), scenario)
    clients = MoshiPrompt(text=ROLE, voice_pcm=voice)  # the client's text, the server's voice
    assert seen[0] == [("set_prompt", clients), ("reset",)]
    assert engine.prompts() == [("set_prompt", clients), ("set_prompt", server_prompt)]
    assert seen[1] == seen[0] + [("reset",)]
    assert seen[2] == seen[1] + [("set_prompt", server_prompt), ("reset",)]
    assert seen[3] == seen[2] + [("reset",)]
    assert len(engine.threads) == 1 and threading.get_ident() not in engine.threads


def test_the_query_personaplex_web_client_builds_gives_its_text_prompt():
    """Every parameter NVIDIA PersonaPlex's client puts in the URL (client/src/pages/
    Conversation/Conversation.tsx, buildURL): only the text prompt is a prompt."""
    engine = PromptedFakeEngine()
    query = {"text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8",
             "audio_topk": "250", "pad_mult": "0", "text_seed": "1234", "audio_seed": "5678",
             "repetition_penalty_context": "64", "repetition_penalty": "1",
             "text_prompt": ROLE, "voice_prompt": "NATF2.pt"}

    async def scenario(url):
        return await converse(url, query)

    answers = run_server(engine, PromptPlan(), scenario)
    assert engine.prompts() == [("set_prompt", MoshiPrompt(text=ROLE))]
    np.testing.assert_allclose(answers[0], -0.5 * frame_int16(0) / 32768, atol=1 / 32768)


def test_the_servers_saved_state_restores_it_without_running_phases(tmp_path):
    saved = tmp_path / "server.safetensors"
    plan = PromptPlan(MoshiPrompt(text="the server's role"), save=saved)
    engine = PromptedFakeEngine()

    async def scenario(url):
        await converse(url, {"text_prompt": ROLE})
        await converse(url)

    run_server(engine, plan, scenario)
    assert engine.prompts() == [("set_prompt", MoshiPrompt(text=ROLE)),
                                ("load_prompt_state", saved)]


def test_a_text_prompt_over_the_limit_is_refused_with_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="moshi_mlx.web")
    engine = PromptedFakeEngine()
    limit = limits.MAX_TEXT_PROMPT_CHARS
    # Percent-encoded, 9 bytes a character: over aiohttp's default request line of 8190 bytes.
    longest = "\u00e9\U0001f372" * (limit // 2)

    async def scenario(url):
        over = await refused(url, {"text_prompt": "a" * (limit + 1)})
        logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        await converse(url, {"text_prompt": longest})
        return over, logged

    (status, code, reason), logged = run_server(engine, PromptPlan(), scenario)
    expected = f"bad query parameter: text_prompt of {limit + 1} characters: at most {limit}"
    assert status == {"type": "error", "message": expected}
    assert code == 1008 and reason == expected
    assert len(logged) == 1 and expected in logged[0]
    assert engine.prompts() == [("set_prompt", MoshiPrompt(text=longest))]  # the limit is in


def test_a_prompt_the_engine_refuses_closes_with_its_reason_then_the_next_client_is_served(
        caplog):
    caplog.set_level(logging.INFO, logger="moshi_mlx.web")
    engine = PromptedFakeEngine()

    async def scenario(url):
        answer = await refused(url, {"text_prompt": "TOO LONG"})
        logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        answers = await converse(url, frames=1)
        return answer, logged, answers

    (status, code, reason), logged, answers = run_server(engine, PromptPlan(), scenario)
    expected = "bad text_prompt: text prompt of 3 tokens: the context leaves room for 2"
    assert status["type"] == "error" and status["message"] == expected
    assert code == 1008 and reason == expected
    assert logged == ["conversation refused: text_prompt: text prompt of 3 tokens: the context "
                      "leaves room for 2"]
    # The failed prompt may have left anything in the engine: the server's (none) runs again.
    assert engine.prompts() == [("set_prompt", MoshiPrompt())]
    np.testing.assert_allclose(answers[0], -0.5 * frame_int16(0) / 32768, atol=1 / 32768)


# ------------------------------------------------------------------------------ our page


def test_the_pages_text_box_reaches_the_query(chromium_executable, tmp_path):
    from playwright.async_api import async_playwright
    from test_web_browser import _chromium_args, _wait_for

    engine = PromptedFakeEngine()
    typed = "Tu es un cuisinier & tu parles de soupe? 100% \u00e9t\u00e9 \U0001f372"

    async def scenario(url):
        async with async_playwright() as pw:
            browser = await pw.chromium.launch_persistent_context(
                tmp_path / "profile", executable_path=chromium_executable, headless=True,
                args=_chromium_args())
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(url + "/")
            box = page.locator("#text-prompt")
            limit = await box.get_attribute("maxlength")
            await box.fill(f"  {typed}\n")
            await page.click("#connect")
            await _wait_for(page, "m.state === 'connected'", 30)
            first = list(engine.prompts())
            disabled = await box.is_disabled()
            await page.click("#connect")  # Disconnect
            await _wait_for(page, "m.state === 'disconnected'", 10)
            await box.fill("")
            await page.click("#connect")
            await _wait_for(page, "m.state === 'connected'", 30)
            second = list(engine.prompts())
            await page.click("#connect")
            await browser.close()
            return limit, first, disabled, second, errors

    server_prompt = MoshiPrompt(text="the server's role")
    limit, first, disabled, second, errors = run_server(
        engine, PromptPlan(server_prompt), scenario)
    assert errors == []
    assert limit == str(limits.MAX_TEXT_PROMPT_CHARS) and disabled
    assert first == [("set_prompt", MoshiPrompt(text=typed))]
    assert second == first + [("set_prompt", server_prompt)]


# ------------------------------------------------- end to end: the real fixture engine


def fixture_model_argv(mimi: Path) -> list[str]:
    return ["--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
            "--config", str(FIXTURES / "lm_config.json"),
            "--tokenizer", str(FIXTURES / "tokenizer.model"), "--mimi-weight", str(mimi),
            "--dtype", "f32", "--text-temp", "0", "--audio-temp", "0", "--seed", "7"]


def fixture_engine(mimi: Path):
    from moshi_mlx.conversation.engine import Engine, EngineOptions
    from moshi_mlx.loading.options import ModelOptions
    from moshi_mlx.modules.sampling import SamplingSettings

    return Engine.from_files(
        FIXTURES / "lm_pytorch.safetensors", mimi, FIXTURES / "tokenizer.model",
        config=FIXTURES / "lm_config.json",
        options=EngineOptions(ModelOptions(dtype="f32", seed=7),
                              SamplingSettings(0.0, 25, 0.0, 250)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """1 s of the test speech as the user's audio, and another second of it as a voice."""
    folder = tmp_path_factory.mktemp("clips")
    pcm, rate = soundfile.read(SPEECH, dtype="float32")
    soundfile.write(folder / "user.wav", pcm[rate: 2 * rate], rate, subtype="FLOAT")
    soundfile.write(folder / "voice.wav", pcm[4 * rate: 5 * rate], rate, subtype="FLOAT")
    return {"user": folder / "user.wav", "voice": folder / "voice.wav"}


def test_e2e_local_file_mode_prompt_and_its_saved_state_give_the_librarys_conversation(
        random_mimi_path, clips, tmp_path, capsys):
    from moshi_mlx.audio.fileloop import run_file

    argv = fixture_model_argv(random_mimi_path)
    state = tmp_path / "cook.safetensors"
    prompted, resumed = tmp_path / "prompted.wav", tmp_path / "resumed.wav"
    code, _, err = run_main(local.main, [
        *argv, "--text-prompt", ROLE, "--voice-prompt", str(clips["voice"]),
        "--save-prompt-state", str(state), "--input-file", str(clips["user"]),
        "--output-file", str(prompted)], capsys)
    assert code == 0, err
    assert "prompt phases ran (voice 1.0 s, text" in err and state.is_file()
    code, _, err = run_main(local.main, [*argv, "--prompt-state", str(state), "--input-file",
                                         str(clips["user"]), "--output-file", str(resumed)],
                            capsys)
    assert code == 0, err
    assert f"prompt state loaded from {state}" in err

    # The library, prompted by hand, and the same library unprompted.
    voice, _ = soundfile.read(clips["voice"], dtype="float32")
    reference = fixture_engine(random_mimi_path)
    reference.set_prompt(MoshiPrompt(text=ROLE, voice_pcm=voice))
    reference.reset()
    run_file(reference, clips["user"], tmp_path / "reference.wav")
    plain = fixture_engine(random_mimi_path)
    run_file(plain, clips["user"], tmp_path / "plain.wav")
    wanted = soundfile.read(tmp_path / "reference.wav")[0]
    np.testing.assert_array_equal(soundfile.read(prompted)[0], wanted)
    np.testing.assert_array_equal(soundfile.read(resumed)[0], wanted)
    assert not np.array_equal(soundfile.read(tmp_path / "plain.wav")[0], wanted)


def test_e2e_api_chat_client_prompt_is_the_librarys_prompted_conversation(random_mimi_path):
    frames = 4
    user = [frame_int16(n).astype(np.float32) / 32768 for n in range(frames)]

    def conversation(engine) -> list[np.ndarray]:
        return [protocol.decode_pcm(protocol.encode_pcm(engine.process(pcm).pcm))
                for pcm in user]

    reference = fixture_engine(random_mimi_path)
    reference.set_prompt(MoshiPrompt(text=ROLE))
    reference.reset()
    prompted = conversation(reference)
    plain = conversation(fixture_engine(random_mimi_path))

    server = ChatServer()
    server.load_engine(lambda: fixture_engine(random_mimi_path))

    async def main():
        runner = await serve_chat(server, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{bound_port(runner)}"
        try:
            return (await converse(url, {"text_prompt": ROLE}, frames),
                    await converse(url, frames=frames))
        finally:
            await runner.cleanup()

    try:
        with_prompt, without = asyncio.run(main())
    finally:
        server.close()
    for got, want in ((with_prompt, prompted), (without, plain)):
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
    assert not np.array_equal(np.stack(prompted), np.stack(plain))  # the prompt told
