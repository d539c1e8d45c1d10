"""Incoherence processing: any weight method applied to ``W R``, a randomized Hadamard rotation of the inputs."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers_q.checks import check_int
from tokenizers_q.hadamard import MAX_BLOCK, HadamardRotation
from tokenizers_q.weights.config import WeightQuantConfig, register_weight_config


@register_weight_config("hadamard")
@dataclass(frozen=True)
class RotatedConfig(WeightQuantConfig):
    r"""Quantize ``W R`` with ``inner`` instead of ``W`` (QuIP#/QuaRot-style incoherence processing).

    ``R`` (:class:`~tokenizers_q.hadamard.HadamardRotation` of the input width, from ``seed``) is orthogonal,
    so ``W = (W R) R^T``: the rotated rows have no outlier columns and are near-Gaussian, which grids, NF4 and
    codebooks quantize with less error. GPTQ runs on the rotated problem (``R^T H R``). The stored tensors are
    ``inner``'s; ``R`` is rebuilt from the seed (nothing more is stored), and dequantizing applies ``R^T`` to
    each row.

    Args:
        inner: the method applied to the rotated weight, e.g. ``IntGridConfig(4, group_size=128, gptq=True)``
            (or its dict, as saved).
        seed: the rotation's random signs. Default: 0.
        max_block: largest Hadamard block. Default: 256.
    """

    inner: WeightQuantConfig
    seed: int = 0
    max_block: int = MAX_BLOCK

    def __post_init__(self):
        if isinstance(self.inner, dict):
            object.__setattr__(self, "inner", WeightQuantConfig.from_dict(self.inner))
        if not isinstance(self.inner, WeightQuantConfig) or isinstance(self.inner, RotatedConfig):
            raise TypeError(f"inner must be a (non-rotated) WeightQuantConfig, got {self.inner!r}")
        check_int("seed", self.seed, 0)
        check_int("max_block", self.max_block)

    def rotation(self, width: int) -> HadamardRotation:
        return HadamardRotation(width, self.seed, self.max_block)

    @property
    def needs_hessian(self) -> bool:
        return self.inner.needs_hessian

    def to_dict(self) -> dict:
        return {"method": self.method, "inner": self.inner.to_dict(), "seed": self.seed, "max_block": self.max_block}

    def quantize(self, weight, hessian=None):
        rotation = self.rotation(weight.shape[1])
        rotated = rotation.rotate(weight.float())
        return self.inner.quantize(rotated, None if hessian is None else rotation.conjugate(hessian.float()))

    def dequantize(self, tensors, shape):
        return self.rotation(shape[1]).unrotate(self.inner.dequantize(tensors, shape))

    def vector_product(self, tensors, shape, x):
        return self.inner.vector_product(tensors, shape, self.rotation(shape[1]).rotate(x))

    def row_tensors(self):
        return self.inner.row_tensors()

    def row_code_bits(self, columns):
        return self.inner.row_code_bits(columns)

    def select_rows(self, tensors, shape, rows):
        return self.inner.select_rows(tensors, shape, rows)
