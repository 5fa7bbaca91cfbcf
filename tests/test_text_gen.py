"""Text-only generation (`python -m moshi_mlx.text`, `moshi_mlx.conversation.text_gen`) against
transformers' `MoshiForCausalLM` on the tiny Moshi LM (tests/fixtures/moshi_text_golden.npz,
tools/derive_moshi_text_golden.py): the same prompt ids, the same 24 greedy tokens, the same
first logits, for the PyTorch, the official MLX and the transformers layouts of the weights."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_run import run_main

from moshi_mlx.conversation.text_gen import TextGenerator, encode_prompt
from moshi_mlx.loading.models import load_lm
from moshi_mlx.loading.text_tokenizer import load_sentencepiece
from moshi_mlx.modules.sampling import Sampler
from moshi_mlx.text import main

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "moshi_text_golden.npz"
TOKENIZER = FIXTURES / "tokenizer.model"
PYTORCH_FILES = ["--moshi-weight", str(FIXTURES / "lm_pytorch.safetensors"),
                 "--config", str(FIXTURES / "lm_config.json"), "--tokenizer", str(TOKENIZER)]
GREEDY = ["--temp", "0", "--dtype", "f32"]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def golden() -> dict:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def cases(golden: dict) -> list[dict]:
    return [{"text": str(golden[f"{i}_text"]), "bos": bool(golden[f"{i}_bos"]),
             "prompt": golden[f"{i}_prompt_ids"].tolist(), "tokens": golden[f"{i}_tokens"].tolist(),
             "first_logits": golden[f"{i}_first_logits"]} for i in range(int(golden["cases"]))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_sentencepiece(TOKENIZER)


def test_the_golden_was_made_from_these_files(golden, transformers_moshi):
    assert str(golden["pytorch_sha256"]) == sha256_of(FIXTURES / "lm_pytorch.safetensors")
    assert str(golden["tokenizer_sha256"]) == sha256_of(TOKENIZER)
    assert str(golden["transformers_sha256"]) == sha256_of(transformers_moshi / "model.safetensors")
    both = {(c["text"], c["bos"]) for c in cases(golden)}
    assert len(both) == 4 and {bos for _, bos in both} == {False, True}


@pytest.fixture(scope="module", params=["pytorch", "mlx", "transformers"])
def lm_float32(request, official_mlx_files, transformers_moshi):
    weights = {"pytorch": FIXTURES / "lm_pytorch.safetensors",
               "mlx": official_mlx_files["bf16"],
               "transformers": transformers_moshi}[request.param]
    config = None if request.param == "transformers" else FIXTURES / "lm_config.json"
    return load_lm(weights, config=config, dtype=mx.float32)


def test_greedy_tokens_equal_transformers(lm_float32, tokenizer, golden):
    generator = TextGenerator(lm_float32, tokenizer, Sampler(0.0))
    for case in cases(golden):
        prompt = encode_prompt(tokenizer, case["text"], bos=case["bos"])
        assert prompt == case["prompt"]
        assert list(generator.tokens(prompt, len(case["tokens"]))) == case["tokens"], case["text"]


def test_first_logits_equal_transformers(lm_float32, golden):
    for case in cases(golden):
        logits = lm_float32.text_only(mx.array([case["prompt"]]), lm_float32.make_cache())
        expected = case["first_logits"]
        assert logits.shape == (1, expected.shape[0])
        scale = float(np.abs(expected).max())
        np.testing.assert_allclose(np.array(logits[0]), expected, rtol=1e-4, atol=1e-5 * scale)


def test_a_prompt_in_pieces_through_the_cache_equals_it_at_once(lm_float32, golden):
    prompt = cases(golden)[0]["prompt"]
    whole = lm_float32.text_only(mx.array([prompt]), lm_float32.make_cache())
    caches = lm_float32.make_cache()
    lm_float32.text_only(mx.array([prompt[:4]]), caches)
    for token in prompt[4:-1]:
        lm_float32.text_only(mx.array([[token]]), caches)
    stepped = lm_float32.text_only(mx.array([prompt[-1:]]), caches)
    assert caches[0].offset == len(prompt)
    scale = float(mx.abs(whole).max())
    np.testing.assert_allclose(np.array(stepped), np.array(whole), rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------------------- the command


def printed(tokenizer, tokens: list[int]) -> str:
    """What the tokens print, read from the tokenizer alone: PAD (3), EPAD (0) and control
    pieces nothing, "▁" a space."""
    silent = {0, 3}
    return "".join(tokenizer.id_to_piece(t).replace("\u2581", " ") for t in tokens
                   if t not in silent and not tokenizer.is_control(t))


def run_json(argv: list[str], capsys) -> dict:
    code, out, err = run_main(main, [*argv, "--json"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.mark.parametrize("bos", [False, True])
def test_json_prints_prompt_tokens_and_text(bos, golden, tokenizer, capsys):
    case = next(c for c in cases(golden) if c["bos"] == bos)
    flags = ["--bos"] if bos else []
    result = run_json([case["text"], *PYTORCH_FILES, *GREEDY, *flags,
                       "--max-tokens", str(len(case["tokens"]))], capsys)
    assert result == {"prompt_tokens": case["prompt"], "tokens": case["tokens"],
                      "text": printed(tokenizer, case["tokens"])}
    assert (result["prompt_tokens"][0] == tokenizer.bos_id()) == bos


def test_bos_alone_is_a_prompt(capsys):
    result = run_json(["", *PYTORCH_FILES, *GREEDY, "--bos", "--max-tokens", "3"], capsys)
    assert result["prompt_tokens"] == [1] and len(result["tokens"]) == 3


class FlushLog(io.StringIO):
    """stdout that records what had been written at each flush."""

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[str] = []

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


def test_the_text_streams_piece_by_piece(golden, tokenizer, monkeypatch, capsys):
    case = cases(golden)[0]
    stdout = FlushLog()
    monkeypatch.setattr("sys.stdout", stdout)
    assert main([case["text"], *PYTORCH_FILES, *GREEDY, "--max-tokens", "24"]) == 0
    assert stdout.getvalue() == printed(tokenizer, case["tokens"]) + "\n"
    pieces = [printed(tokenizer, [t]) for t in case["tokens"]]
    shown = [p for p in pieces if p]
    assert len(shown) > 10
    # one flush per printed piece, each after that piece and before the next
    assert stdout.flushed[: len(shown)] == ["".join(shown[: i + 1]) for i in range(len(shown))]


def test_sampling_follows_the_seed_and_top_k_1_is_greedy(golden, capsys):
    case = cases(golden)[0]
    base = [case["text"], *PYTORCH_FILES, "--dtype", "f32", "--max-tokens", "24"]
    first = run_json([*base, "--temp", "1.5", "--top-k", "0", "--seed", "5"], capsys)
    again = run_json([*base, "--temp", "1.5", "--top-k", "0", "--seed", "5"], capsys)
    other = run_json([*base, "--temp", "1.5", "--top-k", "0", "--seed", "6"], capsys)
    assert first == again and first["tokens"] != other["tokens"]
    assert first["tokens"] != case["tokens"]
    top1 = run_json([*base, "--temp", "1.5", "--top-k", "1", "--seed", "5"], capsys)
    assert top1["tokens"] == case["tokens"]


def test_the_defaults_sample_as_moshi_s_text_stream(capsys):
    from moshi_mlx.text import build_parser

    args = build_parser().parse_args(["hi"])
    assert (args.temp, args.top_k, args.max_tokens, args.bos, args.json) == (0.7, 25, 100,
                                                                           False, False)


def test_an_empty_prompt_is_one_line(capsys):
    for prompt in ("", "   "):
        code, out, err = run_main(main, [prompt, *PYTORCH_FILES], capsys)
        assert (code, out) == (1, "")
        assert err.splitlines() == ["error: the prompt is empty: give some text, or start "
                                    "from BOS alone (--bos)"]


def test_a_prompt_longer_than_the_context_is_refused_before_loading(monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr("moshi_mlx.loading.models.load_lm", no_load)
    code, out, err = run_main(main, ["Hello you", *PYTORCH_FILES, "--max-tokens", "2994"],
                              capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error: the prompt (7 tokens) and 2994 new tokens exceed the "
                                "model's context of 3000 tokens: at most 2993 new tokens after "
                                "this prompt"]


def test_a_prompt_that_just_fits_the_context_runs(tmp_path, capsys):
    config = json.loads((FIXTURES / "lm_config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "context": 16}))
    files = [*PYTORCH_FILES[:2], "--config", str(tmp_path / "config.json"),
             "--tokenizer", str(TOKENIZER)]
    result = run_json(["Hello you", *files, *GREEDY, "--max-tokens", "9"], capsys)
    assert len(result["prompt_tokens"]) + len(result["tokens"]) == 16
    code, _, err = run_main(main, ["Hello you", *files, "--max-tokens", "10"], capsys)
    assert code == 1 and "context of 16 tokens: at most 9 new tokens" in err


def test_an_stt_model_is_refused_with_its_command(stt_dir, capsys):
    code, out, err = run_main(main, ["Hello", "--moshi-weight",
                                     str(stt_dir / "stt_pytorch.safetensors"),
                                     "--tokenizer", str(stt_dir / "stt_tokenizer.model")], capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == ["error: stt_pytorch.safetensors is a Kyutai STT checkpoint, not "
                                "a Moshi checkpoint; use python -m moshi_mlx.stt"]


def test_the_library_refuses_a_prompt_when_asked_not_when_iterated(tokenizer):
    from moshi_mlx.errors import PromptError

    lm = load_lm(FIXTURES / "lm_pytorch.safetensors", config=FIXTURES / "lm_config.json")
    generator = TextGenerator(lm, tokenizer)
    with pytest.raises(PromptError, match="context of 3000 tokens: at most 10 new tokens"):
        generator.tokens([5] * 2990, 11)
    with pytest.raises(PromptError, match="no tokens"):
        generator.tokens([], 1)
    assert isinstance(next(generator.tokens([5], 2999)), int)  # just fits
