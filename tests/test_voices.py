"""The voice store: a saved turn comes back as it was saved; names are checked in one place."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moshi_mlx.errors import MoshiError
from moshi_mlx.speech.generate import Segment
from moshi_mlx.speech.voices import (
    check_voice_name,
    default_voices_folder,
    list_voices,
    load_voice,
    save_voice,
)


def test_codes_and_audio_round_trip(tmp_path):
    codes = np.arange(32 * 5, dtype=np.int32).reshape(32, 5) % 2048
    audio = np.linspace(-0.5, 0.5, 4800, dtype=np.float32)
    save_voice(tmp_path, "deep", Segment(3, "A deep voice.", codes=codes))
    save_voice(tmp_path, "bright.v2", Segment(0, "Bonjour à tous.", audio=audio))
    assert list_voices(tmp_path) == ["bright.v2", "deep"]
    assert json.loads((tmp_path / "deep.json").read_text()) == \
        {"speaker": 3, "text": "A deep voice.", "codes": "deep.npy"}
    deep = load_voice(tmp_path, "deep")
    assert (deep.speaker, deep.text, deep.audio) == (3, "A deep voice.", None)
    np.testing.assert_array_equal(deep.codes, codes)
    bright = load_voice(tmp_path, "bright.v2")
    assert (bright.speaker, bright.text, bright.codes) == (0, "Bonjour à tous.", None)
    np.testing.assert_array_equal(bright.audio, audio)  # float WAV: exact


def test_an_unknown_voice_names_the_saved_ones(tmp_path):
    with pytest.raises(MoshiError, match=f"no voice is saved in {tmp_path}"):
        load_voice(tmp_path, "alloy")
    save_voice(tmp_path, "narrator", Segment(1, "Hello.", codes=np.zeros((32, 2), np.int32)))
    save_voice(tmp_path, "guide", Segment(0, "Hi.", codes=np.ones((32, 2), np.int32)))
    with pytest.raises(MoshiError, match=r"unknown voice 'alloy' \(saved voices: guide, "
                                         r"narrator\)"):
        load_voice(tmp_path, "alloy")
    assert list_voices(tmp_path / "missing") == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", "a\\b", ".hidden", "12", "x" * 65,
                                  "with space", None])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(MoshiError, match="bad voice name"):
        check_voice_name(name)
    with pytest.raises(MoshiError, match="bad voice name"):
        save_voice(tmp_path, name, Segment(0, "Hi.", codes=np.zeros((32, 1), np.int32)))
    assert list(tmp_path.iterdir()) == []


def test_a_voice_needs_audio_or_codes(tmp_path):
    with pytest.raises(MoshiError, match="needs audio or codes"):
        save_voice(tmp_path, "empty", Segment(0, "Only text."))


def test_default_folder_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_voices_folder() == tmp_path / "moshi_mlx" / "voices"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_voices_folder() == tmp_path / "home" / ".cache" / "moshi_mlx" / "voices"
