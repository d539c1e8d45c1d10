"""Randomized Hadamard rotations: orthogonal maps that spread every coordinate's mass over a block of them.

A rotation ``R = diag(signs) . blockdiag(H_b, ..., H_b)`` (``H_b`` the orthonormal Sylvester-Hadamard matrix
of size ``b``, a power of two dividing the width) makes rows of weights or key/value vectors close to
Gaussian with no outlier coordinates (QuIP#, QuaRot), which is what low-bit grids and codebooks quantize
best. ``R`` is orthogonal, so ``(x R) . (y R) = x . y``: scores are unchanged when both sides are rotated,
and ``x W^T = (x R) (W R)^T``. The signs come from a seed, so a rotation is stored as two integers.
"""

from __future__ import annotations

import functools

import torch

from tokenizers_q.checks import check_float_tensor, check_int

MAX_BLOCK = 256  # rotated as one matmul per block: 256 multiply-adds per element at most


def hadamard_block(width: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two that divides ``width``, at most ``max_block``."""
    check_int("width", width)
    return min(width & -width, max_block)


@functools.lru_cache(maxsize=16)
def _sylvester(size: int) -> torch.Tensor:
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


@torch.compiler.disable  # made once per width and seed, never traced
@functools.lru_cache(maxsize=64)
def hadamard_rotation(width: int, seed: int = 0, max_block: int = MAX_BLOCK) -> HadamardRotation:
    """The :class:`HadamardRotation` of these arguments, made once and shared."""
    return HadamardRotation(width, seed, max_block)


class HadamardRotation:
    r"""A seeded randomized block-Hadamard rotation of the last axis.

    Args:
        width: size of the rotated axis.
        seed: the random signs. Default: 0.
        max_block: largest Hadamard block (the block is the largest power of two dividing ``width`` up to
            this). Default: 256.

    Shapes:
        - x: (..., width); output: (..., width), same dtype
    """

    def __init__(self, width: int, seed: int = 0, max_block: int = MAX_BLOCK):
        self.width, self.seed = check_int("width", width), check_int("seed", seed, 0)
        self.block = hadamard_block(width, check_int("max_block", max_block))
        generator = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (width,), generator=generator).float() * 2 - 1
        self.matrix = _sylvester(self.block)

    def _check(self, x: torch.Tensor) -> None:
        check_float_tensor("the rotated input", x)
        if x.shape[-1:] != (self.width,):
            raise ValueError(f"the rotation reads (..., {self.width}), got {tuple(x.shape)}")

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R``: signs, then a Hadamard transform of every block."""
        self._check(x)
        signs, matrix = self.signs.to(x.device, x.dtype), self.matrix.to(x.device, x.dtype)
        blocks = (x * signs).reshape(*x.shape[:-1], -1, self.block)
        return (blocks @ matrix).reshape(x.shape)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """``y R^T`` (the inverse: ``H`` is symmetric and its own inverse)."""
        self._check(y)
        signs, matrix = self.signs.to(y.device, y.dtype), self.matrix.to(y.device, y.dtype)
        blocks = y.reshape(*y.shape[:-1], -1, self.block) @ matrix
        return blocks.reshape(y.shape) * signs

    def conjugate(self, hessian: torch.Tensor) -> torch.Tensor:
        """``R^T H R``: input second moments of rotated inputs (for GPTQ on rotated weights)."""
        return self.rotate(self.rotate(hessian).T).T
