"""Mimi parity with rustymimi (Kyutai's Rust Mimi, run live) on a random real-size checkpoint in
the official layout, on the 158-frame test speech; streaming vs whole-clip consistency."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import rustymimi
import soundfile

from moshi_mlx.models.mimi import MimiStream

FRAME = 1920
K = 8


@pytest.fixture(scope="module")
def speech(fixtures_dir) -> np.ndarray:
    pcm, rate = soundfile.read(str(fixtures_dir / "speech.wav"), dtype="float32")
    assert rate == 24000 and len(pcm) == 158 * FRAME
    return pcm


@pytest.fixture(scope="module")
def mimi(random_mimi_path):
    from moshi_mlx.loading.models import load_mimi

    return load_mimi(random_mimi_path, num_codebooks=K)


@pytest.fixture(scope="module")
def rust(random_mimi_path, speech) -> dict[str, np.ndarray]:
    """rustymimi's whole-clip and frame-by-frame codes, and its decoding of its own codes."""
    tok = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=K)
    whole = tok.encode(speech[None, None])
    tok.reset()
    starts = range(0, len(speech), FRAME)
    frames = [tok.encode_step(speech[None, None, i : i + FRAME]) for i in starts]
    tok.reset()
    decoded = tok.decode(np.ascontiguousarray(whole.astype(np.uint32)))
    return {
        "whole": whole.astype(np.int64),
        "stream": np.concatenate(frames, axis=2).astype(np.int64),
        "decoded": decoded,
    }


@pytest.fixture(scope="module")
def ours_whole(mimi, speech) -> np.ndarray:
    return np.asarray(mimi.encode(speech[None, None])).astype(np.int64)


@pytest.fixture(scope="module")
def ours_stream(mimi, speech) -> np.ndarray:
    state = mimi.new_encoder_state()
    frames = [
        np.asarray(mimi.encode_step(mx.array(speech[None, None, i : i + FRAME]), state))
        for i in range(0, len(speech), FRAME)
    ]
    return np.concatenate(frames, axis=2).astype(np.int64)


def test_reference_codes_are_not_degenerate(rust):
    # Guards the checkpoint recipe: near-constant codes would make the parity tests vacuous.
    for k in range(K):
        assert len(np.unique(rust["whole"][0, k])) > 40


def test_whole_clip_codes_match_rustymimi(ours_whole, rust):
    assert ours_whole.shape == (1, K, 158)
    agreement = (ours_whole == rust["whole"]).mean()
    assert agreement >= 0.99, f"only {agreement:.2%} of codes equal to rustymimi"


def test_streaming_codes_match_rustymimi_streaming(ours_stream, rust):
    assert ours_stream.shape == (1, K, 158)
    agreement = (ours_stream == rust["stream"]).mean()
    assert agreement >= 0.99, f"only {agreement:.2%} of codes equal to rustymimi"


def test_streaming_and_whole_clip_codes_are_identical(ours_stream, ours_whole):
    np.testing.assert_array_equal(ours_stream, ours_whole)


def test_encode_output_type(mimi, speech):
    codes = mimi.encode(speech[: 3 * FRAME])  # (T,) numpy input is accepted too
    assert isinstance(codes, mx.array) and codes.dtype == mx.int32 and codes.shape == (1, K, 3)


@pytest.fixture(scope="module")
def ours_decoded(mimi, rust) -> np.ndarray:
    return np.asarray(mimi.decode(mx.array(rust["whole"].astype(np.int32))))


def test_decode_matches_rustymimi(ours_decoded, rust):
    reference = rust["decoded"]
    assert ours_decoded.shape == reference.shape == (1, 1, 158 * FRAME)
    assert 0.05 < reference.std() < 0.2  # decoder output calibrated to std 0.1
    assert np.abs(ours_decoded - reference).max() < 0.005


def test_streaming_decode_matches_whole_clip(mimi, rust, ours_decoded):
    # The decoder is causal, so the first 40 frames streamed must reproduce the first 40 frames
    # of the whole-clip decoding (a prefix keeps the test fast).
    frames_to_stream = 40
    state = mimi.new_decoder_state()
    codes = rust["whole"].astype(np.int32)  # numpy input
    frames = [mimi.decode_step(codes[:, :, i : i + 1], state) for i in range(frames_to_stream)]
    assert all(f.shape == (1, 1, FRAME) for f in frames)
    streamed = np.concatenate([np.asarray(f) for f in frames], axis=2)
    samples = frames_to_stream * FRAME
    assert np.abs(streamed - ours_decoded[..., :samples]).max() < 0.002
    assert np.abs(streamed - rust["decoded"][..., :samples]).max() < 0.005


