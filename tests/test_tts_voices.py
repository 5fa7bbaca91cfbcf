"""Voices from one recording: `tts --context-audio` without text is transcribed by Kyutai STT,
`--save-voice` / `--voice` round trip, and the refusals (unknown voice, no speech)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from cli_run import run_main

from moshi_mlx.audio.io import read_audio
from moshi_mlx.errors import MoshiError
from moshi_mlx.speech.generate import Segment, generate_speech
from moshi_mlx.speech.recordings import transcribe_recordings, voice_from_recording
from moshi_mlx.speech.voices import save_voice
from moshi_mlx.transcription.loader import load_transcriber
from moshi_mlx.transcription.transcriber import Transcript
from moshi_mlx.tts import main

FIXTURES = Path(__file__).parent / "fixtures"
CSM = FIXTURES / "csm"
MODEL_ARGS = ["--weights", str(CSM / "sesame"), "--tokenizer", str(CSM / "tokenizer.json")]
CLIP = CSM / "context_speech.wav"
CLIP_TEXT = "The quick brown fox jumps over the lazy dog."
TEXT = "Numbers like seven and twelve are spoken slowly."
GREEDY = ["--temperature", "0", "--seed", "3", "--max-frames", "6"]


@pytest.fixture(scope="module")
def stt_source(tmp_path_factory, stt_dir, official_stt_mlx_files, random_mimi_path) -> Path:
    """A folder laid out as the released kyutai/stt-1b-en_fr-mlx, holding the STT fixture."""
    folder = tmp_path_factory.mktemp("stt_source")
    shutil.copy(official_stt_mlx_files["bf16"], folder / "model.safetensors")
    shutil.copy(stt_dir / "stt_config.json", folder / "config.json")
    shutil.copy(stt_dir / "stt_tokenizer.model", folder / "stt_tokenizer.model")
    (folder / "mimi.safetensors").symlink_to(random_mimi_path)
    return folder


@pytest.fixture(scope="module")
def transcriber(stt_source):
    """The library's Transcriber on the same files: the independent reference."""
    return load_transcriber(stt_source)


@pytest.fixture(scope="module")
def second_clip(tmp_path_factory) -> Path:
    pcm, rate = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    path = tmp_path_factory.mktemp("clips") / "second.wav"
    soundfile.write(path, pcm[: 2 * rate], rate)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    return run_main(main, argv, capsys)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_context_without_text_is_transcribed_as_the_transcriber_hears_it(
        stt_source, transcriber, csm_library, mimi32, random_mimi_path, tmp_path, capsys):
    heard = transcriber.transcribe(CLIP).text.strip()
    assert heard
    codes = tmp_path / "codes.npy"
    code, _, err = run([TEXT, "--codes-out", str(codes), *MODEL_ARGS, "--mimi-weight",
                        str(random_mimi_path), "--stt", str(stt_source), "--context-audio",
                        str(CLIP), *GREEDY], capsys)
    assert code == 0, err
    assert f"{CLIP}: transcript: {heard}" in err.splitlines()
    # That transcript is the context's text: the frames are those of the library given it.
    expected = generate_speech(*csm_library, TEXT, 0, [Segment(0, heard, audio=read_audio(CLIP))],
                               temperature=0, max_frames=6, mimi=mimi32)
    np.testing.assert_array_equal(np.load(codes).T, expected)


def test_several_recordings_are_each_transcribed(stt_source, transcriber, second_clip,
                                                 random_mimi_path, tmp_path, capsys):
    expected = [transcriber.transcribe(path).text.strip() for path in (CLIP, second_clip)]
    code, _, err = run([TEXT, "--codes-out", str(tmp_path / "c.npy"), *MODEL_ARGS,
                        "--mimi-weight", str(random_mimi_path), "--stt", str(stt_source),
                        "--context-audio", str(CLIP), "--context-audio", str(second_clip),
                        *GREEDY], capsys)
    assert code == 0, err
    lines = err.splitlines()
    for path, text in zip((CLIP, second_clip), expected, strict=True):
        assert f"{path}: transcript: {text}" in lines


def test_the_stt_model_loads_with_the_commands_dtype(stt_source, transcriber, random_mimi_path,
                                                     tmp_path, capsys):
    bf16 = load_transcriber(stt_source, dtype="bf16").transcribe(CLIP).text.strip()
    assert bf16 != transcriber.transcribe(CLIP).text.strip()  # the dtype shows in the text
    code, _, err = run([TEXT, "--codes-out", str(tmp_path / "c.npy"), *MODEL_ARGS,
                        "--mimi-weight", str(random_mimi_path), "--stt", str(stt_source),
                        "--dtype", "bf16", "--context-audio", str(CLIP), "--max-frames", "1"],
                       capsys)
    assert code == 0, err
    assert f"{CLIP}: transcript: {bf16}" in err.splitlines()


