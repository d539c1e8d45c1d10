"""Vector-codebook weights: groups of ``dim`` consecutive weights coded by residual codebooks shared by a layer
(AQLM / PQ-style), optionally refined to keep the layer's outputs on calibration inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenizers_q.kmeans import kmeans
from tokenizers_q.search import nearest
from tokenizers_q.weights.config import (
    WeightQuantConfig,
    check_weight,
    pack_levels,
    register_weight_config,
    unpack_levels,
)


@register_weight_config("vector")
@dataclass(frozen=True)
class VectorCodebookConfig(WeightQuantConfig):
    r"""Rows are scaled to unit RMS (float16 scale per row), cut into groups of ``dim`` consecutive
    weights, and each group is the sum of one entry from each of ``num_codebooks`` residual codebooks
    of ``codebook_size`` float16 vectors, fitted per layer by k-means on the residuals.
    ``num_codebooks * log2(codebook_size) / dim`` code bits per weight, plus the layer's tables.

    Args:
        dim: weights per group (must divide the input width). Default: 4.
        codebook_size: entries per codebook (a power of two). Default: 256.
        num_codebooks: residual codebooks. Default: 1 (2 bits per weight with the defaults).
        refine_steps: Adam steps on codebooks and row scales minimising the output error
            ``tr(E H E^T)`` on calibration inputs (``E`` the weight error, codes fixed); 0 for
            k-means only. Default: 0.
        kmeans_iters: k-means iterations. Default: 25.
        seed: k-means seeding. Default: 0.
    """

    dim: int = 4
    codebook_size: int = 256
    num_codebooks: int = 1
    refine_steps: int = 0
    kmeans_iters: int = 25
    seed: int = 0

    def __post_init__(self):
        for name in ("dim", "num_codebooks", "kmeans_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        size = self.codebook_size
        if not isinstance(size, int) or size < 2 or size & (size - 1):
            raise ValueError(f"codebook_size must be a power of two >= 2, got {size!r}")
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative int, got {self.refine_steps!r}")

    @property
    def needs_hessian(self) -> bool:
        return self.refine_steps > 0

    @property
    def code_bits(self) -> int:
        return int(math.log2(self.codebook_size))

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, self.needs_hessian)
        out_features, in_features = weight.shape
        if in_features % self.dim:
            raise ValueError(f"dim {self.dim} must divide the input width {in_features}")
        weight = weight.float()
        scale = weight.pow(2).mean(1).sqrt().clamp_min(1e-8).to(torch.float16)
        residual = (weight / scale.float()[:, None]).reshape(-1, self.dim)
        group_weights = None
        if hessian is not None:  # groups whose inputs carry more energy count more
            importance = hessian.diagonal().float().clamp_min(0).reshape(-1, self.dim).sum(1) + 1e-8
            group_weights = importance.repeat(out_features)
        generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        books, codes = [], []
        for _ in range(self.num_codebooks):
            fit = kmeans(residual, self.codebook_size, self.kmeans_iters, group_weights, generator=generator)
            index, _ = nearest(residual, fit.centroids)
            books.append(fit.centroids)
            codes.append(index)
            residual = residual - fit.centroids[index]
        books, codes = torch.stack(books), torch.stack(codes, -1)  # (M, K, d), (groups, M)
        if self.refine_steps:
            books, scale = self._refine(weight, hessian, books, codes, scale)
        return {
            "codes": pack_levels(codes, self.code_bits),
            "codebooks": books.to(torch.float16),
            "scale": scale.to(torch.float16),
        }

    def _refine(self, weight, hessian, books, codes, scale):
        """Adam on codebooks and row scales, codes fixed: minimise ``tr(E H E^T) / tr(W H W^T)``."""
        books = books.clone().requires_grad_()
        scale = scale.float().clone().requires_grad_()
        h = hessian.float()
        reference = torch.einsum("oi,ij,oj->", weight, h, weight).clamp_min(1e-12)
        optimizer = torch.optim.Adam([books, scale], lr=1e-3)
        with torch.enable_grad():
            for _ in range(self.refine_steps):
                error = weight - _assemble(books, codes, scale, weight.shape)
                loss = torch.einsum("oi,ij,oj->", error, h, error) / reference
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return books.detach(), scale.detach()

    def row_tensors(self):
        return ("scale",)

    def row_code_bits(self, columns):
        return columns // self.dim * self.num_codebooks * self.code_bits

    def vector_product(self, tensors, shape, x):
        """Products of the input's groups with every codebook entry first (a table of ``in / dim`` x
        ``codebook_size`` per codebook), then a gather-sum of that table over each row's codes: a
        ``dim``-th of the reads of dequantizing (2x faster compiled, at one input row)."""
        groups = shape[1] // self.dim
        codes = unpack_levels(tensors["codes"], self.code_bits, (shape[0], groups, self.num_codebooks), torch.long)
        books = tensors["codebooks"].float()  # (M, K, dim)
        table = torch.einsum("gd,mkd->mgk", x.float().reshape(groups, self.dim), books).reshape(-1)
        column = torch.arange(groups, device=x.device)[:, None] * self.codebook_size
        book = torch.arange(self.num_codebooks, device=x.device) * groups * self.codebook_size
        out = table[codes + column + book].sum((-1, -2)) * tensors["scale"].float()
        return out.to(x.dtype)

    def dequantize(self, tensors, shape):
        codes_shape = (shape[0], shape[1] // self.dim, self.num_codebooks)
        codes = unpack_levels(tensors["codes"], self.code_bits, codes_shape, torch.int32)
        books = tensors["codebooks"].float()  # (M, K, dim)
        if torch.compiler.is_compiling():  # a gather per coordinate, then interleaved: what the compiler fuses
            vectors = torch.stack(
                [sum(books[m, :, d][codes[..., m]] for m in range(self.num_codebooks)) for d in range(self.dim)], -1
            )
        else:  # whole vectors per gather: 4x faster in eager
            codes = codes.reshape(-1, self.num_codebooks)
            vectors = sum(torch.index_select(books[m], 0, codes[:, m]) for m in range(self.num_codebooks))
        return vectors.reshape(shape) * tensors["scale"][:, None]


def _assemble(books: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """Weights (out, in) from codebooks (M, K, d), codes (groups, M) and row scales (out,)."""
    vectors = sum(books[m][codes[:, m]] for m in range(books.shape[0]))
    return vectors.reshape(shape) * scale[:, None]