def test_reset_restarts_the_stream(mimi, speech, ours_whole):
    stream = MimiStream(mimi)
    for i in range(3):
        stream.encode_step(speech[None, None, i * FRAME : (i + 1) * FRAME])
    stream.reset()
    first = np.asarray(stream.encode_step(speech[None, None, :FRAME]))
    np.testing.assert_array_equal(first[0, :, 0], ours_whole[0, :, 0])


def test_interleaved_streams_share_one_mimi(mimi, speech):
    # Two streams through one loaded Mimi, frame by frame in turn, give exactly what each gives
    # alone (the model holds no stream state).
    clips = [speech[:6 * FRAME], speech[60 * FRAME : 66 * FRAME]]

    def alone(clip):
        stream = MimiStream(mimi)
        codes = [stream.encode_step(clip[None, None, i : i + FRAME])
                 for i in range(0, len(clip), FRAME)]
        audio = [stream.decode_step(c) for c in codes]
        return np.concatenate(codes, axis=2), np.concatenate(audio, axis=2)

    expected = [alone(clip) for clip in clips]
    encoders = [mimi.new_encoder_state() for _ in clips]
    decoders = [mimi.new_decoder_state() for _ in clips]
    codes, audio = [[], []], [[], []]
    for i in range(0, 6 * FRAME, FRAME):
        for row in (0, 1):
            frame = mimi.encode_step(clips[row][None, None, i : i + FRAME], encoders[row])
            codes[row].append(frame)
            audio[row].append(mimi.decode_step(frame, decoders[row]))
    for row in (0, 1):
        np.testing.assert_array_equal(np.concatenate(codes[row], axis=2), expected[row][0])
        np.testing.assert_array_equal(np.concatenate(audio[row], axis=2), expected[row][1])
    assert not np.array_equal(expected[0][0], expected[1][0])  # two different streams


@pytest.mark.parametrize("num_codebooks", [1, 32])
def test_codebook_counts_match_rustymimi(random_mimi_path, speech, num_codebooks):
    from moshi_mlx.loading.models import load_mimi

    clip = speech[None, None, : 12 * FRAME]
    model = load_mimi(random_mimi_path, num_codebooks=num_codebooks)
    tok = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=num_codebooks)
    ours = np.asarray(model.encode(clip))
    ref = tok.encode(clip).astype(np.int64)
    assert ours.shape == ref.shape == (1, num_codebooks, 12)
    levels = min(num_codebooks, 9)  # deeper levels are decided by float noise
    assert (ours[:, :levels] == ref[:, :levels]).mean() >= 0.99
    decoded = np.asarray(model.decode(ref.astype(np.int32)))
    reference = tok.decode(np.ascontiguousarray(ref.astype(np.uint32)))
    assert np.abs(decoded - reference).max() < 0.005


@pytest.mark.parametrize("samples", [1000, 12 * FRAME + 700])
def test_partial_last_frame_matches_rustymimi(random_mimi_path, speech, samples):
    # A clip that does not end on a frame boundary is padded layer by layer at its right edge
    # like the official whole-clip code; small chunks make the clip cross chunk boundaries.
    from moshi_mlx.loading.models import load_mimi

    model = load_mimi(random_mimi_path, num_codebooks=K)
    model.cfg.chunk_frames = 5
    clip = speech[None, None, 40 * FRAME : 40 * FRAME + samples]
    ours = np.asarray(model.encode(mx.array(clip)))
    ref = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=K).encode(clip)
    assert ours.shape == ref.shape == (1, K, -(-samples // FRAME))
    np.testing.assert_array_equal(ours, ref.astype(np.int64))


def test_batch_rows_are_independent(mimi, random_mimi_path, speech):
    # Two clips in one batch give each clip's own codes, as rustymimi encodes them one by one.
    clips = np.stack([speech[: 4 * FRAME], speech[50 * FRAME : 54 * FRAME]])[:, None]
    codes = np.asarray(mimi.encode(clips))
    tok = rustymimi.Tokenizer(str(random_mimi_path), num_codebooks=K)
    for row in range(2):
        tok.reset()
        reference = tok.encode(np.ascontiguousarray(clips[row : row + 1]))
        np.testing.assert_array_equal(codes[row], reference[0].astype(np.int64))