def test_a_saved_voice_speaks_as_the_full_context(mimi32, random_mimi_path, tmp_path, capsys):
    voices = tmp_path / "voices"
    context = ["--context-audio", str(CLIP), "--context-text", CLIP_TEXT,
               "--context-speaker", "1"]
    full = tmp_path / "full.npy"
    code, _, err = run([TEXT, "--codes-out", str(full), *MODEL_ARGS, "--mimi-weight",
                        str(random_mimi_path), "--speaker", "1", *context, *GREEDY], capsys)
    assert code == 0, err

    # Saved without text to say: only the voice is written, its codes Mimi's encoding.
    code, _, err = run([*MODEL_ARGS, "--mimi-weight", str(random_mimi_path), *context,
                        "--save-voice", "fox", "--voices", str(voices)], capsys)
    assert code == 0, err
    assert json.loads((voices / "fox.json").read_text()) == \
        {"speaker": 1, "text": CLIP_TEXT, "codes": "fox.npy"}
    encoded = np.asarray(mimi32.encode(read_audio(CLIP)[None, None]))[0]
    np.testing.assert_array_equal(np.load(voices / "fox.npy"), encoded)

    # Reused: the codes are loaded, never re-encoded (the Mimi named here does not exist).
    reused = tmp_path / "reused.npy"
    code, _, err = run([TEXT, "--codes-out", str(reused), *MODEL_ARGS, "--mimi-weight",
                        str(tmp_path / "no_such_mimi.safetensors"), "--voice", "fox",
                        "--voices", str(voices), *GREEDY], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(reused), np.load(full))

    # Saving and speaking in one run gives the same frames too.
    both = tmp_path / "both.npy"
    code, _, err = run([TEXT, "--codes-out", str(both), *MODEL_ARGS, "--mimi-weight",
                        str(random_mimi_path), "--speaker", "1", *context, "--save-voice",
                        "fox2", "--voices", str(voices), *GREEDY], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(both), np.load(full))
    np.testing.assert_array_equal(np.load(voices / "fox2.npy"), encoded)


def test_an_unknown_voice_names_the_saved_ones(tmp_path, capsys):
    save_voice(tmp_path, "narrator", Segment(1, "Hello.", codes=np.zeros((32, 2), np.int32)))
    save_voice(tmp_path, "guide", Segment(0, "Hi.", codes=np.ones((32, 2), np.int32)))
    code, _, err = run(["Hello.", "--codes-out", str(tmp_path / "c.npy"), *MODEL_ARGS,
                        "--voice", "alloy", "--voices", str(tmp_path)], capsys)
    assert code == 1
    assert one_error_line(err) == \
        "error: unknown voice 'alloy' (saved voices: guide, narrator)"


@pytest.mark.parametrize("extra, message", [
    (["--voice", "fox", "--context-audio", str(CLIP)],
     "--voice is the whole context and its speaker: drop --context-audio"),
    (["--voice", "fox", "--speaker", "1"], "drop --speaker"),
    (["--save-voice", "fox", "--context-audio", str(CLIP), "--context-audio", str(CLIP),
      "--context-text", "a", "--context-text", "b"], "--save-voice stores one recorded turn"),
    (["--save-voice", "../fox", "--context-audio", str(CLIP)], "bad voice name"),
    (["--context-audio", str(CLIP), "--context-audio", str(CLIP), "--context-text", "a"],
     "needs its --context-text"),
])
def test_voice_options_are_checked_before_loading(extra, message, tmp_path, capsys):
    code, _, err = run(["Hello.", "--codes-out", str(tmp_path / "c.npy"), "--weights",
                        str(tmp_path / "no_weights"), "--stt", str(tmp_path / "no_stt"),
                        *extra], capsys)
    assert code == 1
    assert message in one_error_line(err)


def test_a_recording_without_speech_is_refused_in_one_line(stt_source, transcriber, tmp_path,
                                                           capsys):
    zeros = np.zeros(48000, np.float32)
    # The fixture STT model is random: it emits words on silence, so no speech is told by
    # the recording's level (before any model runs), not by the transcript alone.
    assert transcriber.transcribe_pcm([zeros])[0].text.strip()
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, zeros, 24000)
    for texts in ([], ["Hello."]):
        code, _, err = run(["Go on.", "--codes-out", str(tmp_path / "c.npy"), *MODEL_ARGS,
                            "--stt", str(stt_source), "--context-audio", str(silent),
                            *[a for t in texts for a in ("--context-text", t)]], capsys)
        assert code == 1
        assert one_error_line(err).startswith(f"error: {silent}: no speech in the recording")
    assert not (tmp_path / "c.npy").exists()
    with pytest.raises(MoshiError, match="no speech"):
        voice_from_recording(zeros + 1e-3, "Hello.")  # -60 dBFS: below speech


class EmptyTranscriber:
    """A Transcriber that hears nothing (the real one's transcribe_pcm interface)."""

    def transcribe_pcm(self, pcms):
        return [Transcript(text=" \n", words=[], end_of_turn=[], duration=1.0) for _ in pcms]


def test_an_empty_transcript_is_refused():
    speech = read_audio(CLIP)
    with pytest.raises(MoshiError, match=r"^take\.wav: no speech in the recording \(the "
                                         r"transcript is empty\)"):
        transcribe_recordings(EmptyTranscriber(), [speech], ["take.wav"])


def test_voice_from_recording(transcriber, mimi32):
    heard = voice_from_recording(CLIP, speaker=2, transcriber=transcriber)
    assert (heard.speaker, heard.text, heard.codes) == \
        (2, transcriber.transcribe(CLIP).text.strip(), None)
    np.testing.assert_array_equal(heard.audio, read_audio(CLIP))
    encoded = voice_from_recording(read_audio(CLIP), CLIP_TEXT, mimi=mimi32)
    assert (encoded.speaker, encoded.text, encoded.audio) == (0, CLIP_TEXT, None)
    np.testing.assert_array_equal(encoded.codes,
                                  np.asarray(mimi32.encode(read_audio(CLIP)[None, None]))[0])
    with pytest.raises(MoshiError, match="give the recording's text, or a transcriber"):
        voice_from_recording(CLIP)
