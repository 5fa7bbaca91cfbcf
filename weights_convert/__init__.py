"""Convert checkpoints of every model family into MLX model folders (bf16, q8, q4).

`python -m weights_convert --hf-repo kyutai/moshika-pytorch-bf16 -q 4 --out DIR`
"""

from __future__ import annotations

# Before MLX loads: on Linux MLX's float products then run on an installed OpenBLAS.
import moshi_mlx  # noqa: F401, I001

__version__ = "0.1.0"

from weights_convert.converter import ConversionResult, convert  # noqa: E402

__all__ = ["ConversionResult", "__version__", "convert"]
