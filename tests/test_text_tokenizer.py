"""The one SentencePiece loader used by the Moshi engine and the STT command."""

from __future__ import annotations

import pytest

from moshi_mlx.errors import WeightsError
from moshi_mlx.loading.text_tokenizer import load_sentencepiece


def test_loads_a_sentencepiece_model(fixtures_dir):
    sp = load_sentencepiece(fixtures_dir / "tokenizer.model")
    ids = sp.encode("hello world")
    assert ids and sp.decode(ids) == "hello world"


@pytest.mark.parametrize("content", [b"not a model\n", None])
def test_other_files_give_one_weights_error_line(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"tokenizer\.model is not a SentencePiece model$"):
        load_sentencepiece(path)
