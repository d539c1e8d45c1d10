"""Vector-codebook weights: groups of ``group_size`` consecutive weights coded by residual codebooks shared by a
layer (AQLM / PQ-style), optionally refined to keep the layer's outputs on calibration inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokenizers_q.checks import check_codebook_size, check_int
from tokenizers_q.files import RENAMED_ARGUMENTS
from tokenizers_q.kmeans import residual_kmeans
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
    r"""Rows are scaled to unit RMS (float16 scale per row), cut into groups of ``group_size`` consecutive
    weights, and each group is the sum of one entry from each of ``num_quantizers`` residual codebooks
    of ``codebook_size`` float16 vectors, fitted per layer by residual k-means
    (:func:`~tokenizers_q.kmeans.residual_kmeans`).
    ``num_quantizers * log2(codebook_size) / group_size`` code bits per weight, plus the layer's tables.

    Args:
        group_size: consecutive weights coded together (must divide the input width). Default: 4.
        codebook_size: entries per codebook, a power of two in [2, 65536]. Default: 256.
        num_quantizers: residual codebooks. Default: 1 (2 bits per weight with the defaults).
        refine_iters: Adam steps on codebooks and row scales minimising the output error
            ``tr(E H E^T)`` on calibration inputs (``E`` the weight error, codes fixed); 0 for
            k-means only. Default: 0.
        kmeans_iters: k-means iterations per codebook. Default: 25.
        seed: k-means seeding. Default: 0.

    Configs saved under the earlier names (``dim``, ``num_codebooks``, ``refine_steps``) load through
    :attr:`renamed_arguments` with a ``DeprecationWarning``.

    Shapes:
        - weight: (out, in); stored ``codebooks``: (num_quantizers, codebook_size, group_size) float16,
          ``scale``: (out,) float16, ``codes``: packed, ``out * in / group_size * num_quantizers`` codes
    """

    group_size: int = 4
    codebook_size: int = 256
    num_quantizers: int = 1
    refine_iters: int = 0
    kmeans_iters: int = 25
    seed: int = 0

    #: earlier argument names of saved configs -> current names (the library's renamings and this class's own)
    renamed_arguments: ClassVar[Mapping[str, str]] = {
        **RENAMED_ARGUMENTS,
        "dim": "group_size",
        "num_codebooks": "num_quantizers",
    }

    def __post_init__(self):
        check_int("group_size", self.group_size)
        check_codebook_size(self.codebook_size)
        check_int("num_quantizers", self.num_quantizers)
        check_int("refine_iters", self.refine_iters, 0)
        check_int("kmeans_iters", self.kmeans_iters, 0)
        check_int("seed", self.seed, 0)

    @property
    def needs_hessian(self) -> bool:
        return self.refine_iters > 0

    @property
    def code_bits(self) -> int:
        return int(math.log2(self.codebook_size))

    def quantize(self, weight, hessian=None):
        check_weight(weight, hessian, self.needs_hessian)
        out_features, in_features = weight.shape
        if in_features % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide the input width {in_features}")
        weight = weight.float()
        scale = weight.pow(2).mean(1).sqrt().clamp_min(1e-8).to(torch.float16)
        groups = (weight / scale.float()[:, None]).reshape(-1, self.group_size)
        group_weights = None
        if hessian is not None:  # groups whose inputs carry more energy count more
            importance = hessian.diagonal().float().clamp_min(0).reshape(-1, self.group_size).sum(1) + 1e-8
            group_weights = importance.repeat(out_features)
        generator = torch.Generator(device=weight.device).manual_seed(self.seed)
        books, codes = residual_kmeans(  # (M, K, group_size), (groups, M)
            groups, self.num_quantizers, self.codebook_size, self.kmeans_iters, group_weights, generator
        )
        if self.refine_iters:
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
            for _ in range(self.refine_iters):
                error = weight - _assemble(books, codes, scale, weight.shape)
                loss = torch.einsum("oi,ij,oj->", error, h, error) / reference
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return books.detach(), scale.detach()

    def row_tensors(self):
        return ("scale",)

    def row_code_bits(self, columns):
        return columns // self.group_size * self.num_quantizers * self.code_bits

    def vector_product(self, tensors, shape, x):
        """Products of the input's groups with every codebook entry first (a table of ``in / group_size`` x
        ``codebook_size`` per codebook), then a gather-sum of that table over each row's codes: a
        ``group_size``-th of the reads of dequantizing (2x faster compiled, at one input row)."""
        groups = shape[1] // self.group_size
        codes = unpack_levels(tensors["codes"], self.code_bits, (shape[0], groups, self.num_quantizers), torch.long)
        books = tensors["codebooks"].float()  # (M, K, group_size)
        table = torch.einsum("gd,mkd->mgk", x.float().reshape(groups, self.group_size), books).reshape(-1)
        column = torch.arange(groups, device=x.device)[:, None] * self.codebook_size
        book = torch.arange(self.num_quantizers, device=x.device) * groups * self.codebook_size
        out = table[codes + column + book].sum((-1, -2)) * tensors["scale"].float()
        return out.to(x.dtype)

    def dequantize(self, tensors, shape):
        codes_shape = (shape[0], shape[1] // self.group_size, self.num_quantizers)
        codes = unpack_levels(tensors["codes"], self.code_bits, codes_shape, torch.int32)
        books = tensors["codebooks"].float()  # (M, K, group_size)
        quantizers = range(self.num_quantizers)
        if torch.compiler.is_compiling():  # a gather per coordinate, then interleaved: what the compiler fuses
            vectors = torch.stack(
                [sum(books[m, :, d][codes[..., m]] for m in quantizers) for d in range(self.group_size)], -1
            )
        else:  # whole vectors per gather: 4x faster in eager
            codes = codes.reshape(-1, self.num_quantizers)
            vectors = sum(torch.index_select(books[m], 0, codes[:, m]) for m in quantizers)
        return vectors.reshape(shape) * tensors["scale"][:, None]


def _assemble(books: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """Weights (out, in) from codebooks (M, K, d), codes (groups, M) and row scales (out,)."""
    vectors = sum(books[m][codes[:, m]] for m in range(books.shape[0]))
    return vectors.reshape(shape) * scale[:, None]
