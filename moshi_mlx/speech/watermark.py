"""Sesame's audible-AI watermark on CSM output, through the optional `silentcipher` package
(Sony's, PyTorch; its 44.1 kHz model's weights come from the Hugging Face hub on first use).

Sesame marks every clip its generator returns with silentcipher and a public five-byte key, at
a message SDR of 36 dB. We do the same when `silentcipher` can be loaded, on whole clips only:
silentcipher encodes a complete waveform, so audio that is played or written as it is made
cannot carry the mark.
"""

from __future__ import annotations

import numpy as np

from moshi_mlx.errors import MoshiError

SESAME_WATERMARK_KEY = (212, 211, 146, 56, 201)  # Sesame's published key for CSM-1B audio
MESSAGE_SDR_DB = 36
SILENTCIPHER_MODEL = "44.1k"


class WatermarkUnavailable(MoshiError):
    """silentcipher is not installed, or its model could not be loaded (the reason says)."""


class Watermarker:
    def __init__(self, model) -> None:
        self.model = model

    def apply(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float audio -> the same length, watermarked (silentcipher resamples to its
        model's rate and back itself). Silence is returned unchanged (silentcipher skips it)."""
        pcm = np.asarray(audio, dtype=np.float32).reshape(-1)
        if pcm.size == 0 or not np.any(pcm):
            return pcm
        marked, _ = self.model.encode_wav(pcm, sample_rate, list(SESAME_WATERMARK_KEY),
                                          message_sdr=MESSAGE_SDR_DB, calc_sdr=False)
        marked = np.asarray(marked, dtype=np.float32).reshape(-1)
        if marked.size >= pcm.size:  # resampling round trips may add or lose a sample
            return marked[: pcm.size]
        return np.concatenate([marked, np.zeros(pcm.size - marked.size, np.float32)])


def load_watermarker() -> Watermarker:
    """silentcipher's 44.1 kHz model on the CPU; WatermarkUnavailable (one line) when the
    package is missing or its model cannot be loaded (e.g. no hub access for its weights)."""
    try:
        import silentcipher
    except ImportError:
        raise WatermarkUnavailable("silentcipher not installed (pip install silentcipher)"
                                   ) from None
    try:
        model = silentcipher.get_model(model_type=SILENTCIPHER_MODEL, device="cpu")
    except Exception as exc:  # a third-party loader: any failure means no watermark
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WatermarkUnavailable(f"silentcipher could not load its model: {first_line}"
                                   ) from None
    if model is None or not hasattr(model, "encode_wav"):
        raise WatermarkUnavailable("silentcipher returned no model")
    return Watermarker(model)
