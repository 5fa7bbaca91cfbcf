"""Split residual vector quantizer: one semantic codebook plus a residual stack of acoustic ones.

Both halves quantize the same projected latent independently (the acoustic stack does not see
the semantic residual); their decoded latents are summed. Latents are channels-last [B, T, C].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class _Derived:
    """Values computed from the weights, kept outside the parameter tree."""

    vectors: mx.array | None = None
    half_sq_norms: mx.array | None = None


class Codebook(nn.Module):
    """2048 x 256 codebook stored as the official running statistics.

    The code vectors are `embedding_sum / max(cluster_usage, eps)`; `finalize()` computes them
    (and their squared norms) once after loading.
    """

    def __init__(self, codebook_size: int, dim: int, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.embedding_sum = mx.zeros((codebook_size, dim))
        self.cluster_usage = mx.ones((codebook_size,))
        self.derived = _Derived()

    def finalize(self) -> None:
        usage = mx.maximum(self.cluster_usage, self.epsilon)
        vectors = self.embedding_sum / usage[:, None]
        half_sq_norms = 0.5 * (vectors * vectors).sum(axis=-1)
        # Stored column-major, so that `vectors.T` in encode is a row-major matrix (see
        # moshi_mlx.modules.conv: the faster operand layout for BLAS).
        vectors = mx.contiguous(vectors.T).T
        mx.eval(vectors, half_sq_norms)
        self.derived = _Derived(vectors, half_sq_norms)

    @property
    def vectors(self) -> mx.array:
        if self.derived.vectors is None:
            self.finalize()
        return self.derived.vectors

    def encode(self, x: mx.array) -> mx.array:
        """Nearest code (Euclidean) for each vector of x [..., dim] -> int32 [...]."""
        vectors = self.vectors
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
        scores = x @ vectors.T - self.derived.half_sq_norms
        return mx.argmax(scores, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        return self.vectors[codes]


class _VqLayer(nn.Module):
    """Official nesting `layers.{i}._codebook.*` (loaded as `codebook`: MLX hides `_` names)."""

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.codebook = Codebook(codebook_size, dim)


class _LayerStack(nn.Module):
    def __init__(self, num_layers: int, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.layers = [_VqLayer(codebook_size, dim) for _ in range(num_layers)]


class _Projection(nn.Module):
    """A bias-free 1x1 conv stored as `weight` [out, in, 1] in PyTorch; here [out, 1, in]."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = mx.zeros((out_dim, 1, in_dim))
        self.derived = _ProjectionMatrix()

    def __call__(self, x: mx.array) -> mx.array:
        if self.derived.key is not self.weight:  # [in, out], row-major, once per weight
            matrix = mx.contiguous(self.weight[:, 0, :].T)
            mx.eval(matrix)
            self.derived = _ProjectionMatrix(self.weight, matrix)
        return x @ self.derived.matrix


@dataclass
class _ProjectionMatrix:
    key: mx.array | None = None
    matrix: mx.array | None = None


class ResidualVectorQuantizer(nn.Module):
    """input_proj (dim -> codebook dim), residual VQ over `num_layers` levels, output_proj."""

    def __init__(self, dim: int, codebook_dim: int, num_layers: int, codebook_size: int) -> None:
        super().__init__()
        self.input_proj = _Projection(dim, codebook_dim)
        self.output_proj = _Projection(codebook_dim, dim)
        self.vq = _LayerStack(num_layers, codebook_size, codebook_dim)

    def codebooks(self, count: int) -> list[Codebook]:
        return [layer.codebook for layer in self.vq.layers[:count]]

    def encode(self, x: mx.array, count: int) -> mx.array:
        """x [B, T, dim] -> codes int32 [B, count, T]."""
        residual = self.input_proj(x)
        codes = []
        for codebook in self.codebooks(count):
            level = codebook.encode(residual)
            residual = residual - codebook.decode(level)
            codes.append(level)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, K, T] -> latents [B, T, dim]."""
        total = None
        for k, codebook in enumerate(self.codebooks(codes.shape[1])):
            vectors = codebook.decode(codes[:, k])
            total = vectors if total is None else total + vectors
        return self.output_proj(total)


class SplitResidualVectorQuantizer(nn.Module):
    """Codebook 0 from `rvq_first` (semantic), codebooks 1.. from `rvq_rest` (acoustic)."""

    def __init__(
        self,
        dim: int = 512,
        codebook_dim: int = 256,
        num_acoustic_layers: int = 31,
        codebook_size: int = 2048,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.max_codebooks = 1 + num_acoustic_layers
        self.rvq_first = ResidualVectorQuantizer(dim, codebook_dim, 1, codebook_size)
        self.rvq_rest = ResidualVectorQuantizer(
            dim, codebook_dim, num_acoustic_layers, codebook_size
        )

    def finalize(self) -> None:
        for rvq in (self.rvq_first, self.rvq_rest):
            for codebook in rvq.codebooks(len(rvq.vq.layers)):
                codebook.finalize()

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        """x [B, T, dim] -> int32 codes [B, num_codebooks, T]."""
        codes = self.rvq_first.encode(x, 1)
        if num_codebooks > 1:
            rest = self.rvq_rest.encode(x, num_codebooks - 1)
            codes = mx.concatenate([codes, rest], axis=1)
        return codes

    def decode(self, codes: mx.array) -> mx.array:
        """codes [B, K, T] -> latents [B, T, dim]."""
        out = self.rvq_first.decode(codes[:, :1])
        if codes.shape[1] > 1:
            out = out + self.rvq_rest.decode(codes[:, 1:])
        return out
