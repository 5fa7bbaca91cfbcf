"""Sampling, seeding and long conversations (sliding-window attention) of the Moshi LM."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from references import numpy_rope

from moshi_mlx import load_lm
from moshi_mlx.conversation.lm_gen import LmGen
from moshi_mlx.loading.models import read_lm_config
from moshi_mlx.models.lm_config import LmConfig
from moshi_mlx.modules.sampling import Sampler, SamplingSettings

SHORT_CONTEXT = 6


@pytest.fixture(scope="module")
def tiny_cfg(fixtures_dir: Path) -> LmConfig:
    return read_lm_config(fixtures_dir / "lm_config.json")


@pytest.fixture(scope="module")
def lm(fixtures_dir: Path, tiny_cfg: LmConfig):
    return load_lm(fixtures_dir / "lm_pytorch.safetensors", config=tiny_cfg, dtype=mx.float32)


@pytest.fixture(scope="module")
def short_lm(fixtures_dir: Path, tiny_cfg: LmConfig):
    cfg = tiny_cfg.with_overrides(context=SHORT_CONTEXT)
    return load_lm(fixtures_dir / "lm_pytorch.safetensors", config=cfg, dtype=mx.float32)


# --------------------------------------------------------------------------- sampler


def test_temperature_zero_is_argmax():
    logits = mx.random.normal((5, 300), key=mx.random.key(1))
    picked = Sampler(0.0, 25)(logits, None)
    np.testing.assert_array_equal(np.array(picked), np.array(logits).argmax(axis=1))


def test_top_k_sampling_follows_the_tempered_softmax_of_the_k_best():
    vocab, top_k, temp, draws = 200, 10, 0.7, 40000
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=vocab).astype(np.float32)
    batch = mx.broadcast_to(mx.array(logits), (draws, vocab))
    samples = np.array(Sampler(temp, top_k)(batch, mx.random.key(5)))
    best = np.argsort(-logits)[:top_k]
    assert set(np.unique(samples)) <= set(best.tolist())
    expected = np.exp((logits[best] - logits[best].max()) / temp)
    expected /= expected.sum()
    observed = np.array([(samples == i).mean() for i in best])
    assert np.abs(observed - expected).max() < 0.015  # ~4 sigma at 40k draws


def test_generator_defaults_are_the_official_server_ones(lm):
    gen = LmGen(lm)
    assert (gen.text_sampler.temp, gen.text_sampler.top_k) == (0.7, 25)
    assert (gen.audio_sampler.temp, gen.audio_sampler.top_k) == (0.8, 250)


def _sampled_run(gen: LmGen, user_codes: np.ndarray, steps: int) -> np.ndarray:
    out = []
    for t in range(steps):
        text, frame = gen.step(user_codes[:, t % user_codes.shape[1]][None])
        out.append(np.concatenate([np.array(text), np.array(gen.state.last_audio_tokens[0])]))
    return np.array(out)


def test_sampling_is_seedable_and_reproducible(lm):
    codes = np.random.default_rng(1).integers(0, 2048, size=(8, 10))
    a = _sampled_run(LmGen(lm, seed=3), codes, 8)
    gen = LmGen(lm, seed=3)
    b = _sampled_run(gen, codes, 8)
    np.testing.assert_array_equal(a, b)
    gen.reset()
    np.testing.assert_array_equal(_sampled_run(gen, codes, 8), a)
    c = _sampled_run(LmGen(lm, seed=4), codes, 8)
    assert (a != c).any()
    # Drawing from the global MLX generator in between must not change a seeded run.
    mx.random.seed(123)
    mx.random.normal((10,))
    np.testing.assert_array_equal(_sampled_run(LmGen(lm, seed=3), codes, 8), a)


def test_sampling_settings_change_between_conversations(lm):
    """A generator switched to greedy samples exactly as one built greedy (the compiled graph
    is not the stale one of the old temperatures), and switched back it samples as before."""
    codes = np.random.default_rng(2).integers(0, 2048, size=(8, 10))
    greedy = _sampled_run(LmGen(lm, text_temp=0.0, audio_temp=0.0, seed=3), codes, 6)
    sampled = _sampled_run(LmGen(lm, seed=3), codes, 6)
    assert (greedy != sampled).any()
    gen = LmGen(lm, seed=3)
    defaults = gen.sampling
    assert defaults == SamplingSettings(0.7, 25, 0.8, 250)
    _sampled_run(gen, codes, 2)  # the default graph is traced
    assert gen.set_sampling(SamplingSettings(0.0, 25, 0.0, 250))
    assert not gen.set_sampling(SamplingSettings(0.0, 25, 0.0, 250))
    gen.reset()
    np.testing.assert_array_equal(_sampled_run(gen, codes, 6), greedy)
    assert gen.set_sampling(defaults)
    gen.reset()
    np.testing.assert_array_equal(_sampled_run(gen, codes, 6), sampled)


# --------------------------------------------------------------------------- long context


def _rms(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain


def numpy_temporal(lm, tokens: np.ndarray, context: int) -> np.ndarray:
    """Float64 whole-sequence temporal transformer: query p attends to keys s with
    0 <= p - s < context. tokens [T, 17] -> text logits [T, text_card]."""
    cfg = lm.cfg

    def w(a):
        return np.array(a, dtype=np.float64)

    steps = tokens.shape[0]
    x = sum(w(emb.weight)[tokens[:, k + 1]] for k, emb in enumerate(lm.audio_embs))
    x = x + w(lm.text_emb.weight)[tokens[:, 0]]
    positions = np.arange(steps)
    delta = positions[:, None] - positions[None, :]
    visible = (delta >= 0) & (delta < context)
    heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
    for layer in lm.transformer.layers:
        h = _rms(x, w(layer.norm1.weight), cfg.norm_eps)
        qkv = (h @ w(layer.self_attn.in_proj.weight).T).reshape(steps, 3, heads, head_dim)
        q, k, v = (qkv[:, i].transpose(1, 0, 2) for i in range(3))  # [H, T, D]
        q = numpy_rope(q, positions, cfg.max_period)
        k = numpy_rope(k, positions, cfg.max_period)
        scores = np.where(visible, q @ k.transpose(0, 2, 1) / np.sqrt(head_dim), -np.inf)
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        out = (attn @ v).transpose(1, 0, 2).reshape(steps, cfg.dim)
        x = x + out @ w(layer.self_attn.out_proj.weight).T
        h = _rms(x, w(layer.norm2.weight), cfg.norm_eps)
        gate, up = np.split(h @ w(layer.gating.linear_in.weight).T, 2, axis=-1)
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w(layer.gating.linear_out.weight).T
    x = _rms(x, w(lm.out_norm.weight), cfg.norm_eps)
    return x @ w(lm.text_linear.weight).T


def test_sliding_window_matches_whole_sequence_reference(short_lm):
    steps = 3 * SHORT_CONTEXT + 2
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 2049, size=(steps, 17)).astype(np.int32)
    tokens[:, 0] = rng.integers(0, 1001, size=steps)
    caches = short_lm.make_cache()
    streamed = []
    for t in range(steps):
        _, logits = short_lm.temporal(mx.array(tokens[t : t + 1]), caches)
        streamed.append(np.array(logits[0]))
        assert all(c.keys.shape[2] == SHORT_CONTEXT for c in caches)  # a fixed ring
    streamed = np.array(streamed)
    windowed = numpy_temporal(short_lm, tokens, SHORT_CONTEXT)
    np.testing.assert_allclose(streamed, windowed, atol=2e-3, rtol=0)
    # The window really cuts: attending to everything gives other logits past the context.
    unlimited = numpy_temporal(short_lm, tokens, steps)
    assert np.abs(unlimited[SHORT_CONTEXT:] - streamed[SHORT_CONTEXT:]).max() > 0.1
    np.testing.assert_allclose(streamed[:SHORT_CONTEXT], unlimited[:SHORT_CONTEXT], atol=2e-3)


def test_generation_past_context_keeps_constant_memory(short_lm):
    gen = LmGen(short_lm, seed=0)
    codes = np.random.default_rng(3).integers(0, 2048, size=(8, 1))
    shapes, memory = [], []
    for t in range(4 * SHORT_CONTEXT):
        text, frame = gen.step(codes[:, 0][None])
        assert frame is not None or t == 0
        caches = gen.state.caches
        shapes.append([c.keys.shape for c in caches] + [c.values.shape for c in caches])
        memory.append(mx.get_active_memory())
    full = shapes[SHORT_CONTEXT - 1]
    assert all(s == full for s in shapes[SHORT_CONTEXT - 1 :])
    assert full[0][2] == SHORT_CONTEXT
    # Active memory does not grow once the window is full (steps 2c .. 4c).
    assert max(memory[2 * SHORT_CONTEXT :]) - min(memory[2 * SHORT_CONTEXT :]) < 1 << 20


# --------------------------------------------------------------------------- memory


@pytest.mark.parametrize("compile", [True, False])
def test_dropping_a_model_frees_its_memory_without_a_garbage_collection(
    fixtures_dir: Path, tiny_cfg: LmConfig, compile: bool
):
    """No reference cycles through the compiled functions: the last `del` frees the weights
    and caches at once (a cycle would hold them until Python's next GC pass)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        before = mx.get_active_memory()
        lm = load_lm(fixtures_dir / "lm_pytorch.safetensors", config=tiny_cfg, dtype=mx.float32)
        lm.use_cpu_threads(2, min_weights=0)
        gen = LmGen(lm, seed=0, compile=compile)
        for _ in range(3):
            gen.step(np.zeros((1, 8), np.int32))
        assert mx.get_active_memory() - before > 10 * 2**20  # the weights are there
        del lm, gen
        assert mx.get_active_memory() - before < 2**20
    finally:
        gc.enable()


def test_split_layers_run_on_whichever_thread_steps(fixtures_dir: Path, tiny_cfg: LmConfig):
    """MLX streams belong to the thread that made them: a model split on one thread must still
    step on another (each thread gets its own CPU streams), with unchanged results."""
    from concurrent.futures import ThreadPoolExecutor

    lm = load_lm(fixtures_dir / "lm_pytorch.safetensors", config=tiny_cfg, dtype=mx.float32,
                 cpu_threads=1)
    codes = np.random.default_rng(3).integers(0, 2048, size=(6, 1, 8))

    def greedy() -> list[int]:
        gen = LmGen(lm, text_temp=0.0, audio_temp=0.0)
        return [int(gen.step(c)[0][0]) for c in codes]

    plain = greedy()
    # Split float layers may round differently (another BLAS blocking), far below these greedy
    # choices' top-2 logit gaps (>= 4e-3); on every thread the split model computes the same.
    assert lm.use_cpu_threads(2, min_weights=0) > 0
    worker = ThreadPoolExecutor(max_workers=1)
    try:
        assert greedy() == plain  # this thread
        assert worker.submit(greedy).result() == plain  # another thread
        assert greedy() == plain  # and back
    finally:
        worker.submit(mx.clear_streams).result()
        worker.shutdown()
